"""Convert GPT-2 weights between Hugging Face format and jaxgpt checkpoints.

python -m jaxgpt.convert --src gpt2 --dst out/gpt2-hf     # hub id (online) or local HF dir
python -m jaxgpt.convert --src out/shakespeare --dst out/hf  # a training checkpoint -> HF
python -m jaxgpt.convert --src gpt2 --dst out/gpt2-ckpt --format jaxgpt  # HF -> our checkpoint
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from jaxgpt.checkpoints.loading import load_model, save_model
from jaxgpt.checkpoints.run_dir import is_run_dir
from jaxgpt.convert import save_hf_gpt2
from jaxgpt.convert.hf_tokenizer import save_hf_tokenizer
from jaxgpt.core.cli import parse, run
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.core.swap import replace_dir, staging_dir
from jaxgpt.tokenizer import tokenizer_of


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Convert GPT-2 weights between Hugging Face format and jaxgpt checkpoints."""

    src: str = option("gpt2", "source: HF hub id (gpt2, gpt2-medium...), HF directory, or jaxgpt checkpoint dir")
    dst: str = option("out/gpt2-hf", "destination directory")
    format: Literal["hf", "jaxgpt"] = option("hf", "destination format: hf (transformers) or jaxgpt (Orbax)")
    overwrite: bool = option(False, "replace --dst when it already holds files (a training run's included)")


def check_destination(dst: Path, overwrite: bool) -> None:
    """A destination that holds anything (a training run above all) is replaced only when asked."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {dst} is a file; pass a directory path")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        what = "a training run (its checkpoints would be lost)" if is_run_dir(dst) else "files"
        raise UserError(f"--dst {dst} already holds {what}; pick another --dst, or pass --overwrite to replace it")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxgpt.convert``: loads ``--src`` and writes it to ``--dst`` in the asked format, built aside
    and swapped in whole."""
    args = parse(ConvertConfig, argv, prog="python -m jaxgpt.convert")
    dst = Path(args.dst)
    check_destination(dst, args.overwrite)
    model = load_model(args.src)
    tokenizer = tokenizer_of(args.src)  # a run's own tokenizer goes with its weights
    staged = staging_dir(dst, "converting")  # written aside, then swapped in whole: never half a destination
    shutil.rmtree(staged, ignore_errors=True)
    try:
        if args.format == "hf":
            save_hf_gpt2(model, staged)
        else:
            save_model(model, staged)
        if not tokenizer.is_gpt2:
            tokenizer.save(staged)  # jaxgpt (sample.py, eval, --init_from) reads it from either format
            if args.format == "hf":
                save_hf_tokenizer(tokenizer, staged, model.config.block_size)
        replace_dir(staged, dst)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"wrote {args.format} weights of a {model.config.n_layer}-layer GPT to {dst}")


if __name__ == "__main__":
    run(main)
