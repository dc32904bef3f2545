"""The training loop: step, and every so often log, run the hooks (evaluate, sample, HellaSwag) and checkpoint.

Everything a step needs is built once in ``train.setup``; :func:`train` is the loop, and periodic
work is registered on :class:`Hooks` (``add_hook(fn, every=N)``).
A run is resumable at any checkpoint: the step, parameters, optimizer moments,
RNG and the data iterator's position are restored, so a resumed run takes the
same batches and learning rates as one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxgpt.checkpoints.run_dir import MetricsWriter, RunLock
from jaxgpt.core import distributed
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import accumulated_batch_sharding
from jaxgpt.data.pipeline import iterator_state
from jaxgpt.eval.hellaswag import HellaSwagItem, evaluate_hellaswag, load_hellaswag
from jaxgpt.eval.loss import bits_per_byte, evaluate_loss
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.generate import generate
from jaxgpt.train import metrics
from jaxgpt.train.config import RunConfig, TrainConfig
from jaxgpt.train.lifecycle import removed_if_left_empty, summary
from jaxgpt.train.profiling import StepProfiler, parse_profile_steps
from jaxgpt.train.setup import Run, describe, setup
from jaxgpt.train.step import Objective
from jaxgpt.train.tracking import open_trackers


class NonFiniteError(UserError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left intact."""


def next_batch(run: Run) -> dict[str, jax.Array]:
    """``grad_accum`` micro-batches from the iterator, stacked to [grad_accum, batch, T] and sharded."""
    micro = [next(run.data_iter) for _ in range(run.config.grad_accum)]
    sharding = accumulated_batch_sharding(run.mesh)
    return {  # inputs and targets int32, chat data's weights float32: as the pipeline made them
        key: jax.make_array_from_process_local_data(sharding, np.stack([m[key] for m in micro])) for key in micro[0]
    }


def current_model(run: Run) -> GPT:
    """The model of the current parameters (no copy: it reads the state's arrays)."""
    return run.codec.to_model(run.state.params)


def evaluate(run: Run) -> float:
    """Mean validation loss over the first ``eval_iters`` batches of examples (always the same tokens;
    chat data: the assistants' tokens only)."""
    cfg, model = run.config, current_model(run)
    result = evaluate_loss(model, cfg.data_dir, batch_size=cfg.batch_size, max_batches=cfg.eval_iters, mesh=run.mesh)
    return result["val_loss"]


def validation(run: Run) -> dict[str, float]:
    """What an evaluation logs: ``val_loss`` and, for text data, its bits per byte (comparable across
    tokenizers), or an objective's own metrics on the val split (DPO: its loss and rewards on the first
    ``eval_iters`` batches of val pairs)."""
    if run.objective is None:
        loss = evaluate(run)
        return {"val_loss": loss, **bits_per_byte(loss, run.config.data_dir)}
    cfg, args = run.config, (run.codec, run.state.params, run.reference, run.config.data_dir)
    return run.objective.evaluate(*args, batch_size=cfg.batch_size, max_batches=cfg.eval_iters, mesh=run.mesh)


def sample_text(run: Run, num_tokens: int, seed: int) -> str:
    """A sample from end-of-text with the current weights (top-k 200, temperature 0.8, as nanoGPT)."""
    num_tokens = min(num_tokens, run.model_config.block_size - 1)  # the prompt is one token
    key = jax.random.key(seed)
    eot = run.tokenizer.eot_id
    start = eot if run.model_config.vocab_size > eot else 0  # a small test vocabulary has no EOT
    model, mesh = current_model(run), run.mesh
    out = generate(
        model, [[start]], num_tokens, temperature=0.8, top_k=200, key=key, stop_at_eot=False, mesh=mesh, eot_id=eot
    )
    return run.tokenizer.decode([t for t in out[0] if t < run.tokenizer.vocab_size])  # padded rows are never text


def hellaswag_scores(run: Run, items: list[HellaSwagItem]) -> dict[str, float]:
    """HellaSwag accuracies of the current weights on ``items``."""
    scores = evaluate_hellaswag(current_model(run), items, run.tokenizer, mesh=run.mesh, progress=False)
    return {"acc": scores["acc"], "acc_norm": scores["acc_norm"]}


