"""Training throughput: tokens/s and MFU of the train step for a preset and mesh on the current devices.

    python -m bench.bench_train                                   # the shakespeare preset, CPU
    python -m bench.bench_train --preset gpt2-124m-fineweb --batch_size 16 --grad_accum 1   # GPT-2 124M, one GPU

Takes every train.py flag, plus ``--steps`` (timed steps after two warm-up ones) and ``--compare_nnx``
(also time the same update through ``nnx.Optimizer`` + ``nnx.jit``, which walks the object graph
in Python on every call). Data are random token shards written to a temporary directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxgpt.data.meta import index_dataset
from jaxgpt.data.shards import shard_name, write_shard
from jaxgpt.model.gpt import GPT
from jaxgpt.model.losses import cross_entropy
from jaxgpt.train import metrics as metrics_lib
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import next_batch
from jaxgpt.train.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train.setup import setup


def write_random_data(directory: Path, tokens: int, vocab_size: int) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", tokens), ("val", max(tokens // 10, 100_000))):
        write_shard(directory / shard_name("bench", split, 0), rng.integers(0, vocab_size, n, dtype=np.uint16))
    index_dataset(directory)  # the meta.json that training checks shards against


def time_steps(step, steps: int) -> float:
    """Seconds per call of ``step()`` after two warm-up calls (the first compiles)."""
    for _ in range(2):
        jax.block_until_ready(step())
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--compare_nnx", action="store_true", help="also time an nnx.jit + nnx.Optimizer step")
    bench_args, rest = parser.parse_known_args()
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nAll train.py flags are accepted as well (python train.py --help).")
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_run_config([*rest, "--data_dir", f"{tmp}/data", "--out_dir", f"{tmp}/out"])
        tokens_per_step = config.train_config.tokens_per_step(config.model_config.block_size)
        write_random_data(Path(tmp) / "data", max(4 * tokens_per_step, 1_000_000), config.model_config.vocab_size)
        run = setup(config)
        batch = next_batch(run)

        def jit_step():
            run.state, metrics = run.step.fn(run.state, batch)
            return metrics["loss"]

        rows = [("jax.jit over split state (train.py)", time_steps(jit_step, bench_args.steps))]
        if bench_args.compare_nnx:
            rows.append(("nnx.jit + nnx.Optimizer", time_nnx_step(run, batch, bench_args.steps)))
        run.checkpointer.close()

    peak = metrics_lib.peak_flops_per_device(config.train_config.peak_flops)
    devices = run.mesh.devices.size
    model = config.model_config
    print(
        f"\n{jax.devices()[0].device_kind} x{devices} | mesh {dict(run.mesh.shape)} | {model.n_layer}L "
        f"{model.n_embd}d {model.block_size}T {model.dtype} | {tokens_per_step:,} tokens/step | "
        f"{run.flops_per_token / 1e9:.2f} GFLOP/token | peak {peak or 'unknown'}"
    )
    print("| step | ms/step | tokens/s | tokens/s/device | MFU |\n|---|---|---|---|---|")
    for name, seconds in rows:
        tps = tokens_per_step / seconds
        mfu = metrics_lib.mfu(tps, run.flops_per_token, peak, devices)
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a (no peak; pass --peak_flops)"
        print(f"| {name} | {1000 * seconds:.1f} | {tps:,.0f} | {tps / devices:,.0f} | {mfu_text} |")


@nnx.jit(donate_argnums=(0, 1))
def nnx_train_step(model: GPT, optimizer: nnx.Optimizer, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """The update through ``nnx.Optimizer`` and ``nnx.jit``: the object graph is walked in Python every call."""
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(inputs), targets))(model)
    optimizer.update(model, grads)
    return loss


def time_nnx_step(run, batch, steps: int) -> float:
    """The same AdamW update through nnx.Optimizer and nnx.jit (grad_accum folded into the batch)."""
    cfg = run.config
    optimizer_tx = make_optimizer(learning_rate_schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps))
    model = GPT(run.model_config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optimizer_tx, wrt=nnx.Param)
    step = nnx_train_step
    inputs = batch["inputs"].reshape(-1, batch["inputs"].shape[-1])
    targets = batch["targets"].reshape(-1, batch["targets"].shape[-1])
    return time_steps(lambda: step(model, optimizer, inputs, targets), steps)


if __name__ == "__main__":
    main()
