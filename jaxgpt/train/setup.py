"""What a run starts from, built once: mesh, model config, data, the compiled step and its state.

:func:`starting_point` decides the start in one place: this run's newest intact checkpoint
(resume), pretrained weights (``--init_from``: fine-tuning) or a fresh initialisation. Everything
after it reads that decision; :func:`setup` then builds the step (``train.step.build_step``, the
one a compile plan compiles) and the state and data position to start from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxgpt.checkpoints.checkpointer import Checkpointer
from jaxgpt.checkpoints.loading import load_model
from jaxgpt.checkpoints.run_dir import make_run_dir, read_run_file, update_run_file, write_run_file
from jaxgpt.checkpoints.state import TrainState
from jaxgpt.core import distributed
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import check_batch_divisible, make_mesh
from jaxgpt.data.meta import check_dataset
from jaxgpt.data.pipeline import DataConfig, make_train_iterator, open_examples, restore_iterator
from jaxgpt.model.config import GPTConfig, runtime_fields, shape_fields
from jaxgpt.model.params import ParamCodec, Params
from jaxgpt.tokenizer import Tokenizer
from jaxgpt.train.config import RunConfig, TrainConfig
from jaxgpt.train.lifecycle import check_not_complete, start_fresh
from jaxgpt.train.run_tokenizer import run_tokenizer, save_run_tokenizer, with_vocab
from jaxgpt.train.step import Objective, TrainStep, build_step


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    config: TrainConfig
    model_config: GPTConfig
    tokenizer: Tokenizer  # the data's: the run folder keeps a copy
    mesh: Mesh
    codec: ParamCodec
    state: TrainState
    step: TrainStep
    data: DataConfig
    data_iter: Any
    checkpointer: Checkpointer
    flops_per_token: float
    resumed_from: int | None
    objective: Objective | None = None  # None: the next-token loss
    reference: Params | None = None  # with an objective: the frozen init_from weights, sharded like the params


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: the configs it runs with, and a checkpoint step to restore or weights to load."""

    model_config: GPTConfig
    train_config: TrainConfig
    resume_step: int | None = None  # this run's newest checkpoint
    params: dict[str, np.ndarray] | None = None  # pretrained weights (fine-tuning)


def setup(run_config: RunConfig, devices: list | None = None, objective: Objective | None = None) -> Run:
    """Builds the run; ``devices`` (default: all) is what ``--mesh`` must cover exactly. An ``objective``
    (``jaxgpt.rl``'s DPO) replaces the next-token loss and trains against the frozen ``init_from`` weights."""
    cfg = run_config.train_config
    if (cfg.objective == "lm") != (objective is None):
        raise UserError(f"--objective {cfg.objective} needs its objective: run it with train.py")
    mesh = make_mesh(cfg.mesh, devices)
    if cfg.fresh:
        start_fresh(cfg.out_dir)
    make_run_dir(cfg.out_dir)
    checkpointer = Checkpointer(cfg.out_dir, keep_last=cfg.keep_checkpoints)
    try:
        return _build(run_config, mesh, checkpointer, objective)
    except BaseException:
        checkpointer.close()  # a failed setup must not leave Orbax's background threads behind
        raise


def starting_point(run_config: RunConfig, checkpointer: Checkpointer) -> Start:
    """Resume this run if it has a checkpoint, else load ``--init_from``'s weights, else start from scratch."""
    cfg = run_config.train_config
    latest = checkpointer.latest_step()
    if latest is not None:
        return Start(_resumed_config(run_config), _resumed_train_config(run_config), resume_step=latest)
    if cfg.init_from != "scratch":
        model_config, params = _pretrained(run_config)
        return Start(model_config, cfg, params=params)
    if cfg.resume:
        print(f"--resume: no checkpoint in {cfg.out_dir} yet, starting from scratch")
    return Start(run_config.model_config, cfg)