def check_finite(run: Run) -> None:
    """Stops the run with one line if a step's loss or gradient was NaN/Inf (that update was skipped)."""
    bad = int(run.state.first_bad_step)
    if bad >= 0:
        last = run.checkpointer.latest_step()
        kept = f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint was written"
        raise NonFiniteError(
            f"the loss or gradient became NaN/Inf at step {bad + 1}; stopped, {kept} in {run.config.out_dir}. "
            "Lower --lr, raise --warmup_steps, or train in float32 to find the cause."
        )


def save(run: Run, val_loss: float | None) -> None:
    """Checkpoints the state, the data position and the configs (asynchronously), never a bad state."""
    check_finite(run)  # never checkpoint a state that went bad
    run.checkpointer.save(
        run.state,
        data_state=iterator_state(run.data_iter, run.data),
        meta={"model": run.model_config.to_dict(), "train": run.config.to_dict()},
        val_loss=val_loss,
    )


def format_record(record: dict[str, Any], max_steps: int) -> str:
    """The log line of a step's record: only the figures it has."""
    parts = [f"step {record['step']:>6}/{max_steps}"]
    formats = {
        "loss": "loss {:.4f}", "val_loss": "val {:.4f}", "val_bpb": "bpb {:.4f}", "lr": "lr {:.2e}",
        "grad_norm": "grad {:.3f}",
        "step_ms": "{:.1f} ms", "tokens_per_s": "{:,.0f} tok/s", "mfu": "mfu {:.1%}", "acc_norm": "hellaswag {:.4f}",
    }  # fmt: skip
    parts += [fmt.format(record[key]) for key, fmt in formats.items() if record.get(key) is not None]
    return " | ".join(parts)


class StepTimer:
    """Tokens/s and MFU over the training steps since the last reset (evaluation and saving are not counted)."""

    def __init__(self, run: Run, step: int):
        self.tokens_per_step = run.config.tokens_per_step(run.model_config.block_size)
        self.flops_per_token, self.devices = run.flops_per_token, run.mesh.devices.size
        self.peak = metrics.peak_flops_per_device(run.config.peak_flops)
        self.reset(step)

    def reset(self, step: int) -> None:
        """Starts timing again from ``step`` (after work that is not training)."""
        self.step, self.start = step, time.perf_counter()

    def rates(self, step: int) -> dict[str, float | None]:
        """Step time, tokens/s and MFU since the last reset."""
        steps, elapsed = step - self.step, time.perf_counter() - self.start
        if steps <= 0:
            return {}
        tokens_per_s = steps * self.tokens_per_step / elapsed
        mfu = metrics.mfu(tokens_per_s, self.flops_per_token, self.peak, self.devices)
        return {"step_ms": 1000 * elapsed / steps, "tokens_per_s": tokens_per_s, "mfu": mfu}


def due(step: int, interval: int, last: bool) -> bool:
    """Whether an every-``interval``-steps action runs after ``step`` (0: only at the last step)."""
    return last or (interval > 0 and step % interval == 0)


@dataclasses.dataclass(frozen=True)
class Hook:
    """One periodic action of the loop."""

    fn: Callable[[int], dict[str, Any] | None]  # step -> what it adds to the step's record
    every: int  # steps between runs; 0: only after the last step
    at_end: bool  # also after the last step


