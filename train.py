"""Train or fine-tune a GPT: ``python train.py --help`` lists every flag with its default.

python -m jaxgpt.data.prepare --input ../shared/data/tinyshakespeare.txt --out_dir data/shakespeare
python train.py                                   # the small 'shakespeare' preset, CPU or one GPU
python train.py --preset gpt2-124m-fineweb --mesh=8x1   # GPT-2 124M on 8 GPUs
python train.py --preset dpo --init_from out/sft --data_dir data/preference   # DPO after SFT
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxgpt.core.cli import run
from jaxgpt.rl import objective_for
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import train


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_run_config(argv)
    train(config, objective_for(config.train_config))


if __name__ == "__main__":
    run(main)