def _build(run_config: RunConfig, mesh: Mesh, checkpointer: Checkpointer, objective: Objective | None) -> Run:
    start = starting_point(run_config, checkpointer)
    model_config, cfg = start.model_config, start.train_config
    resumed, pretrained = start.resume_step is not None, start.params is not None
    tokenizer = run_tokenizer(cfg.data_dir, cfg.out_dir if resumed else cfg.init_from if pretrained else None)
    if not resumed and not pretrained:
        model_config = with_vocab(model_config, tokenizer, "vocab_size" in run_config.model_flags)
    check_dataset(cfg.data_dir, model_config.vocab_size)  # every input checked before anything is compiled
    check_batch_divisible(cfg.batch_size, mesh, "--batch_size")
    data = DataConfig(
        cfg.data_dir, model_config.block_size, cfg.batch_size, cfg.seed, cfg.data_workers,
        vocab_size=model_config.vocab_size,
    )  # fmt: skip
    if cfg.epochs is not None:  # the step count follows from the number of examples
        cfg = cfg.for_examples(len(open_examples(cfg.data_dir, "train", model_config.block_size)))
    step = build_step(model_config, cfg, mesh, objective=objective)
    reference = None
    if objective is not None:  # the starting weights, also on resume: one frozen copy for the whole run
        weights = start.params if start.params is not None else _pretrained(run_config)[1]
        reference = jax.device_put(weights, step.shardings.params)
        step = step.with_reference(reference)
    resumed_from = None
    if start.resume_step is not None:  # restore into shapes only: nothing is initialised just to be overwritten
        abstract = step.abstract_state(cfg.seed)
        found = checkpointer.newest_intact(
            lambda s: checkpointer.restore(s, abstract, step.shardings), quarantine=jax.process_index() == 0
        )
        if found is None:
            raise UserError(f"no intact checkpoint left in {checkpointer.directory}; start again in a new --out_dir")
        resumed_from, (state, data_state) = found
        check_not_complete(cfg.out_dir, resumed_from, cfg.max_steps)  # the intact step: a damaged one is redone
        data_iter = make_train_iterator(data) if cfg.reset_data else restore_iterator(data, data_state)
    else:
        data_iter = make_train_iterator(data)  # checks the data before anything is compiled
        if start.params is not None:
            params = jax.device_put(start.params, step.shardings.params)
        else:
            params = step.codec.init(cfg.seed, step.shardings.params)
        state = step.init_state(params, cfg.seed)
    if distributed.is_main_process():
        write_run_file(cfg.out_dir, model_config, cfg.to_dict())  # as resolved: the next resume reads it
        update_run_file(cfg.out_dir, tokenizer=save_run_tokenizer(cfg.out_dir, tokenizer))
    return Run(
        config=cfg,
        model_config=model_config,
        tokenizer=tokenizer,
        mesh=mesh,
        codec=step.codec,
        state=state,
        step=step,
        data=data,
        data_iter=data_iter,
        checkpointer=checkpointer,
        flops_per_token=step.flops_per_token,
        resumed_from=resumed_from,
        objective=objective,
        reference=reference,
    )


def _pretrained(run_config: RunConfig) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Weights to fine-tune from: the checkpoint fixes the shapes, the command line the rest."""
    asked = run_config.model_config
    runtime = {k: getattr(asked, k) for k in runtime_fields()}
    pretrained = load_model(run_config.train_config.init_from, **runtime)
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
    shape = shape_fields()
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


def describe(run: Run) -> str:
    """The run's one-line summary printed before the first step."""
    model, resumed = run.model_config, run.resumed_from
    return (
        f"model: {model.n_layer} layers, {model.n_embd} wide, {model.block_size} context "
        f"| {run.config.tokens_per_step(model.block_size):,} tokens/step | mesh {dict(run.mesh.shape)} "
        f"on {jax.devices()[0].device_kind}" + (f" | resumed from step {resumed}" if resumed is not None else "")
    )
