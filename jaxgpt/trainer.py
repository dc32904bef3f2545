"""The training loop: set up mesh, model, optimizer and data; then step, and every so often log,
evaluate, sample, score HellaSwag and checkpoint.

Everything a step needs is built once in :func:`setup`; :func:`train` is the loop.
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
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxgpt import distributed, metrics
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import GPTConfig
from jaxgpt.data.meta import check_dataset
from jaxgpt.data.pipeline import DataConfig, iterator_state, make_train_iterator, open_examples, restore_iterator
from jaxgpt.errors import UserError
from jaxgpt.eval.hellaswag import HellaSwagItem, evaluate_hellaswag, load_hellaswag
from jaxgpt.eval.loss import bits_per_byte, evaluate_loss
from jaxgpt.loading import load_model
from jaxgpt.model import GPT, non_embedding_params
from jaxgpt.optim import optimizer_from_config
from jaxgpt.params import ParamCodec
from jaxgpt.profiling import StepProfiler, parse_profile_steps
from jaxgpt.run_dir import MetricsWriter, RunLock, make_run_dir, read_run_file, update_run_file, write_run_file
from jaxgpt.run_tokenizer import run_tokenizer, save_run_tokenizer, with_vocab
from jaxgpt.sampling import generate
from jaxgpt.sharding import accumulated_batch_sharding, check_batch_divisible, make_mesh
from jaxgpt.tokenizer import Tokenizer
from jaxgpt.tracking import open_trackers
from jaxgpt.train_config import SHAPE_FIELDS, RunConfig, TrainConfig
from jaxgpt.train_state import TrainState, init_train_state
from jaxgpt.train_step import jit_train_step, make_train_step, train_state_shardings


class NonFiniteError(UserError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left intact."""


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    config: TrainConfig
    model_config: GPTConfig
    tokenizer: Tokenizer  # the data's: the run folder keeps a copy
    mesh: Mesh
    codec: ParamCodec
    state: TrainState
    step_fn: Callable
    data: DataConfig
    data_iter: Any
    checkpointer: Checkpointer
    flops_per_token: float
    resumed_from: int | None


def setup(run_config: RunConfig, devices: list | None = None) -> Run:
    """Builds the run; ``devices`` (default: all) is what ``--mesh`` must cover exactly."""
    cfg = run_config.train_config
    mesh = make_mesh(cfg.mesh, devices)
    make_run_dir(cfg.out_dir)
    checkpointer = Checkpointer(cfg.out_dir, keep_last=cfg.keep_checkpoints)
    try:
        return _build(run_config, mesh, checkpointer)
    except BaseException:
        checkpointer.close()  # a failed setup must not leave Orbax's background threads behind
        raise


def _build(run_config: RunConfig, mesh: Mesh, checkpointer: Checkpointer) -> Run:
    """Model config first (stored, pretrained or asked for), then data, optimizer and the state to start from."""
    cfg = run_config.train_config
    latest = checkpointer.latest_step()
    model_config, pretrained = run_config.model_config, None
    if latest is not None:
        model_config, cfg = _resumed_config(run_config), _resumed_train_config(run_config)
    elif cfg.init_from != "scratch":
        model_config, pretrained = _pretrained(run_config)
    elif cfg.resume:
        print(f"--resume: no checkpoint in {cfg.out_dir} yet, starting from scratch")
    model_from = cfg.out_dir if latest is not None else None if cfg.init_from == "scratch" else cfg.init_from
    tokenizer = run_tokenizer(cfg.data_dir, model_from)
    if model_from is None:
        model_config = with_vocab(model_config, tokenizer, "vocab_size" in run_config.model_flags)
    check_dataset(cfg.data_dir, model_config.vocab_size)  # every input checked before anything is compiled
    check_batch_divisible(cfg.batch_size, mesh, "--batch_size")

    data = DataConfig(cfg.data_dir, model_config.block_size, cfg.batch_size, cfg.seed, cfg.data_workers)
    if cfg.epochs is not None:
        cfg = cfg.for_examples(len(open_examples(cfg.data_dir, "train", model_config.block_size)))
    codec = ParamCodec(model_config)
    schedule, tx = optimizer_from_config(cfg)
    shardings = train_state_shardings(codec, tx, mesh, cfg.fsdp)
    if latest is not None:  # restore into shapes only: nothing is initialised just to be overwritten
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx, cfg.seed), codec.abstract)
        found = checkpointer.newest_intact(
            lambda step: checkpointer.restore(step, abstract, shardings), quarantine=jax.process_index() == 0
        )
        if found is None:
            raise UserError(f"no intact checkpoint left in {checkpointer.directory}; start again in a new --out_dir")
        latest, (state, data_state) = found
        data_iter = make_train_iterator(data) if cfg.reset_data else restore_iterator(data, data_state)
    else:
        data_iter = make_train_iterator(data)  # checks the data before anything is compiled
        if pretrained is not None:
            params = jax.device_put(pretrained, shardings.params)
        else:
            params = codec.init(cfg.seed, shardings.params)
        state = jax.jit(lambda p: init_train_state(p, tx, cfg.seed), out_shardings=shardings)(params)
    if distributed.is_main_process():
        write_run_file(cfg.out_dir, model_config, cfg.to_dict())  # as resolved: the next resume reads it
        update_run_file(cfg.out_dir, tokenizer=save_run_tokenizer(cfg.out_dir, tokenizer))

    abstract_model = nnx.eval_shape(lambda: GPT(model_config, nnx.Rngs(0)))
    return Run(
        config=cfg,
        model_config=model_config,
        tokenizer=tokenizer,
        mesh=mesh,
        codec=codec,
        state=state,
        step_fn=jit_train_step(make_train_step(codec, tx, schedule), shardings, mesh),
        data=data,
        data_iter=data_iter,
        checkpointer=checkpointer,
        flops_per_token=metrics.flops_per_token(model_config, non_embedding_params(abstract_model)),
        resumed_from=latest,
    )


