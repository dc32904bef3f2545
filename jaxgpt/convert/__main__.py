"""Convert GPT-2 weights between Hugging Face format and jaxgpt checkpoints.

python -m jaxgpt.convert --src gpt2 --dst out/gpt2-hf     # hub id (online) or local HF dir
python -m jaxgpt.convert --src out/shakespeare --dst out/hf  # a training checkpoint -> HF
python -m jaxgpt.convert --src gpt2 --dst out/gpt2-ckpt --format jaxgpt  # HF -> our checkpoint
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from jaxgpt.checkpoint import save_model
from jaxgpt.cli import parse, run
from jaxgpt.convert import save_hf_gpt2
from jaxgpt.loading import load_model
from jaxgpt.options import option


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Convert GPT-2 weights between Hugging Face format and jaxgpt checkpoints."""

    src: str = option("gpt2", "source: HF hub id (gpt2, gpt2-medium...), HF directory, or jaxgpt checkpoint dir")
    dst: str = option("out/gpt2-hf", "destination directory")
    format: Literal["hf", "jaxgpt"] = option("hf", "destination format: hf (transformers) or jaxgpt (Orbax)")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(ConvertConfig, argv, prog="python -m jaxgpt.convert")
    model = load_model(args.src)
    out = save_hf_gpt2(model, args.dst) if args.format == "hf" else save_model(model, args.dst)
    print(f"wrote {args.format} weights of a {model.config.n_layer}-layer GPT to {out}")


if __name__ == "__main__":
    run(main)