class Hooks:
    """Periodic actions, as Levanter's ``add_hook(fn, every=N)``: each runs after every ``every``-th step
    (and after the last one unless ``at_end=False``), in the order added, and returns what it adds to
    that step's record (``metrics.jsonl``, the log line, the trackers)."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []

    def add_hook(self, fn: Callable[[int], dict[str, Any] | None], *, every: int, at_end: bool = True) -> None:
        """Runs ``fn(step)`` after every ``every``-th step (0: only at the end) and, with ``at_end``, after the last."""
        self._hooks.append(Hook(fn, every, at_end))

    def due(self, step: int, last: bool) -> list[Hook]:
        """The hooks to run after ``step``, in the order they were added."""
        return [hook for hook in self._hooks if due(step, hook.every, last and hook.at_end)]


def train(run_config: RunConfig, objective: Objective | None = None) -> dict[str, Any]:
    """Runs (or resumes) training to ``max_steps``; returns the last logged record.

    The run directory is locked for the whole run (on process 0), so two runs never share one.
    """
    distributed.initialize(run_config.launch_config)  # before anything touches a device
    out_dir = run_config.train_config.out_dir
    lock = RunLock(out_dir) if distributed.is_main_process() else contextlib.nullcontext()
    with removed_if_left_empty(out_dir), lock:  # a run that fails to start leaves no empty folder
        return _train(run_config, objective)


def default_hooks(run: Run, say: Callable[[str], None], trackers: Any) -> Hooks:
    """Evaluation at every ``eval_interval``, a sample (at each evaluation unless ``sample_interval``),
    HellaSwag at every ``hellaswag_interval``."""
    cfg, hooks = run.config, Hooks()
    hooks.add_hook(lambda step: validation(run), every=cfg.eval_interval)

    def print_sample(step: int) -> None:
        if cfg.sample_tokens:
            text = sample_text(run, cfg.sample_tokens, cfg.seed + step)
            say(f"--- sample at step {step} ---\n{text}\n---")
            trackers.log_text(step, "sample", text)

    hooks.add_hook(print_sample, every=cfg.sample_interval or cfg.eval_interval, at_end=not cfg.sample_interval)
    if cfg.hellaswag_interval:
        items = _hellaswag_items(cfg)
        hooks.add_hook(lambda step: hellaswag_scores(run, items), every=cfg.hellaswag_interval)
    return hooks


def _train(run_config: RunConfig, objective: Objective | None) -> dict[str, Any]:
    began = time.perf_counter()
    run = setup(run_config, objective=objective)
    cfg = run.config
    is_main = distributed.is_main_process()
    writer = MetricsWriter(cfg.out_dir, enabled=is_main)
    start = int(run.state.step)
    writer.truncate_after(start)
    configs = {"model": run.model_config.to_dict(), "train": cfg.to_dict()}
    try:
        trackers = open_trackers(
            cfg.out_dir, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project, configs=configs,
            start_step=start, enabled=is_main,
        )  # fmt: skip
    except BaseException:
        run.checkpointer.close()
        raise
    profiler = StepProfiler(parse_profile_steps(cfg.profile_steps), cfg.out_dir, enabled=is_main)
    say = tqdm.write if is_main else lambda _: None
    say(describe(run))
    hooks = default_hooks(run, say, trackers)

    timer = StepTimer(run, start)
    record: dict[str, Any] = {}
    # disable=None: no bar unless stderr is a terminal, so logs written to a file are plain lines
    bar = tqdm(total=cfg.max_steps, initial=start, disable=None if is_main else True, unit="step", dynamic_ncols=True)
    try:
        for step in range(start, cfg.max_steps):
            with profiler.step(step):
                run.state, step_metrics = run.step.fn(run.state, next_batch(run))
            profiler.step_done(step, run.state)
            run.checkpointer.check_save()  # a failed background save stops the run at once
            done, last = step + 1, step + 1 == cfg.max_steps
            bar.update(1)
            record = {}
            if due(done, cfg.log_interval, last):
                record.update(jax.device_get(step_metrics), **timer.rates(done))
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            due_hooks = hooks.due(done, last)
            if record or due_hooks:
                check_finite(run)
            for hook in due_hooks:
                record.update(hook.fn(done) or {})
            if record:
                record["step"] = done
                writer.write(record)
                trackers.log(record)
                say(format_record(record, cfg.max_steps))
            saving = due(done, cfg.save_interval, last)
            if saving:
                save(run, record.get("val_loss"))
            if due_hooks or saving or step == start:  # time only training steps: the first one compiles
                jax.block_until_ready(run.state.step)
                timer.reset(done)
    finally:
        bar.close()
        profiler.stop()
        trackers.close()
        run.checkpointer.close()  # waits for the last asynchronous save: never exit with half a checkpoint
    if is_main:
        steps = cfg.max_steps - start
        print(summary(cfg.out_dir, time.perf_counter() - began, steps, steps * timer.tokens_per_step, run.checkpointer))
    return record


def _hellaswag_items(cfg: TrainConfig) -> list[HellaSwagItem]:
    items = load_hellaswag(cfg.hellaswag_path)
    return items[: cfg.hellaswag_items] if cfg.hellaswag_items else items