def _pretrained(run_config: RunConfig) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Weights to fine-tune from: the checkpoint fixes the shapes, the command line the rest."""
    asked = run_config.model_config
    keep = ("dropout", "dtype", "pad_vocab_multiple", "attention", "loss", "remat", "param_dtype")
    pretrained = load_model(run_config.train_config.init_from, **{k: getattr(asked, k) for k in keep})
    config = pretrained.config
    params = ParamCodec(config).to_host(pretrained)
    block_size = asked.block_size if "block_size" in run_config.model_flags else config.block_size
    if block_size > config.block_size:
        raise UserError(f"--block_size {block_size} exceeds the pretrained model's context ({config.block_size})")
    if block_size < config.block_size:  # nanoGPT's crop_block_size: keep the first positions (rotary has none)
        if "wpe.embedding" in params:
            params["wpe.embedding"] = params["wpe.embedding"][:block_size]
        config = config.replace(block_size=block_size)
    return config, params


def _resumed_config(run_config: RunConfig) -> GPTConfig:
    """The run's stored model config; shape flags that contradict it are an error, others apply."""
    asked, flags, out_dir = run_config.model_config, run_config.model_flags, run_config.train_config.out_dir
    stored = GPTConfig.from_dict(read_run_file(out_dir)["model"])
    shape = (*SHAPE_FIELDS, "block_size", "pad_vocab_multiple")
    changed = [f for f in shape if f in flags and getattr(asked, f) != getattr(stored, f)]
    if changed:
        stored_values = ", ".join(f"{f}={getattr(stored, f)}" for f in changed)
        raise UserError(
            f"{out_dir} holds a checkpoint of a model with {stored_values}; drop those flags to resume, "
            "or pick a new --out_dir"
        )
    return stored.replace(**{k: getattr(asked, k) for k in flags if k not in shape})


DATA_ORDER_FIELDS = ("batch_size", "seed")  # with block_size, what the saved data position depends on


def _resumed_train_config(run_config: RunConfig) -> TrainConfig:
    """The run's stored batch size and seed unless given; a different one needs --reset_data."""
    cfg, given = run_config.train_config, run_config.train_flags
    stored = read_run_file(cfg.out_dir).get("train", {})
    for name in DATA_ORDER_FIELDS:
        if name in given and name in stored and getattr(cfg, name) != stored[name] and not cfg.reset_data:
            raise UserError(
                f"{cfg.out_dir} was trained with --{name} {stored[name]}; drop --{name} {getattr(cfg, name)} to "
                f"resume where its data stopped, or add --reset_data to restart the data order with the new value"
            )
    return dataclasses.replace(cfg, **{k: stored[k] for k in DATA_ORDER_FIELDS if k in stored and k not in given})


def next_batch(run: Run) -> dict[str, jax.Array]:
    """``grad_accum`` micro-batches from the iterator, stacked to [grad_accum, batch, T] and sharded."""
    micro = [next(run.data_iter) for _ in range(run.config.grad_accum)]
    sharding = accumulated_batch_sharding(run.mesh)
    return {  # inputs and targets int32, chat data's weights float32: as the pipeline made them
        key: jax.make_array_from_process_local_data(sharding, np.stack([m[key] for m in micro])) for key in micro[0]
    }


def current_model(run: Run) -> GPT:
    return run.codec.to_model(run.state.params)


def evaluate(run: Run) -> float:
    """Mean validation loss over the first ``eval_iters`` batches of examples (always the same tokens;
    chat data: the assistants' tokens only)."""
    cfg, model = run.config, current_model(run)
    result = evaluate_loss(model, cfg.data_dir, batch_size=cfg.batch_size, max_batches=cfg.eval_iters, mesh=run.mesh)
    return result["val_loss"]


def validation(run: Run) -> dict[str, float]:
    """The validation loss and, for text data, its bits per byte (comparable across tokenizers)."""
    loss = evaluate(run)
    return {"val_loss": loss, **bits_per_byte(loss, run.config.data_dir)}


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
    scores = evaluate_hellaswag(current_model(run), items, run.tokenizer, mesh=run.mesh, progress=False)
    return {"acc": scores["acc"], "acc_norm": scores["acc_norm"]}


