"""Small runs for the training tests: tiny models on token shards the tests write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxgpt.data.meta import index_dataset
from jaxgpt.data.shards import shard_name, write_shard

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
TINY_MODEL = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "16", "--vocab_size", str(VOCAB)]


def write_token_data(directory: Path, train_tokens: int = 20_000, val_tokens: int = 2_000, seed: int = 0) -> Path:
    """Shards of a learnable sequence (a noisy repeating pattern) with ids below VOCAB."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        pattern = np.arange(n) * 7 % 61
        noise = rng.integers(0, VOCAB, n)
        tokens = np.where(rng.random(n) < 0.1, noise, pattern).astype(np.uint16)
        write_shard(directory / shard_name("test", split, 0), tokens)
    index_dataset(directory)  # the meta.json that training checks the shards against
    return directory


def train_args(data_dir: Path, out_dir: Path, *extra: str, tiny_model: bool = True) -> list[str]:
    """Flags of a short run of GPT-2's recipe (``shakespeare-gpt2``: AdamW, GPT-2's architecture);
    ``tiny_model=False`` leaves the model's shape to ``--init_from``."""
    return [
        "--preset", "shakespeare-gpt2",
        "--data_dir", str(data_dir), "--out_dir", str(out_dir), *(TINY_MODEL if tiny_model else []),
        "--batch_size", "8", "--max_steps", "6", "--log_interval", "1", "--eval_interval", "0",
        "--eval_iters", "2", "--save_interval", "100", "--warmup_steps", "2", "--lr", "1e-2",
        "--sample_interval", "1000", *extra,
    ]  # fmt: skip


def run_train_cli(args: list[str], devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def logged_losses(out_dir: Path) -> dict[int, float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
