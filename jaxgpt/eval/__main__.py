"""Evaluate a GPT: validation loss over token shards and/or HellaSwag accuracy.

    python -m jaxgpt.eval --init_from gpt2 --val_data data/fineweb10B --hellaswag
    python -m jaxgpt.eval --init_from out/run1 --hellaswag ~/hellaswag_val.jsonl --results out/evals.jsonl

``--hellaswag`` without a path downloads the validation set once (cached); offline, pass a
local copy. Prints a table and, with ``--results``, appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from jaxgpt.checkpoints.loading import LoadConfig, load_sharded, resolve_init_from
from jaxgpt.core import distributed
from jaxgpt.core.cli import build, parser_for, run
from jaxgpt.core.distributed import LaunchConfig
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.core.sharding import describe
from jaxgpt.data.shards import list_shards
from jaxgpt.eval.hellaswag import evaluate_hellaswag, load_hellaswag
from jaxgpt.eval.loss import evaluate_loss
from jaxgpt.tokenizer import check_same_tokenizer, tokenizer_of

DOWNLOAD = ""  # the value of a bare --hellaswag: the cached download


@dataclasses.dataclass(frozen=True)
class EvalConfig(LoadConfig):
    """Evaluate a GPT: validation loss and HellaSwag accuracy."""

    batch_size: int = option(8, "per step: validation windows of block_size tokens, or HellaSwag items (4 rows)")
    val_data: str | None = option(None, "token shard directory: mean loss and perplexity over its val shards")
    max_tokens: int | None = option(None, "score only the first this many validation tokens; None: all of them")
    hellaswag: str | None = option(None, "HellaSwag jsonl to score; bare --hellaswag downloads it", cli=False)
    results: str | None = option(None, "append one JSON line with the figures of this run to this file")


def format_table(results: dict) -> str:
    """Two aligned columns, metric and value."""
    cells = [(k, f"{v:,}" if isinstance(v, int) else f"{v:.4f}") for k, v in results.items()]
    width = max(len(k) for k, _ in cells)
    value_width = max(len(v) for _, v in cells)
    lines = [f"{'metric':<{width}}  {'value':>{value_width}}", f"{'-' * width}  {'-' * value_width}"]
    return "\n".join([*lines, *(f"{k:<{width}}  {v:>{value_width}}" for k, v in cells)])


def append_results(path: Path, init_from: str, results: dict) -> None:
    """Appends one JSON line (init_from, a UTC timestamp and the figures) to ``path``, to compare runs later."""
    record = {"init_from": init_from, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), **results}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxgpt.eval``: checks every input, then loads and shards the model and prints (and with
    --results appends) the figures."""
    parser = parser_for("python -m jaxgpt.eval", EvalConfig.__doc__, (EvalConfig, None), (LaunchConfig, None))
    parser.add_argument(
        "--hellaswag", nargs="?", const=DOWNLOAD, default=argparse.SUPPRESS, metavar="PATH",
        help="score HellaSwag's validation set: a local jsonl, or no value to download it once (cached)",
    )  # fmt: skip
    namespace = parser.parse_args(argv)
    args, launch = build(EvalConfig, namespace), build(LaunchConfig, namespace)
    if args.val_data is None and args.hellaswag is None:
        raise UserError("nothing to evaluate: pass --val_data DIR and/or --hellaswag [PATH]")
    if args.results is not None and not Path(args.results).parent.is_dir():
        raise UserError(f"--results {args.results}: directory {Path(args.results).parent} does not exist")

    # Check every input before the (slow) model load.
    args = dataclasses.replace(args, init_from=resolve_init_from(args.init_from))
    tokenizer = tokenizer_of(args.init_from)  # the one the run (or exported model) carries; else GPT-2's
    if args.val_data is not None:
        list_shards(args.val_data, "val")
        check_same_tokenizer(tokenizer, tokenizer_of(args.val_data), f"the model {args.init_from}", args.val_data)
    items = None if args.hellaswag is None else load_hellaswag(args.hellaswag or None)
    distributed.initialize(launch)
    main_process = distributed.is_main_process()  # every process computes, process 0 reports
    model, mesh = load_sharded(args.init_from, args.mesh, dtype=args.dtype)

    results: dict = {}
    if args.val_data is not None:
        results |= evaluate_loss(
            model, args.val_data, batch_size=args.batch_size, max_tokens=args.max_tokens, mesh=mesh,
            progress=main_process,
        )  # fmt: skip
    if items is not None:
        hellaswag = dict(batch_size=args.batch_size, mesh=mesh, progress=main_process)
        results |= evaluate_hellaswag(model, items, tokenizer, **hellaswag)
    if not main_process:
        return
    print(f"{args.init_from}, mesh {describe(mesh)}, {args.dtype}")
    print(format_table(results))
    if args.results is not None:
        append_results(Path(args.results), args.init_from, results)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    run(main)
