"""Serving throughput: the continuous-batching server next to a naive one (transformers, one request at a time).

GPT-2 124M with random weights. ``clients`` concurrent streaming clients each ask for ``new_tokens``
greedy tokens (``ignore_eos``) after a random ``prompt_len``-token prompt, over HTTP to the server
running in this process (``python -m jaxgpt.serve``'s app on loopback). Reported: aggregate tokens/s
(all new tokens over the wall time), time to first token and inter-token latency (p50/p99), and
the same at one client. The naive server is transformers' ``generate`` (KV cache, greedy) answering
the same requests one after another, as a server without batching does; its tokens/s is measured on
``naive_requests`` of them. The last row is ``jaxgpt.sampling.generate`` alone for a single request,
streaming each token as it comes (``on_token``), the path ``sample.py`` runs by default.

    python -m bench.bench_serve                          # a few minutes on 2 CPU cores
    python -m bench.bench_serve --clients 8 --naive_requests 2
    python -m bench.bench_serve --max_model_len 1024    # the engine's cache as long as the server's default
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
import time

import httpx
import jax
import numpy as np
from flax import nnx

from bench.bench_sample import hf_runner, timed
from jaxgpt.convert import save_hf_gpt2
from jaxgpt.core.cli import parse, run
from jaxgpt.core.options import option
from jaxgpt.model.config import DType, preset
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.generate import generate
from jaxgpt.serve.app import create_app, serve_in_thread
from jaxgpt.serve.engine import Engine
from jaxgpt.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class BenchServeConfig:
    """Benchmark the server's aggregate throughput and latency against transformers one request at a time."""

    clients: int = option(32, "concurrent streaming clients (also the engine's --max_batch)")
    requests_per_client: int = option(1, "requests each client sends, one after another")
    prompt_len: int = option(32, "prompt tokens per request")
    new_tokens: int = option(64, "new tokens per request")
    max_model_len: int | None = option(
        None, "the engine's longest prompt + completion (none: prompt_len + new_tokens; the server's default is 1024)"
    )
    dtype: DType = option("float32", "jaxgpt compute dtype")
    naive_requests: int = option(4, "requests the naive transformers server answers (its tokens/s is per request)")
    threads: int = option(2, "torch CPU threads (match the cores XLA uses)")
    seed: int = option(0, "seed of the weights and the prompts")


def percentiles(values: list[float]) -> str:
    return f"{np.percentile(values, 50) * 1e3:.0f} / {np.percentile(values, 99) * 1e3:.0f}"


async def client_run(url: str, prompts: np.ndarray, new_tokens: int, clients: int) -> dict:
    """Every prompt streamed by ``clients`` concurrent clients; tokens/s, TTFT and ITL."""
    ttft, itl, tokens = [], [], 0
    queue = list(prompts.tolist())

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            body = {"prompt": queue.pop(), "max_tokens": new_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}  # fmt: skip
            last = None
            sent = time.perf_counter()
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line.removeprefix("data: "))["choices"]:
                        now = time.perf_counter()
                        (ttft if last is None else itl).append(now - (sent if last is None else last))
                        last, tokens = now, tokens + 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(one_client(client) for _ in range(clients)))
    seconds = time.perf_counter() - start
    return dict(tokens_per_s=tokens / seconds, ttft=percentiles(ttft), itl=percentiles(itl), seconds=seconds)


class _Rows(dict):
    """The results, each printed as it is measured (a long run on a busy machine shows what it has)."""

    def __setitem__(self, name: str, row: dict) -> None:
        super().__setitem__(name, row)
        print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def main(argv=None) -> None:
    args = parse(BenchServeConfig, argv, prog="python -m bench.bench_serve")
    model = GPT(preset("gpt2", dtype=args.dtype), nnx.Rngs(args.seed))
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, 50256, (args.clients * args.requests_per_client, args.prompt_len)).astype(np.int32)
    print(f"GPT-2 124M, {args.dtype}, {jax.devices()[0].platform} ({os.cpu_count()} cores), {args.clients} clients, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    start = time.perf_counter()
    engine = Engine(
        model,
        load_tokenizer(),
        max_batch=args.clients,
        max_queue=4 * args.clients,
        max_len=args.max_model_len or args.prompt_len + args.new_tokens,
    )
    engine.start()
    warmup = time.perf_counter() - start
    print(f"engine warm-up ({len(engine.buckets)} prefills, {len(engine.step_shapes)} steps compiled): {warmup:.1f} s")
    rows = _Rows()
    with serve_in_thread(create_app(engine, "gpt2-random", "random")) as url:
        asyncio.run(client_run(url, prompts[:1], args.new_tokens, 1))  # warm the HTTP path
        rows["served"] = asyncio.run(client_run(url, prompts, args.new_tokens, args.clients))
        rows["served, 1 client"] = asyncio.run(client_run(url, prompts[:2], args.new_tokens, 1))
    engine.stop()
    streamed = lambda: generate(
        model, prompts[:1], args.new_tokens, temperature=0, stop_at_eot=False, on_token=lambda row, token: None
    )
    streamed()  # compiles
    seconds, _ = timed(streamed)
    rows["sample.py decode (jaxgpt.sampling.generate, 1 request)"] = dict(tokens_per_s=args.new_tokens / seconds)
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = GPT2LMHeadModel.from_pretrained(save_hf_gpt2(model, tmp)).eval()
    hf_runner(hf_model, prompts[:1], 4)()  # warm-up
    total = sum(timed(hf_runner(hf_model, prompts[i : i + 1], args.new_tokens))[0] for i in range(args.naive_requests))
    rows["naive (transformers generate, one request at a time)"] = dict(
        tokens_per_s=args.naive_requests * args.new_tokens / total
    )
    naive = rows["naive (transformers generate, one request at a time)"]["tokens_per_s"]
    print(f"\nload {os.getloadavg()[0]:.1f}\n")
    print("| server | aggregate tokens/s | vs naive | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for name, r in dict(rows).items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / naive:.2f}x | {r.get('ttft', '-')} | "
              f"{r.get('itl', '-')} |")  # fmt: skip


if __name__ == "__main__":
    run(main)
