"""Shared by the serving tests: one tiny random GPT, an engine over it and a live server on loopback."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from flax import nnx

from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.serve.app import create_app
from jaxgpt.serve.engine import Engine

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
MAX_LEN = 64  # prompt + completion: prompt buckets 16, 32, 64
MODEL_NAME = "tiny"


def tiny_model(seed: int = 0) -> GPT:
    """Random weights; large position embeddings so greedy tokens change along a sequence."""
    model = GPT(CONFIG, nnx.Rngs(seed))
    model.wpe.embedding.value = model.wpe.embedding.value * 10
    return model


def new_engine(model: GPT, max_batch: int = 4, max_queue: int = 64) -> Engine:
    return Engine(model, max_batch=max_batch, max_queue=max_queue, max_len=MAX_LEN).start()


@contextlib.contextmanager
def live_server(engine: Engine, api_key: str | None = None) -> Iterator[str]:
    """uvicorn serving ``engine`` on a free loopback port, on a thread; yields the base URL."""
    import uvicorn

    app = create_app(engine, MODEL_NAME, "in-process", api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_all_free(engine: Engine, timeout: float = 10.0) -> dict[str, int]:
    """The engine's stats once every slot is free (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["free_slots"] < engine.max_batch or stats["waiting"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return stats