def check_finite(run: Run) -> None:
    bad = int(run.state.first_bad_step)
    if bad >= 0:
        last = run.checkpointer.latest_step()
        kept = f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint was written"
        raise NonFiniteError(
            f"the loss or gradient became NaN/Inf at step {bad + 1}; stopped, {kept} in {run.config.out_dir}. "
            "Lower --lr, raise --warmup_steps, or train in float32 to find the cause."
        )


def save(run: Run, val_loss: float | None) -> None:
    check_finite(run)  # never checkpoint a state that went bad
    run.checkpointer.save(
        run.state,
        data_state=iterator_state(run.data_iter, run.data),
        meta={"model": run.model_config.to_dict(), "train": run.config.to_dict()},
        val_loss=val_loss,
    )


def format_record(record: dict[str, Any], max_steps: int) -> str:
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
        self.step, self.start = step, time.perf_counter()

    def rates(self, step: int) -> dict[str, float | None]:
        steps, elapsed = step - self.step, time.perf_counter() - self.start
        if steps <= 0:
            return {}
        tokens_per_s = steps * self.tokens_per_step / elapsed
        mfu = metrics.mfu(tokens_per_s, self.flops_per_token, self.peak, self.devices)
        return {"step_ms": 1000 * elapsed / steps, "tokens_per_s": tokens_per_s, "mfu": mfu}


def due(step: int, interval: int, last: bool) -> bool:
    """Whether an every-``interval``-steps action runs after ``step`` (0: only at the last step)."""
    return last or (interval > 0 and step % interval == 0)


def train(run_config: RunConfig) -> dict[str, Any]:
    """Runs (or resumes) training to ``max_steps``; returns the last logged record.

    The run directory is locked for the whole run (on process 0), so two runs never share one.
    """
    distributed.initialize(run_config.launch_config)  # before anything touches a device
    out_dir = run_config.train_config.out_dir
    with RunLock(out_dir) if distributed.is_main_process() else contextlib.nullcontext():
        return _train(run_config)


def _train(run_config: RunConfig) -> dict[str, Any]:
    run = setup(run_config)
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

    def print_sample(step: int) -> dict[str, Any]:
        if cfg.sample_tokens:
            text = sample_text(run, cfg.sample_tokens, cfg.seed + step)
            say(f"--- sample at step {step} ---\n{text}\n---")
            trackers.log_text(step, "sample", text)
        return {}

    # (every N steps, also at the last step?, action returning what it adds to the step's record)
    actions: list[tuple[int, bool, Callable[[int], dict[str, Any]]]] = [
        (cfg.eval_interval, True, lambda step: validation(run)),
        (cfg.sample_interval or cfg.eval_interval, not cfg.sample_interval, print_sample),  # 0: at each evaluation
    ]
    if cfg.hellaswag_interval:
        items = _hellaswag_items(cfg)
        actions.append((cfg.hellaswag_interval, True, lambda step: hellaswag_scores(run, items)))

    timer = StepTimer(run, start)
    record: dict[str, Any] = {}
    # disable=None: no bar unless stderr is a terminal, so logs written to a file are plain lines
    bar = tqdm(total=cfg.max_steps, initial=start, disable=None if is_main else True, unit="step", dynamic_ncols=True)
    try:
        for step in range(start, cfg.max_steps):
            with profiler.step(step):
                run.state, step_metrics = run.step_fn(run.state, next_batch(run))
            profiler.step_done(step, run.state)
            run.checkpointer.check_save()  # a failed background save stops the run at once
            done, last = step + 1, step + 1 == cfg.max_steps
            bar.update(1)
            record = {}
            if due(done, cfg.log_interval, last):
                record.update(jax.device_get(step_metrics), **timer.rates(done))
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            other_work = [action for interval, at_end, action in actions if due(done, interval, last and at_end)]
            if record or other_work:
                check_finite(run)
            for action in other_work:
                record.update(action(done))
            if record:
                record["step"] = done
                writer.write(record)
                trackers.log(record)
                say(format_record(record, cfg.max_steps))
            if due(done, cfg.save_interval, last):
                save(run, record.get("val_loss"))
                other_work.append(save)
            if other_work or step == start:  # time only training steps: the first one compiles
                jax.block_until_ready(run.state.step)
                timer.reset(done)
    finally:
        bar.close()
        profiler.stop()
        trackers.close()
        run.checkpointer.close()  # waits for the last asynchronous save: never exit with half a checkpoint
    return record


def describe(run: Run) -> str:
    model, resumed = run.model_config, run.resumed_from
    return (
        f"model: {model.n_layer} layers, {model.n_embd} wide, {model.block_size} context "
        f"| {run.config.tokens_per_step(model.block_size):,} tokens/step | mesh {dict(run.mesh.shape)} "
        f"on {jax.devices()[0].device_kind}" + (f" | resumed from step {resumed}" if resumed is not None else "")
    )


def _hellaswag_items(cfg: TrainConfig) -> list[HellaSwagItem]:
    items = load_hellaswag(cfg.hellaswag_path)
    return items[: cfg.hellaswag_items] if cfg.hellaswag_items else items
