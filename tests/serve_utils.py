"""Shared by the serving tests: one tiny random GPT, an engine over it and a live server on loopback.

Test modules load it as a plugin (``pytest_plugins``) for the fixtures ``model``, ``engine`` and ``url``:
one of each per module, the engine with the module's ``MAX_BATCH`` slots.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from flax import nnx

from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.serve.app import create_app, serve_in_thread
from jaxgpt.serve.engine import Engine
from jaxgpt.tokenizer import load_tokenizer

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
MAX_LEN = 64  # prompt + completion: prompt buckets 16, 32, 64
MODEL_NAME = "tiny"


def tiny_model(seed: int = 0) -> GPT:
    """Random weights; large position embeddings so greedy tokens change along a sequence."""
    model = GPT(CONFIG, nnx.Rngs(seed))
    model.wpe.embedding.value = model.wpe.embedding.value * 10
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


@pytest.fixture(scope="module")
def engine(request, model) -> Iterator[Engine]:
    """A started engine over ``model`` with the test module's ``MAX_BATCH`` slots (default 4).

    Compiled as requests come unless the module sets ``WARMUP = True`` (compiling every bucket first
    costs more than the few a module's requests need).
    """
    engine = new_engine(model, getattr(request.module, "MAX_BATCH", 4), warmup=getattr(request.module, "WARMUP", False))
    yield engine
    engine.stop(10)


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with live_server(engine) as url:
        yield url


def new_engine(model: GPT, max_batch: int = 4, max_queue: int = 64, warmup: bool = False) -> Engine:
    return Engine(model, load_tokenizer(), max_batch=max_batch, max_queue=max_queue, max_len=MAX_LEN).start(warmup)


def live_server(engine: Engine, api_key: str | None = None):
    """A context: uvicorn serving ``engine`` on a free loopback port, on a thread; yields the base URL."""
    return serve_in_thread(create_app(engine, MODEL_NAME, "in-process", api_key))


def wait_all_free(engine: Engine, timeout: float = 10.0) -> dict[str, int]:
    """The engine's stats once every slot is free (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["free_slots"] < engine.max_batch or stats["waiting"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return stats
