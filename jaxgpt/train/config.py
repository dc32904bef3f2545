"""Training configuration: one typed dataclass, named run presets, and the command line over both.

``python train.py --preset NAME`` starts from a preset (a TrainConfig and a GPTConfig);
any field of either can then be overridden by its flag (``--lr 3e-4 --n_layer 4``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

from jaxgpt.core.cli import build, parser_for
from jaxgpt.core.distributed import LaunchConfig
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.model.config import GPTConfig, preset
from jaxgpt.train.profiling import parse_profile_steps
from jaxgpt.train.tracking import check_tracker_installed


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training run: data, optimisation, mesh, logging and checkpoints."""

    preset: str = option("shakespeare", "named run preset that sets every other default (see the README)")
    data_dir: str = option("data/shakespeare", "token shards from python -m jaxgpt.data.prepare")
    out_dir: str = option("out/shakespeare", "checkpoints, metrics.jsonl and the run description go here")
    init_from: str = option("scratch", "scratch, gpt2[-medium|-large|-xl], a HF GPT-2 dir or a jaxgpt out_dir")
    resume: bool = option(False, "continue the run in out_dir from its last checkpoint (also automatic if one exists)")
    fresh: bool = option(False, "start over in out_dir: delete its checkpoints, metrics and run file first")
    reset_data: bool = option(False, "on resume, restart the data order from the first batch (e.g. after new data)")
    mesh: str | None = option(None, "device mesh DxM (data x model parallel); default: every device on data")
    fsdp: bool = option(False, "also shard parameters and optimizer state over the data axis (ZeRO-3)")
    max_steps: int = option(500, "optimizer steps to train for")
    epochs: float | None = option(None, "train for this many passes over the train examples instead (sets max_steps)")
    batch_size: int = option(12, "sequences per micro-batch, global (split over the data axis)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(50, "linear warmup steps")
    lr_decay_steps: int | None = option(None, "step where the cosine reaches min_lr (default: max_steps)")
    warmdown_steps: int = option(0, "0: cosine decay; N: constant lr, then linear to min_lr over the last N steps")
    optimizer: Literal["adamw", "muon"] = option("adamw", "adamw, or muon: Muon on hidden matrices, AdamW on the rest")
    muon_lr: float = option(0.02, "Muon's peak learning rate (per-entry RMS step; the schedule shape of lr)")
    muon_momentum: float = option(0.95, "Muon's Nesterov momentum")
    weight_decay: float = option(0.1, "weight decay on matrices and embeddings (with muon: on the Muon matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2 (0.99 for small batches, 0.95 for GPT-2 scale)")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip gradients to this global norm (0: off)")
    log_interval: int = option(10, "log a line and a metrics.jsonl record every N steps")
    eval_interval: int = option(100, "validation loss every N steps (0: only at the end)")
    eval_iters: int = option(10, "validation batches per evaluation")
    sample_interval: int = option(0, "print a generated sample every N steps (0: at each evaluation)")
    sample_tokens: int = option(64, "tokens per printed sample (0: no samples)")
    save_interval: int = option(100, "checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = option(3, "keep the last N checkpoints (plus the best by validation loss)")
    hellaswag_interval: int = option(0, "HellaSwag accuracy every N steps (0: off)")
    hellaswag_path: str | None = option(None, "local hellaswag_val.jsonl (default: download when online)")
    hellaswag_items: int | None = option(None, "score only the first N HellaSwag items (default: all 10,042)")
    seed: int = option(1337, "seed for initialisation, data order and dropout")
    data_workers: int = option(0, "threads reading batches ahead (0: read each batch when it is asked for)")
    peak_flops: float | None = option(None, "peak FLOP/s per device for MFU (default: looked up by device kind)")
    tensorboard: bool = option(False, "also log metrics and samples as TensorBoard events in out_dir/tb")
    wandb_project: str | None = option(None, "also log metrics, samples and configs to this Weights & Biases project")
    profile_steps: str | None = option(None, "START:STOP: JAX profiler trace of these steps in out_dir/profile")
    objective: Literal["lm", "dpo"] = option(
        "lm", "lm: next-token loss; dpo: DPO on preference pairs against init_from"
    )
    dpo_beta: float = option(0.1, "DPO's beta: how far the policy may move from the reference (TRL's default)")
    dpo_sft_weight: float = option(
        0.0, "DPO plus this times the chosen replies' mean token NLL (TRL's loss_type sft, RPO; 0: off)"
    )
    dpo_loss: Literal["sigmoid", "ipo"] = option(
        "sigmoid", "sigmoid: DPO's loss; ipo: IPO's squared loss, whose margin stops at 1/(2 beta) per token (TRL's)"
    )

    def __post_init__(self) -> None:
        positive = (
            "max_steps", "batch_size", "grad_accum", "log_interval", "eval_iters", "save_interval",
            "keep_checkpoints", "eps", "lr_decay_steps", "hellaswag_items", "peak_flops", "dpo_beta",
        )  # fmt: skip
        non_negative = (
            "warmup_steps", "weight_decay", "grad_clip", "eval_interval", "sample_interval", "sample_tokens",
            "hellaswag_interval", "data_workers", "seed",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name} must be positive, got {value}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs is not None and not self.epochs > 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"need 0 <= --min_lr <= --lr, got min_lr={self.min_lr} lr={self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        parse_profile_steps(self.profile_steps)
        check_tracker_installed(tensorboard=self.tensorboard, wandb_project=self.wandb_project)
        if self.fresh and self.resume:
            raise UserError("--fresh starts over and --resume continues: pass one of them")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise UserError(
                f"need --muon_lr > 0 and 0 <= --muon_momentum < 1, got {self.muon_lr} and {self.muon_momentum}"
            )
        if not 0 <= self.warmdown_steps <= self.decay_steps:
            raise UserError(f"--warmdown_steps must be in [0, {self.decay_steps}], got {self.warmdown_steps}")

    @property
    def decay_steps(self) -> int:
        """The steps over which the learning rate decays: --lr_decay_steps, else the whole run."""
        return self.lr_decay_steps or self.max_steps

    def for_examples(self, num_examples: int) -> TrainConfig:
        """With ``epochs``: the config whose ``max_steps`` makes that many passes over ``num_examples``."""
        assert self.epochs is not None
        steps = math.ceil(self.epochs * num_examples / (self.batch_size * self.grad_accum))
        return dataclasses.replace(self, max_steps=max(steps, 1))

    def tokens_per_step(self, block_size: int) -> int:
        """Tokens one optimizer step trains on: batch_size x grad_accum x block_size."""
        return self.batch_size * self.grad_accum * block_size

    def to_dict(self) -> dict[str, Any]:
        """Every field, as the run file stores them (a resume reads the batch size and seed back)."""
        return dataclasses.asdict(self)


# What the GPT-2 124M recipes share (AdamW as in GPT-3's paper, bf16 compute, vocab padded to 50304).
_GPT2_RECIPE = dict(lr=6e-4, min_lr=6e-5, weight_decay=0.1, beta2=0.95, data_workers=2)
_GPT2_124M = preset("gpt2", pad_vocab_multiple=64, dtype="bfloat16")

# modded-nanogpt's architecture (its 10/14/24 record): rotary, parameter-free RMSNorm, QK-norm, ReLU², no biases,
# zero-initialised output projections. Muon trains the hidden matrices, AdamW the embedding and head.
_MODERN = dict(
    position_embedding="rotary", norm="rmsnorm", norm_scale=False, qk_norm=True, activation="relu2", bias=False,
    zero_init_proj=True,
)  # fmt: skip
_SHAKESPEARE = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, pad_vocab_multiple=64)

# Each preset: its TrainConfig fields (by topic: data and batch; optimizer; schedule; evaluation and saving) and
# its GPTConfig. Numbers follow the recipe named in the comment. Every preset writes to out/<its name>.
_RECIPES: dict[str, tuple[dict[str, Any], GPTConfig]] = {
    # The Quick start: the modern recipe below on tiny Shakespeare with its own 4,096-token BPE (prepare
    # --tokenizer train:4096): the head is 12x smaller than GPT-2's, so a 2-core CPU spends its steps on the model.
    # Tied head and GPT-2's init, which the ablations in docs/benchmarks.md found better at this size (and the
    # tied head is faster): 2.242 val bits per byte against 2.254 untied with zero-init, in 110 s against 145 s.
    "shakespeare": (
        dict(optimizer="muon", muon_lr=3e-3, lr=3e-3, max_steps=750, eval_interval=250, save_interval=250),
        _SHAKESPEARE.replace(**_MODERN, logit_softcap=30.0, vocab_size=4096).replace(zero_init_proj=False),
    ),
    # The Quick start before issue 21 (GPT-2's tokenizer, nanoGPT's CPU recipe), on data prepared with --tokenizer gpt2.
    "shakespeare-gpt2": (dict(data_dir="data/shakespeare-gpt2"), _SHAKESPEARE),
    # The same model size, steps and tokens with the modern recipe (bench/bench_recipes.py compares the two).
    "shakespeare-modern": (
        dict(data_dir="data/shakespeare-gpt2", optimizer="muon", muon_lr=3e-3, lr=3e-3),
        _SHAKESPEARE.replace(**_MODERN, tie_embeddings=False, logit_softcap=30.0),
    ),
    # llm.c / build-nanogpt: 524,288 tokens a step (64 x 1024 x 8 on one GPU; on N GPUs use
    # --batch_size 64*N --grad_accum 8/N), 10B FineWeb tokens in 19,073 steps.
    "gpt2-124m-fineweb": (
        dict(
            _GPT2_RECIPE, data_dir="data/fineweb10B", max_steps=19073, batch_size=64, grad_accum=8,
            warmup_steps=715,
            eval_interval=250, eval_iters=20, save_interval=1000, hellaswag_interval=250, sample_interval=1000,
        ),
        _GPT2_124M,
    ),
    # modded-nanogpt's 10/14/24 record (github.com/KellerJordan/modded-nanogpt, records/track_1_short/
    # 2024-10-14_ModernArch): 3.2741 FineWeb val loss after 5100 steps of 524,288 tokens (2.67B tokens).
    # Its architecture and optimizer groups: head size 128 (6 heads), tied embedding, AdamW lr 0.0036 (betas
    # 0.9/0.95, no decay) on it, Muon lr 0.00036 at RMS-1 updates, no warmup, linear warmdown over 1450 steps.
    "gpt2-124m-speedrun": (
        dict(
            data_dir="data/fineweb10B", max_steps=5100, batch_size=64, grad_accum=8, data_workers=2,
            optimizer="muon", lr=0.0036, muon_lr=0.00036, weight_decay=0.0, beta2=0.95,
            min_lr=0.0, warmup_steps=0, warmdown_steps=1450,
            eval_interval=125, eval_iters=20, save_interval=1000, hellaswag_interval=500, sample_interval=1000,
        ),
        _GPT2_124M.replace(n_head=6, **_MODERN),
    ),
    # nanoGPT's config/train_gpt2.py: 12 x 1024 x 40 = 491,520 tokens a step, 600k steps on OpenWebText.
    "gpt2-124m-owt": (
        dict(
            _GPT2_RECIPE, data_dir="data/openwebtext", max_steps=600000, batch_size=12, grad_accum=40,
            warmup_steps=2000,
            eval_interval=1000, eval_iters=200, save_interval=1000,
        ),
        _GPT2_124M,
    ),
    # nanoGPT's config/finetune_shakespeare.py, from OpenAI's GPT-2 124M: few steps, small constant lr.
    "finetune-shakespeare": (
        dict(
            data_dir="data/shakespeare-gpt2",  # GPT-2's tokenizer, as the weights
            init_from="gpt2", max_steps=20, batch_size=1, grad_accum=32,
            lr=3e-5, weight_decay=0.0, beta2=0.95,
            min_lr=3e-5, warmup_steps=0,
            eval_interval=5, eval_iters=20, save_interval=10,
        ),
        preset("gpt2", dropout=0.1),
    ),
    # Instruction fine-tuning on chat shards (prepare --format chat) with TRL's SFTTrainer defaults: 3 epochs,
    # 8 conversations a step, lr 2e-5 decaying to 0, no weight decay, Adam betas 0.9/0.999; GPT-2's dropout.
    "sft": (
        dict(
            data_dir="data/chat", init_from="gpt2", epochs=3.0, batch_size=8,
            lr=2e-5, weight_decay=0.0, beta2=0.999,
            min_lr=0.0, warmup_steps=0,
            eval_interval=200, eval_iters=20, save_interval=500,
        ),
        preset("gpt2", dropout=0.1),
    ),
    # Preference tuning of an SFT run on pairs (prepare --format preference) with TRL's DPOTrainer defaults: beta 0.1,
    # lr 1e-6 decaying to 0, 8 pairs a step, 3 epochs, no weight decay, Adam betas 0.9/0.999, dropout off.
    "dpo": (
        dict(
            data_dir="data/preference", init_from="out/sft", objective="dpo", epochs=3.0, batch_size=8,
            lr=1e-6, weight_decay=0.0, beta2=0.999,
            min_lr=0.0, warmup_steps=0,
            eval_interval=200, eval_iters=20, save_interval=500, sample_tokens=0,
        ),
        preset("gpt2", dropout=0.0),
    ),
}  # fmt: skip
RUN_PRESETS: dict[str, tuple[TrainConfig, GPTConfig]] = {
    name: (TrainConfig(**{"preset": name, "out_dir": f"out/{name}", **train}), model)
    for name, (train, model) in _RECIPES.items()
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What ``train.py`` was asked for: the run's settings, the model's, and which model flags were typed."""

    train_config: TrainConfig
    model_config: GPTConfig
    model_flags: frozenset[str]  # GPTConfig fields the user set on the command line
    train_flags: frozenset[str] = frozenset()  # TrainConfig fields the user set on the command line
    launch_config: LaunchConfig = LaunchConfig()  # how this process joins a multi-process run


def parse_run_config(argv: Sequence[str] | None = None) -> RunConfig:
    """What ``python train.py`` was asked for: the preset's defaults with the typed flags over them, and which
    flags were typed."""
    description = (
        "Train or fine-tune a GPT on a device mesh. Defaults shown are the 'shakespeare' preset's; "
        f"--preset picks another set ({', '.join(RUN_PRESETS)})."
    )
    train_defaults, model_defaults = RUN_PRESETS["shakespeare"]
    parser = parser_for(
        "python train.py",
        description,
        (TrainConfig, train_defaults),
        (GPTConfig, model_defaults),
        (LaunchConfig, None),
    )
    namespace = parser.parse_args(argv)
    name = getattr(namespace, "preset", "shakespeare")
    if name not in RUN_PRESETS:
        raise UserError(f"unknown --preset {name!r}; choose one of {', '.join(RUN_PRESETS)}")
    train_base, model_base = RUN_PRESETS[name]
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    train_flags = frozenset(k for k in vars(namespace) if k in {f.name for f in dataclasses.fields(TrainConfig)})
    return RunConfig(
        train_config=_typed_length_wins(build(TrainConfig, namespace, train_base), train_flags),
        model_config=build(GPTConfig, namespace, model_base),
        model_flags=frozenset(k for k in vars(namespace) if k in model_fields),
        train_flags=train_flags,
        launch_config=build(LaunchConfig, namespace),
    )


def _typed_length_wins(cfg: TrainConfig, flags: frozenset[str]) -> TrainConfig:
    """A --max_steps on the command line beats the --epochs a preset (sft) derives max_steps from."""
    if {"max_steps", "epochs"} <= flags:
        raise UserError("--max_steps and --epochs both set the run's length; pass one of them")
    if "max_steps" in flags and cfg.epochs is not None:
        return dataclasses.replace(cfg, epochs=None)
    return cfg
