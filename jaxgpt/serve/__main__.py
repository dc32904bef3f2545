"""``python -m jaxgpt.serve --init_from RUN_DIR|HF_DIR|hub-id``: an OpenAI-compatible server with a chat page.

    python -m jaxgpt.serve --init_from out/sft --max_batch 16
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'

SIGTERM (or Ctrl-C) stops accepting connections, lets every running request finish, then exits 0.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Sequence

from jaxgpt.core.cli import parse, run
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.model.config import DType


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Serve a jaxgpt model over vLLM's OpenAI-compatible API, with a chat page at /."""

    init_from: str | None = option(
        None, "a training out_dir, a Hugging Face GPT-2 directory, or a hub id (default: the newest run under out/)"
    )
    host: str = option("127.0.0.1", "address to listen on (the default: this machine only)")
    port: int = option(8000, "port to listen on")
    mesh: str | None = option(None, "device mesh DxM (data x model), e.g. 4x2; none: one device")
    dtype: DType = option("float32", "compute dtype")
    max_batch: int = option(8, "requests decoded together (KV-cache slots); also the most choices (n) per request")
    max_queue: int = option(64, "requests waiting for a slot before new ones get 429 (Retry-After)")
    max_model_len: int | None = option(None, "longest prompt + completion in tokens (none: the model's context)")
    api_key: str | None = option(None, "require Authorization: Bearer KEY on every endpoint but /health and /")
    served_model_name: str | None = option(None, "the model id clients send (none: --init_from as given)")
    warmup: bool = option(True, "compile the decode step and every prompt bucket before serving")

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 0:
            raise UserError(f"--max_batch must be >= 1 and --max_queue >= 0, got {self.max_batch}, {self.max_queue}")
        if not 0 <= self.port < 65536:
            raise UserError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise UserError(f"--max_model_len must be at least 2, got {self.max_model_len}")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse(ServeConfig, argv, prog="python -m jaxgpt.serve")
    import uvicorn

    from jaxgpt.checkpoints.loading import load_model, resolve_init_from
    from jaxgpt.core.sharding import make_mesh, shard_model
    from jaxgpt.serve.app import create_app, uvicorn_config
    from jaxgpt.serve.engine import Engine
    from jaxgpt.tokenizer import tokenizer_of

    config = dataclasses.replace(config, init_from=resolve_init_from(config.init_from))
    mesh = make_mesh(config.mesh) if config.mesh else None
    model = load_model(config.init_from, dtype=config.dtype)
    if mesh is not None:
        shard_model(model, mesh)
    tokenizer = tokenizer_of(config.init_from)  # the one the run (or exported model) carries; else GPT-2's
    engine = Engine(model, tokenizer, config.max_batch, config.max_queue, config.max_model_len, mesh)
    engine.start(config.warmup)
    name = config.served_model_name or config.init_from
    app = create_app(engine, name, config.init_from, config.api_key)
    server = uvicorn.Server(uvicorn_config(app, config.host, config.port))
    print(
        f"serving {name} on http://{config.host}:{config.port} ({config.max_batch} slots)", file=sys.stderr, flush=True
    )
    # uvicorn drains on SIGTERM, then raises it again for the handler it found: make that one a no-op, to exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        engine.stop()
    if engine.error is not None:
        raise UserError(f"the engine failed: {engine.error!r}")


if __name__ == "__main__":
    run(main)
