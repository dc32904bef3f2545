"""Data benchmark: preparation tokens/s and pipeline batches/s at GPT-2 124M's training shape.

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken python -m bench.bench_data   # from the repo root

(a) runs ``python -m jaxgpt.data.prepare`` on tiny Shakespeare repeated to about
``--size_mb`` MB (one text file, streamed in pieces) with each ``--num_procs``; (b) reads training
batches of ``--global_batch_size`` x ``--block_size`` from the result (its page
cache is warm: this measures the pipeline, not the disk) for each
``--worker_counts``. An H100 trains GPT-2 124M at about 470K tokens/s; the
pipeline should deliver 10x that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxgpt.core import cli
from jaxgpt.core.options import option
from jaxgpt.data.pipeline import DataConfig, make_train_iterator

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Data preparation and input pipeline throughput."""

    text: str = option(str(SHAKESPEARE), "text file repeated to make the corpus")
    size_mb: int = option(100, "corpus size in MB")
    num_procs: str = option("1,2", "comma-separated --num_proc values to time preparation with")
    block_size: int = option(1024, "tokens per example")
    global_batch_size: int = option(16, "examples per batch")
    worker_counts: str = option("0,2,4", "comma-separated reader thread counts to time the pipeline with")
    batches: int = option(3000, "batches timed per pipeline setting (after 50 warm-up batches)")
    id_checks: str = option("on,off", "time the pipeline with (on) and without (off) the per-batch vocabulary check")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def bench_prepare(config: BenchConfig, work: Path) -> tuple[list[list[str]], Path]:
    text = Path(config.text).read_text(encoding="utf-8")
    corpus = work / "corpus.txt"
    corpus.write_text(text * max(1, round(config.size_mb * 1e6 / len(text.encode()))), encoding="utf-8")
    megabytes = corpus.stat().st_size / 1e6
    rows, out_dir = [], work / "shards"
    for num_proc in ints(config.num_procs):
        command = [sys.executable, "-m", "jaxgpt.data.prepare", "--input", str(corpus), "--out_dir", str(out_dir)]
        start = time.perf_counter()  # the command as users run it: start-up and tokenizer loading included
        subprocess.run([*command, "--num_proc", str(num_proc)], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        meta = json.loads((out_dir / "meta.json").read_text())
        tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
        rows.append([f"prepare, --num_proc {num_proc}", f"{megabytes:.0f} MB -> {tokens / 1e6:.1f}M tokens"])
        rows[-1] += [f"{seconds:.1f} s", f"{megabytes / seconds:.1f} MB/s", f"{tokens / seconds / 1e6:.2f}M tok/s"]
    return rows, out_dir


def bench_pipeline(config: BenchConfig, data_dir: Path) -> list[list[str]]:
    rows = []
    settings = [(w, c) for w in ints(config.worker_counts) for c in config.id_checks.split(",") if c.strip()]
    for workers, check in settings:
        assert check in ("on", "off"), check
        data = DataConfig(
            data_dir=str(data_dir),
            block_size=config.block_size,
            global_batch_size=config.global_batch_size,
            data_workers=workers,
            prefetch=4 * max(1, workers),
            vocab_size=50257 if check == "on" else None,
        )
        it = make_train_iterator(data, process_index=0, process_count=1)
        for _ in range(50):
            next(it)
        start = time.perf_counter()
        for _ in range(config.batches):
            batch = next(it)
        seconds = time.perf_counter() - start
        assert batch["inputs"].shape == (config.global_batch_size, config.block_size)
        tokens = config.batches * config.global_batch_size * config.block_size
        shape = f"{config.global_batch_size} x {config.block_size}, {config.batches} batches"
        rows.append([f"pipeline, data_workers {workers}, id check {check}", shape, f"{seconds:.2f} s"])
        rows[-1] += [f"{config.batches / seconds:,.0f} batches/s", f"{tokens / seconds / 1e6:.1f}M tok/s"]
        it.close()
    return rows


def print_table(rows: list[list[str]]) -> None:
    header = ["what", "work", "time", "rate", "tokens/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    config = cli.parse(BenchConfig, argv, prog="python -m bench.bench_data")
    print(f"CPU cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        rows, data_dir = bench_prepare(config, Path(tmp))
        rows += bench_pipeline(config, data_dir)
    print_table(rows)


if __name__ == "__main__":
    cli.run(main)
