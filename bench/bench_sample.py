"""Generation throughput: jaxgpt's KV-cache decoder next to Hugging Face ``generate``, same weights.

GPT-2 124M with random weights, greedy decoding of ``new_tokens`` after a random prompt of
``prompt_len`` tokens, no early stop. Tokens/s counts new tokens over the whole call (prefill
included) for both; jaxgpt's compilation is a separate warm-up run and is reported apart.

    python -m bench.bench_sample                      # from the repo root; a few minutes on 2 CPU cores
    python -m bench.bench_sample --batch_sizes 1 --new_tokens 64 --hf false
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jaxgpt.convert import save_hf_gpt2
from jaxgpt.core.cli import parse, run
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.model.config import DType, preset
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.generate import generate


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark greedy generation with GPT-2 124M against Hugging Face transformers."""

    batch_sizes: str = option("1,8", "comma-separated batch sizes")
    prompt_len: int = option(128, "prompt tokens per row")
    new_tokens: int = option(256, "new tokens per row")
    dtype: DType = option("float32", "jaxgpt compute dtype")
    hf: bool = option(True, "also time transformers' GPT2LMHeadModel.generate (use_cache, greedy)")
    threads: int = option(2, "torch CPU threads (match the cores XLA uses)")
    repeats: int = option(5, "timed runs of each, interleaved; the fastest counts (shared machines are noisy)")
    seed: int = option(0, "seed of the weights and the prompts")


def jaxgpt_runner(model: GPT, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(generate(model, prompts, new_tokens, temperature=0.0, stop_at_eot=False))


def hf_runner(hf_model, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """transformers' greedy generate with its KV cache; min_new_tokens keeps it from stopping early."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)

    def run_once() -> np.ndarray:
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            )  # fmt: skip
        return out[:, prompts.shape[1] :].numpy()

    return run_once


def timed(run_once: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = run_once()
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    args = parse(BenchConfig, argv, prog="python -m bench.bench_sample")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError as err:
        raise UserError(f"--batch_sizes must be comma-separated integers, got {args.batch_sizes!r}") from err
    model = GPT(preset("gpt2", dtype=args.dtype), nnx.Rngs(args.seed))
    hf_model = None
    if args.hf:
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            hf_model = GPT2LMHeadModel.from_pretrained(save_hf_gpt2(model, tmp)).eval()
    rng = np.random.default_rng(args.seed)
    print(f"GPT-2 124M, {args.dtype}, {jax.devices()[0].platform} ({os.cpu_count()} cores), "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    rows = []
    for batch in batch_sizes:
        prompts = rng.integers(0, 50256, (batch, args.prompt_len)).astype(np.int32)
        ours = jaxgpt_runner(model, prompts, args.new_tokens)
        warmup, _ = timed(ours)  # compiles
        theirs = hf_runner(hf_model, prompts, args.new_tokens) if hf_model is not None else None
        if theirs is not None:
            hf_runner(hf_model, prompts, 4)()  # warm-up
        times: dict[str, list[float]] = {"jax": [], "hf": []}
        for _ in range(args.repeats):  # interleaved, so both see the same machine load; the fastest counts
            seconds, our_tokens = timed(ours)
            times["jax"].append(seconds)
            if theirs is not None:
                seconds, their_tokens = timed(theirs)
                times["hf"].append(seconds)
        tps = {name: batch * args.new_tokens / min(t) for name, t in times.items() if t}
        row = dict(batch=batch, compile_s=warmup - min(times["jax"]), jax_tps=tps["jax"])
        if theirs is not None:
            row.update(hf_tps=tps["hf"], same=float(np.mean(our_tokens == their_tokens)))
        rows.append(row)
        print(row, f"load {os.getloadavg()[0]:.1f}", flush=True)
    print("\n| batch | jaxgpt tokens/s | transformers tokens/s | speed-up | same greedy tokens | jaxgpt compile s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hf = "- | - | -"
        if "hf_tps" in r:
            hf = f"{r['hf_tps']:.1f} | {r['jax_tps'] / r['hf_tps']:.2f}x | {r['same']:.0%}"
        print(f"| {r['batch']} | {r['jax_tps']:.1f} | {hf} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
    run(main)
