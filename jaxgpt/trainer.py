"""The training loop: set up mesh, model, optimizer and data; step, log, evaluate, checkpoint.

Everything a step needs is built once in :func:`setup`; :func:`train` is the loop.
A run is resumable at any checkpoint: the step, parameters, optimizer moments,
RNG and the data iterator's position are restored, so a resumed run takes the
same batches and learning rates as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxgpt import metrics as metrics_lib
from jaxgpt.checkpoint import Checkpointer, read_run_file, write_run_file
from jaxgpt.config import GPTConfig
from jaxgpt.data.pipeline import DataConfig, iterator_state, make_train_iterator, restore_iterator
from jaxgpt.errors import UserError
from jaxgpt.loading import load_model
from jaxgpt.model import GPT, non_embedding_params
from jaxgpt.optim import learning_rate_schedule, make_optimizer
from jaxgpt.params import ParamCodec
from jaxgpt.sharding import check_batch_divisible, make_mesh
from jaxgpt.train_config import SHAPE_FIELDS, RunConfig, TrainConfig
from jaxgpt.train_step import (
    TrainState,
    accumulated_batch_sharding,
    init_train_state,
    jit_train_step,
    make_train_step,
    train_state_shardings,
)


class NonFiniteError(UserError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left intact."""


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    train: TrainConfig
    model: GPTConfig
    mesh: Mesh
    codec: ParamCodec
    state: TrainState
    step_fn: Any
    data: DataConfig
    data_iter: Any
    checkpointer: Checkpointer
    flops_per_token: float
    resumed_from: int | None


def _pretrained(run: RunConfig) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Weights to fine-tune from: the checkpoint fixes the shapes, the command line the rest."""
    keep = ("dropout", "dtype", "pad_vocab_multiple", "attention", "remat", "param_dtype")
    pretrained = load_model(run.train.init_from, **{k: getattr(run.model, k) for k in keep})
    config = pretrained.config
    params = {k: np.asarray(v) for k, v in ParamCodec(config).to_flat(pretrained).items()}
    block_size = run.model.block_size if "block_size" in run.model_flags else config.block_size
    if block_size > config.block_size:
        raise UserError(f"--block_size {block_size} exceeds the pretrained model's context ({config.block_size})")
    if block_size < config.block_size:  # nanoGPT's crop_block_size: keep the first positions
        params["wpe.embedding"] = params["wpe.embedding"][:block_size]
        config = config.replace(block_size=block_size)
    return config, params


def _resumed_config(run: RunConfig) -> GPTConfig:
    """The run's stored model config; shape flags that contradict it are an error, others apply."""
    stored = GPTConfig.from_dict(read_run_file(run.train.out_dir)["model"])
    shape = (*SHAPE_FIELDS, "block_size", "pad_vocab_multiple")
    changed = [f for f in shape if f in run.model_flags and getattr(run.model, f) != getattr(stored, f)]
    if changed:
        stored_values = ", ".join(f"{f}={getattr(stored, f)}" for f in changed)
        raise UserError(
            f"{run.train.out_dir} holds a checkpoint of a model with {stored_values}; "
            "drop those flags to resume, or pick a new --out_dir"
        )
    return stored.replace(**{k: getattr(run.model, k) for k in run.model_flags if k not in shape})


def setup(run: RunConfig, devices: list | None = None) -> Run:
    """Builds the run; ``devices`` (default: all) is what ``--mesh`` must cover exactly."""
    cfg = run.train
    if cfg.distributed:  # every host runs the same command; JAX finds its peers from the cluster's environment
        jax.distributed.initialize()
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_divisible(cfg.batch_size, mesh, "--batch_size")
    checkpointer = Checkpointer(cfg.out_dir, keep_last=cfg.keep_checkpoints)
    try:
        return _build(run, cfg, mesh, checkpointer)
    except BaseException:
        checkpointer.close()  # a failed setup must not leave Orbax's background threads behind
        raise


