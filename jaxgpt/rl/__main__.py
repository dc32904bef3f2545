"""RL on verifiable rewards after SFT: ``python -m jaxgpt.rl --init_from out/sft --prompts train.jsonl``.

Each step samples ``--group_size`` completions of ``--prompts_per_step`` prompts with the current
policy, rewards them (``--reward``) and takes one GRPO step (:mod:`jaxgpt.rl.grpo`). Logged to
``out_dir/metrics.jsonl``: the loss, mean reward, completion length, KL to the reference (with
``--kl_coef``) and, every ``--eval_interval`` steps, greedy pass@1 on ``--eval_prompts``. The run
directory is a training run's: checkpoints (params, optimizer, step) that ``--resume`` (automatic)
continues with the same prompts and samples, and that ``sample.py --init_from`` and
``jaxgpt.eval`` read. Generation and the update run on the same ``--mesh``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxgpt.checkpoints.checkpointer import Checkpointer
from jaxgpt.checkpoints.loading import load_model
from jaxgpt.checkpoints.run_dir import MetricsWriter, RunLock, make_run_dir, update_run_file, write_run_file
from jaxgpt.core import cli
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.core.sharding import accumulated_batch_sharding, check_batch_divisible, make_mesh
from jaxgpt.rl.grpo import GRPO, pass_at_1, rollout
from jaxgpt.rl.rewards import hub_prompts, load_reward, read_prompts
from jaxgpt.tokenizer import tokenizer_of
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.run_tokenizer import save_run_tokenizer
from jaxgpt.train.step import build_step


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO: sample completions, reward them, take a clipped policy-gradient step (TRL's GRPOTrainer defaults)."""

    init_from: str = option("out/sft", "the SFT run (or HF GPT-2 dir) to start from; also the KL reference")
    out_dir: str = option("out/grpo", "checkpoints and metrics.jsonl go here (an existing run resumes)")
    prompts: str | None = option(None, "JSON lines {'prompt' or 'messages', 'answer'} to train on")
    dataset: Literal["gsm8k"] | None = option(
        None, "train on a hub dataset instead of --prompts (gsm8k: its train split)"
    )
    data_files: str | None = option(None, "with --dataset: a local copy of its train split's hub files (parquet/json)")
    eval_data_files: str | None = option(None, "with --dataset: a local copy of its test split's hub files")
    eval_prompts: str | None = option(
        None, "held-out JSON lines for pass@1 (default with --dataset gsm8k: its test split)"
    )
    eval_items: int | None = option(None, "score only the first N held-out prompts")
    reward: str = option(
        "exact_match", "exact_match (GSM8K's '#### N') or module:function(record, completion) -> float"
    )
    group_size: int = option(8, "completions sampled per prompt (TRL's num_generations)")
    prompts_per_step: int = option(4, "prompts per step: a step trains on prompts_per_step * group_size completions")
    grad_accum: int = option(1, "micro-batches the step's completions are split into")
    max_new_tokens: int = option(64, "most tokens per completion (the prompt plus these must fit the context)")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    top_k: int | None = option(None, "sample the rollouts from the k most likely tokens only (None: all, as TRL)")
    max_steps: int = option(200, "GRPO steps")
    lr: float = option(1e-6, "peak learning rate (TRL's default; small models here take more)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(0, "linear warmup steps")
    epsilon: float = option(0.2, "clipping range of the probability ratio")
    kl_coef: float = option(0.0, "weight of the KL penalty to the starting weights (TRL's beta; 0: no reference held)")
    mesh: str | None = option(None, "device mesh DxM (data x model parallel); default: every device on data")
    fsdp: bool = option(False, "also shard parameters and optimizer state over the data axis (ZeRO-3)")
    log_interval: int = option(1, "log a line and a metrics.jsonl record every N steps")
    eval_interval: int = option(20, "held-out pass@1 every N steps (and at the start and end; 0: start and end)")
    save_interval: int = option(50, "checkpoint every N steps (and always at the end)")
    seed: int = option(1337, "seed for the prompt order and the samples")

    def __post_init__(self) -> None:
        if (self.prompts is None) == (self.dataset is None):
            raise UserError("give exactly one of --prompts FILE or --dataset gsm8k")
        for name in ("group_size", "prompts_per_step", "grad_accum", "max_new_tokens", "max_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.group_size < 2:
            raise UserError("--group_size must be at least 2: advantages compare completions of a prompt")
        if (self.prompts_per_step * self.group_size) % self.grad_accum:
            raise UserError("--grad_accum must divide --prompts_per_step * --group_size")
        if self.kl_coef < 0 or not 0 < self.epsilon < 1 or self.temperature <= 0:
            raise UserError("need --kl_coef >= 0, 0 < --epsilon < 1 and --temperature > 0")

    def train_config(self) -> TrainConfig:
        """The optimizer settings as a training run's (AdamW, betas 0.9/0.999, no weight decay, as TRL)."""
        return TrainConfig(
            preset="grpo", out_dir=self.out_dir, init_from=self.init_from, max_steps=self.max_steps, lr=self.lr,
            min_lr=self.min_lr, warmup_steps=self.warmup_steps, weight_decay=0.0, beta2=0.999, seed=self.seed,
            batch_size=self.prompts_per_step * self.group_size // self.grad_accum, grad_accum=self.grad_accum,
            mesh=self.mesh, fsdp=self.fsdp, save_interval=self.save_interval,
        )  # fmt: skip


def prompt_sets(cfg: GRPOConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if cfg.dataset is not None:
        train = hub_prompts(cfg.dataset, "train", cfg.data_files)
        held_out = (
            read_prompts(cfg.eval_prompts)
            if cfg.eval_prompts
            else hub_prompts(cfg.dataset, "test", cfg.eval_data_files)
        )
    else:
        train = read_prompts(cfg.prompts)  # type: ignore[arg-type]
        held_out = read_prompts(cfg.eval_prompts) if cfg.eval_prompts else []
    if len(train) < cfg.prompts_per_step:
        raise UserError(f"{len(train)} training prompts, fewer than --prompts_per_step {cfg.prompts_per_step}")
    return train, held_out[: cfg.eval_items] if cfg.eval_items else held_out


def step_prompts(records: list[dict[str, Any]], cfg: GRPOConfig, step: int) -> list[dict[str, Any]]:
    """The prompts of ``step``: fixed by the seed and the step, so a resumed run sees the same ones."""
    order = np.random.default_rng([cfg.seed, step]).choice(len(records), cfg.prompts_per_step, replace=False)
    return [records[i] for i in order]


def run_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    """Trains (or resumes) to ``max_steps``; returns the last record."""
    train_cfg = cfg.train_config()
    mesh = make_mesh(cfg.mesh)
    check_batch_divisible(train_cfg.batch_size, mesh, "--prompts_per_step * --group_size / --grad_accum")
    records, held_out = prompt_sets(cfg)
    reward = load_reward(cfg.reward)
    make_run_dir(cfg.out_dir)
    with RunLock(cfg.out_dir):
        start, tokenizer = load_model(cfg.init_from, dropout=0.0), tokenizer_of(cfg.init_from)
        step = build_step(
            start.config, train_cfg, mesh, objective=GRPO(cfg.epsilon, cfg.kl_coef), reference=cfg.kl_coef > 0
        )
        checkpointer = Checkpointer(cfg.out_dir, keep_last=3)
        try:
            host = step.codec.to_host(start)
            return _loop(cfg, train_cfg, step, host, tokenizer, checkpointer, records, held_out, reward)
        finally:
            checkpointer.close()


def _loop(cfg, train_cfg, step, host, tokenizer, checkpointer, records, held_out, reward) -> dict[str, Any]:
    codec, mesh = step.codec, step.runtime.mesh
    latest = checkpointer.latest_step()
    if latest is not None:
        state, _ = checkpointer.restore(latest, step.abstract_state(cfg.seed), step.shardings)
    else:
        state = step.init_state(jax.device_put(host, step.shardings.params), cfg.seed)
    reference = jax.device_put(host, step.shardings.params) if cfg.kl_coef > 0 else None
    step_fn = step.fn if reference is None else step.with_reference(reference).fn
    meta = {"model": codec.config.to_dict(), "train": {**train_cfg.to_dict(), "grpo": dataclasses.asdict(cfg)}}
    write_run_file(cfg.out_dir, codec.config, meta["train"])
    update_run_file(cfg.out_dir, tokenizer=save_run_tokenizer(cfg.out_dir, tokenizer))  # the run is self-contained
    writer = MetricsWriter(cfg.out_dir)
    first = int(state.step)
    writer.truncate_after(first)
    batch_rows = cfg.prompts_per_step * cfg.group_size

    def evaluate() -> dict[str, float]:
        if not held_out:
            return {}
        model = codec.to_model(state.params)
        return {"pass@1": pass_at_1(model, held_out, reward, tokenizer, cfg.max_new_tokens, batch_rows, mesh)}

    if latest is None and held_out:
        initial = evaluate()
        writer.write({"step": 0, **initial})
        tqdm.write(f"step 0: held-out pass@1 {initial['pass@1']:.3f}")
    record: dict[str, Any] = {}
    bar = tqdm(total=cfg.max_steps, initial=first, disable=None, unit="step", dynamic_ncols=True)
    for index in range(first, cfg.max_steps):
        begin = time.perf_counter()
        model = codec.to_model(state.params)
        key = jax.random.fold_in(jax.random.key(cfg.seed), index)
        prompts = step_prompts(records, cfg, index)
        sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, key=key)
        sampling["mesh"] = mesh
        samples = rollout(model, prompts, reward, tokenizer, group_size=cfg.group_size, **sampling)
        batch = samples.batch(codec.config.block_size, cfg.grad_accum)
        sharding = accumulated_batch_sharding(mesh)
        batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        state, metrics = step_fn(state, batch)
        done, last = index + 1, index + 1 == cfg.max_steps
        bar.update(1)
        record = {}
        if done % cfg.log_interval == 0 or last:
            record = {**jax.device_get(metrics), **samples.stats(), "step_s": time.perf_counter() - begin}
            if cfg.kl_coef == 0:
                record.pop("kl")
        if last or (cfg.eval_interval and done % cfg.eval_interval == 0):
            record.update(evaluate())
        if record:
            record["step"] = done
            writer.write(record)
            tqdm.write(" | ".join(f"{k} {float(v):.4g}" for k, v in record.items() if k != "step") + f" | step {done}")
        if int(state.first_bad_step) >= 0:
            raise UserError(f"the loss became NaN/Inf at step {int(state.first_bad_step) + 1}; lower --lr")
        if last or done % cfg.save_interval == 0:
            checkpointer.save(state, data_state={"step": done}, meta=meta)
    bar.close()
    return record


def main(argv: Sequence[str] | None = None) -> None:
    run_grpo(cli.parse(GRPOConfig, argv, prog="python -m jaxgpt.rl"))


if __name__ == "__main__":
    cli.run(main)
