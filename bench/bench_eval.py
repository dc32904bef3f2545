"""HellaSwag throughput: items per second for GPT-2 124M (random weights) on synthetic items.

Items mimic HellaSwag's lengths: contexts of 40-60 tokens, endings of 20-30, so every
batch pads to the 64- or 96-token bucket. The first batch (compilation) is timed apart.

    python -m bench.bench_eval --items 64 --batch_size 8    # from the repo root
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from jaxgpt.core.cli import parse, run
from jaxgpt.core.options import option
from jaxgpt.core.sharding import make_mesh, shard_model
from jaxgpt.eval.hellaswag import HellaSwagItem, render, score_endings
from jaxgpt.model.config import DType, preset
from jaxgpt.model.gpt import GPT
from jaxgpt.tokenizer import load_tokenizer

# Common words that GPT-2's tokenizer keeps whole (with their leading space): one token each.
WORDS = (
    "the", "a", "man", "woman", "is", "was", "and", "then", "he", "she", "they", "it", "to", "of", "in", "on",
    "with", "at", "for", "his", "her", "their", "some", "ball", "water", "car", "house", "dog", "tree", "road",
    "table", "door", "hand", "head", "time", "day", "night", "small", "large", "red", "blue", "runs", "walks",
    "sits", "stands", "holds", "picks", "takes", "puts", "looks", "turns", "opens", "closes", "moves",
    "starts", "stops",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark HellaSwag scoring of GPT-2 124M."""

    items: int = option(64, "synthetic items to score (after one warm-up batch)")
    batch_size: int = option(8, "items per batch (4 rows each)")
    dtype: DType = option("float32", "compute dtype")
    mesh: str | None = option(None, "device mesh DxM; default: every device on data")
    seed: int = option(0, "seed of the weights and of the synthetic items")


def synthetic_items(n: int, seed: int) -> list[HellaSwagItem]:
    rng = np.random.default_rng(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, rng.integers(lo, hi + 1))).capitalize() + "."
    return [
        HellaSwagItem(
            ind=i, ctx=text(39, 59), endings=tuple(text(19, 29) for _ in range(4)), label=int(rng.integers(4))
        )
        for i in range(n)
    ]


def main(argv=None) -> None:
    args = parse(BenchConfig, argv, prog="python -m bench.bench_eval")
    mesh = make_mesh(args.mesh)
    model = shard_model(GPT(preset("gpt2", dtype=args.dtype), nnx.Rngs(args.seed)), mesh)
    items = synthetic_items(args.items + args.batch_size, args.seed)
    warmup, items = items[: args.batch_size], items[args.batch_size :]
    rows = [row for rows in render(items, model.config.block_size, load_tokenizer()) for row in rows]
    ctx_lengths = [len(r) - n for r, n in rows]
    ending_lengths = [n for _, n in rows]

    start = time.perf_counter()
    score_endings(model, warmup, load_tokenizer(), batch_size=args.batch_size, mesh=mesh)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    score_endings(model, items, load_tokenizer(), batch_size=args.batch_size, mesh=mesh)
    seconds = time.perf_counter() - start

    device = jax.devices()[0]
    table = {
        "device": f"{device.platform} x{jax.device_count()} ({device.device_kind})",
        "model": f"GPT-2 124M, random weights, {args.dtype}",
        "items x batch_size": f"{len(items)} x {args.batch_size}",
        "context tokens": f"{min(ctx_lengths)}-{max(ctx_lengths)} (mean {np.mean(ctx_lengths):.0f})",
        "ending tokens": f"{min(ending_lengths)}-{max(ending_lengths)} (mean {np.mean(ending_lengths):.0f})",
        "first batch (compile + run) s": f"{compile_s:.1f}",
        "scoring s": f"{seconds:.1f}",
        "items/s": f"{len(items) / seconds:.2f}",
        "rows/s": f"{4 * len(items) / seconds:.1f}",
        "host load (1 min)": f"{os.getloadavg()[0]:.1f}",  # other work on the machine slows the figures
    }
    width = max(map(len, table))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in table.items()))


if __name__ == "__main__":
    run(main)
