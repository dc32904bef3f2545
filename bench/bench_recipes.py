"""GPT-2's recipe against the modern one (Muon, rotary, QK-norm, ReLU², untied head...), side by side.

    python -m bench.bench_recipes                          # shakespeare-gpt2 vs shakespeare-modern, 500 steps
    python -m bench.bench_recipes --ablations --steps 120  # leave-one-out: which options carry the gain

Both recipes train from the same seed on the same batches (same batch size and context, so the
same tokens) for the same steps. Validation loss is measured every ``--eval_interval`` steps on the
same validation tokens; wall time counts training steps only (the first, compiling step excluded).
Prints both curves, the step where the modern recipe first reaches the baseline's final loss, and
writes a PNG. ``--ablations`` trains the modern recipe with one option at a time set back to GPT-2's.
Any train.py flag given after ``--`` applies to every run (``-- --batch_size 16``).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import jax

from jaxgpt.train.config import RUN_PRESETS, parse_run_config
from jaxgpt.train.loop import evaluate, next_batch
from jaxgpt.train.setup import setup

BASELINE, MODERN = "shakespeare-gpt2", "shakespeare-modern"  # both GPT-2's tokenizer

# Leave-one-out ablations of the modern recipe: (name, train flags, model fields set back to GPT-2's).
ABLATIONS: list[tuple[str, dict, dict]] = [
    ("AdamW instead of Muon", dict(optimizer="adamw"), {}),
    ("learned positions instead of rotary", {}, dict(position_embedding="learned")),
    ("LayerNorm (scale, bias) instead of RMSNorm", {}, dict(norm="layernorm", norm_scale=True)),
    ("no QK-norm", {}, dict(qk_norm=False)),
    ("GELU instead of ReLU²", {}, dict(activation="gelu")),
    ("tied head", {}, dict(tie_embeddings=True)),
    ("biases back", {}, dict(bias=True)),
    ("GPT-2 init instead of zero-init projections", {}, dict(zero_init_proj=False)),
    ("no logit soft-cap", {}, dict(logit_softcap=0.0)),
]


@dataclasses.dataclass
class Curve:
    name: str
    steps: list[int]
    val_loss: list[float]
    seconds: list[float]  # training wall time at each evaluation

    def first_step_at_or_below(self, loss: float) -> int | None:
        return next((s for s, v in zip(self.steps, self.val_loss, strict=True) if v <= loss), None)


def flags(values: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in values.items()]


def train_curve(name: str, argv: list[str], steps: int, eval_interval: int, out_dir: Path) -> Curve:
    """Trains one recipe for ``steps`` and evaluates it every ``eval_interval`` steps (and at the end)."""
    run_config = parse_run_config([*argv, "--out_dir", str(out_dir), "--max_steps", str(steps)])
    run = setup(run_config)
    curve = Curve(name, [0], [evaluate(run)], [0.0])
    trained = 0.0
    try:
        for step in range(steps):
            start = time.perf_counter()
            run.state, _ = run.step.fn(run.state, next_batch(run))
            jax.block_until_ready(run.state.step)
            if step > 0:  # the first step compiles
                trained += time.perf_counter() - start
            done = step + 1
            if done % eval_interval == 0 or done == steps:
                curve.steps.append(done)
                curve.val_loss.append(evaluate(run))
                curve.seconds.append(trained)
                print(f"  {name:<44} step {done:>4}  val {curve.val_loss[-1]:.4f}  {trained:6.1f} s", flush=True)
    finally:
        run.checkpointer.close()
    return curve


def compare(baseline: Curve, modern: Curve) -> None:
    target = baseline.val_loss[-1]
    reached = modern.first_step_at_or_below(target)
    total = baseline.steps[-1]
    print(f"\n{'step':>6} | {baseline.name + ' val':>18} | {'time':>7} | {modern.name + ' val':>25} | {'time':>7}")
    for i, step in enumerate(baseline.steps):
        print(
            f"{step:>6} | {baseline.val_loss[i]:>18.4f} | {baseline.seconds[i]:>6.1f}s"
            f" | {modern.val_loss[i]:>25.4f} | {modern.seconds[i]:>6.1f}s"
        )
    when = f"step {reached} ({reached / total:.0%} of {total} steps)" if reached else "never"
    every = baseline.steps[1]
    end = modern.val_loss[-1]
    print(f"\n{modern.name} reaches {baseline.name}'s final val loss {target:.4f} at {when} (evaluated every {every})")
    print(f"{modern.name} ends at {end:.4f} ({end - target:+.4f})")
    print(f"wall time of training steps: {baseline.seconds[-1]:.1f} s vs {modern.seconds[-1]:.1f} s")


def plot(curves: list[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for curve in curves:
        axes[0].plot(curve.steps, curve.val_loss, marker="o", markersize=3, label=curve.name)
        axes[1].plot(curve.seconds, curve.val_loss, marker="o", markersize=3, label=curve.name)
    axes[0].set(xlabel="step", ylabel="val loss", title="validation loss vs steps")
    axes[1].set(xlabel="training wall time (s)", ylabel="val loss", title="validation loss vs wall time")
    for ax in axes:
        ax.axhline(curves[0].val_loss[-1], color="gray", linestyle=":", linewidth=1)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def ablate(argv: list[str], steps: int, eval_interval: int, tmp: Path) -> None:
    modern_model = RUN_PRESETS[MODERN][1]
    runs = [(f"{BASELINE} (GPT-2 recipe)", ["--preset", BASELINE]), (f"{MODERN} (all options)", ["--preset", MODERN])]
    for name, train_changes, model_changes in ABLATIONS:
        if all(getattr(modern_model, k) == v for k, v in model_changes.items()) and not train_changes:
            continue  # the option is not on in the preset
        runs.append((f"- {name}", ["--preset", MODERN, *flags(train_changes), *flags(model_changes)]))
    results = []
    for i, (name, preset_argv) in enumerate(runs):
        curve = train_curve(name, [*preset_argv, *argv], steps, eval_interval, tmp / f"ablation{i}")
        results.append((name, curve.val_loss[-1], curve.seconds[-1]))
    full = results[1][1]
    print(f"\nablations: final val loss after {steps} steps (delta vs all options; + means the option helped)")
    print("| run | val loss | delta | train time |\n| --- | --- | --- | --- |")
    for name, loss, seconds in results:
        print(f"| {name} | {loss:.4f} | {loss - full:+.4f} | {seconds:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per recipe (default: 500)")
    parser.add_argument("--eval_interval", type=int, default=25, help="evaluate every N steps (default: 25)")
    parser.add_argument(
        "--data_dir", default="data/shakespeare-gpt2", help="GPT-2 token shards (prepare --tokenizer gpt2)"
    )
    parser.add_argument("--png", default="docs/recipes.png", help="curve plot (default: docs/recipes.png)")
    parser.add_argument("--ablations", action="store_true", help="leave-one-out runs of the modern recipe instead")
    parser.add_argument("train_flags", nargs="*", help="train.py flags for every run, after --")
    args = parser.parse_args()
    argv = ["--data_dir", args.data_dir, "--save_interval", str(10**9), *args.train_flags]
    print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s); {args.steps} steps per run")
    with tempfile.TemporaryDirectory() as tmp:
        if args.ablations:
            ablate(argv, args.steps, args.eval_interval, Path(tmp))
            return
        curves = [
            train_curve(name, ["--preset", name, *argv], args.steps, args.eval_interval, Path(tmp) / name)
            for name in (BASELINE, MODERN)
        ]
    compare(*curves)
    plot(curves, Path(args.png))


if __name__ == "__main__":
    main()