def _build(run: RunConfig, cfg: TrainConfig, mesh: Mesh, checkpointer: Checkpointer) -> Run:
    latest = checkpointer.latest_step()
    model_config, pretrained = run.model, None
    if latest is not None:
        model_config = _resumed_config(run)
    elif cfg.init_from != "scratch":
        model_config, pretrained = _pretrained(run)
    elif cfg.resume:
        print(f"--resume: no checkpoint in {cfg.out_dir} yet, starting from scratch")

    data = DataConfig(
        data_dir=cfg.data_dir,
        block_size=model_config.block_size,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        worker_count=cfg.data_workers,
    )
    codec = ParamCodec(model_config)
    schedule = learning_rate_schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps)
    tx = make_optimizer(
        schedule, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, grad_clip=cfg.grad_clip
    )
    shardings = train_state_shardings(codec, tx, mesh, cfg.fsdp)
    if latest is not None:  # restore into shapes only: nothing is initialised just to be overwritten
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx, cfg.seed), codec.abstract)
        state, data_state = checkpointer.restore(latest, abstract, shardings)
        data_iter = restore_iterator(data, data_state)
    else:
        data_iter = make_train_iterator(data)  # checks the data before anything is compiled
        if pretrained is not None:
            params = jax.device_put(pretrained, shardings.params)
        else:
            params = codec.init(cfg.seed, shardings.params)
        state = jax.jit(lambda p: init_train_state(p, tx, cfg.seed), out_shardings=shardings)(params)
        write_run_file(cfg.out_dir, model_config, cfg.to_dict())

    abstract_model = nnx.eval_shape(lambda: GPT(model_config, nnx.Rngs(0)))
    return Run(
        train=cfg,
        model=model_config,
        mesh=mesh,
        codec=codec,
        state=state,
        step_fn=jit_train_step(make_train_step(codec, tx, schedule), shardings, mesh),
        data=data,
        data_iter=data_iter,
        checkpointer=checkpointer,
        flops_per_token=metrics_lib.flops_per_token(model_config, non_embedding_params(abstract_model)),
        resumed_from=latest,
    )


def next_batch(run: Run) -> dict[str, jax.Array]:
    """``grad_accum`` micro-batches from the iterator, stacked to [grad_accum, batch, T] and sharded."""
    micro = [next(run.data_iter) for _ in range(run.train.grad_accum)]
    sharding = accumulated_batch_sharding(run.mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.stack([m[key] for m in micro]).astype(np.int32))
        for key in ("inputs", "targets")
    }


def evaluate(run: Run) -> float:
    """Mean validation loss over the first ``eval_iters`` batches of windows (always the same tokens)."""
    from jaxgpt.eval.loss import evaluate_loss

    t, cfg = run.model.block_size, run.train
    model = run.codec.to_model(run.state.params)
    result = evaluate_loss(
        model, cfg.data_dir, batch_size=cfg.batch_size, max_tokens=cfg.eval_iters * cfg.batch_size * t, mesh=run.mesh
    )
    return result["val_loss"]


def check_finite(run: Run) -> None:
    bad = int(run.state.first_bad_step)
    if bad >= 0:
        last = run.checkpointer.latest_step()
        kept = f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint was written"
        raise NonFiniteError(
            f"the loss or gradient became NaN/Inf at step {bad + 1}; stopped, {kept} in {run.train.out_dir}. "
            "Lower --lr, raise --warmup_steps, or train in float32 to find the cause."
        )


def sample_text(run: Run, num_tokens: int, seed: int) -> str:
    """A sample from end-of-text with the current weights (top-k 200, temperature 0.8, as nanoGPT)."""
    from jaxgpt.sampling import generate
    from jaxgpt.tokenizer import EOT_ID, get_tokenizer

    model = run.codec.to_model(run.state.params)
    num_tokens = min(num_tokens, run.model.block_size - 1)  # the prompt is one token
    out = generate(
        model, [[EOT_ID]], num_tokens, temperature=0.8, top_k=200, key=jax.random.key(seed), stop_at_eot=False
    )
    return get_tokenizer().decode(out[0])


