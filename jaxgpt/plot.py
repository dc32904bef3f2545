"""Draws a run's loss, learning-rate and (where recorded) bits-per-byte curves from its metrics.jsonl.

Usage: ``python -m jaxgpt.plot out/shakespeare`` writes out/shakespeare/curves.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jaxgpt.checkpoints.run_dir import read_metrics
from jaxgpt.core.cli import ArgumentParser, run

EXTRA_PANELS = (("val_bpb", "val bits per byte"), ("acc_norm", "HellaSwag"))  # drawn when the run logged them


def read_series(out_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for loss, val_loss, lr, val_bpb and acc_norm, skipping records without the key."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_metrics(out_dir):
        for key in ("loss", "val_loss", "lr", "val_bpb", "acc_norm"):
            if record.get(key) is not None:
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(record[key])
    return series


def plot(out_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draws a run's curves from its metrics.jsonl into a PNG (default: OUT_DIR/curves.png); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    series = read_series(out_dir)
    extra = [(key, title) for key, title in EXTRA_PANELS if key in series]
    panels = 2 + len(extra)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for key, label in (("loss", "train"), ("val_loss", "val")):
        if key in series:
            axes[0].plot(*series[key], label=label, marker="o" if key == "val_loss" else None)
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend()
    if "lr" in series:
        axes[1].plot(*series["lr"])
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    for axis, (key, title) in zip(axes[2:], extra, strict=True):
        axis.plot(*series[key], marker="o")
        axis.set(xlabel="step", ylabel=key, title=title)
    fig.tight_layout()
    path = Path(output) if output else out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxgpt.plot OUT_DIR``: writes the PNG and says where."""
    parser = ArgumentParser(prog="python -m jaxgpt.plot", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="a training out_dir holding metrics.jsonl")
    parser.add_argument("--output", default=None, help="PNG path (default: OUT_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot(args.out_dir, args.output)}")


if __name__ == "__main__":
    run(main)