def format_record(record: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {record['step']:>6}/{max_steps}"]
    formats = {
        "loss": "loss {:.4f}", "val_loss": "val {:.4f}", "lr": "lr {:.2e}", "grad_norm": "grad {:.3f}",
        "step_ms": "{:.1f} ms", "tokens_per_s": "{:,.0f} tok/s", "mfu": "mfu {:.1%}", "acc_norm": "hellaswag {:.4f}",
    }  # fmt: skip
    parts += [fmt.format(record[key]) for key, fmt in formats.items() if record.get(key) is not None]
    return " | ".join(parts)


def train(run_config: RunConfig) -> dict[str, Any]:
    """Runs (or resumes) training to ``max_steps``; returns the last logged record."""
    run = setup(run_config)
    cfg = run.train
    is_main = jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(cfg.out_dir, enabled=is_main)
    start = int(run.state.step)
    writer.truncate_after(start)
    tokens_per_step = cfg.tokens_per_step(run.model.block_size)
    peak = metrics_lib.peak_flops_per_device(cfg.peak_flops)
    if is_main:
        print(
            f"model: {run.model.n_layer} layers, {run.model.n_embd} wide, {run.model.block_size} context "
            f"| {tokens_per_step:,} tokens/step | mesh {dict(run.mesh.shape)} on {jax.devices()[0].device_kind} "
            + (f"| resumed from step {run.resumed_from}" if run.resumed_from is not None else "")
        )
    hellaswag = _hellaswag_items(cfg) if cfg.hellaswag_interval else None
    timer_step, timer = start, time.perf_counter()
    record: dict[str, Any] = {}
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not is_main, unit="step", dynamic_ncols=True)
    try:
        for step in range(start, cfg.max_steps):
            run.state, step_metrics = run.step_fn(run.state, next_batch(run))
            done = step + 1
            last = done == cfg.max_steps
            bar.update(1)
            record = {}
            if done % cfg.log_interval == 0 or last:
                record.update(jax.device_get(step_metrics), step=done)
                check_finite(run)
                elapsed, steps = time.perf_counter() - timer, done - timer_step
                if steps > 0:
                    record.update(step_ms=1000 * elapsed / steps, tokens_per_s=steps * tokens_per_step / elapsed)
                    record["mfu"] = metrics_lib.mfu(
                        record["tokens_per_s"], run.flops_per_token, peak, run.mesh.devices.size
                    )
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            did_other_work = False
            if (cfg.eval_interval and done % cfg.eval_interval == 0) or last:
                check_finite(run)
                record.update(step=done, val_loss=evaluate(run))
                did_other_work = True
            if (cfg.sample_interval and done % cfg.sample_interval == 0) or (
                not cfg.sample_interval and "val_loss" in record
            ):
                text = sample_text(run, cfg.sample_tokens, cfg.seed + done)
                if is_main:
                    bar.write(f"--- sample at step {done} ---\n{text}\n---")
                did_other_work = True
            if hellaswag and (done % cfg.hellaswag_interval == 0 or last):
                from jaxgpt.eval.hellaswag import evaluate_hellaswag

                model = run.codec.to_model(run.state.params)
                scores = evaluate_hellaswag(model, hellaswag, mesh=run.mesh, progress=False)
                record.update(step=done, acc=scores["acc"], acc_norm=scores["acc_norm"])
                did_other_work = True
            if record:
                writer.write(record)
                if is_main:
                    bar.write(format_record(record, cfg.max_steps))
            if done % cfg.save_interval == 0 or last:
                check_finite(run)
                run.checkpointer.save(
                    run.state,
                    data_state=iterator_state(run.data_iter, run.data),
                    meta={"model": run.model.to_dict(), "train": cfg.to_dict()},
                    val_loss=record.get("val_loss"),
                )
                did_other_work = True
            if did_other_work or step == start:  # time only training steps (the first one compiles)
                jax.block_until_ready(run.state.step)
                timer_step, timer = done, time.perf_counter()
    finally:
        bar.close()
        run.checkpointer.close()  # waits for the last asynchronous save: never exit with half a checkpoint
    return record


def _hellaswag_items(cfg: TrainConfig):
    from jaxgpt.eval.hellaswag import load_hellaswag

    items = load_hellaswag(cfg.hellaswag_path)
    return items[: cfg.hellaswag_items] if cfg.hellaswag_items else items
