"""Model configuration: GPT-2's four sizes and any custom one."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option, tagged

DType = Literal["float32", "bfloat16", "float16"]
AttentionImpl = Literal["xla", "cudnn", "splash", "auto"]
LossImpl = Literal["fused", "fused_pallas", "plain", "auto"]
PositionEmbedding = Literal["learned", "rotary"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "relu2"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """GPT model shape and numerics."""

    # Tags (see shape_fields, runtime_fields, ARCHITECTURE_OPTIONS): shape= a size, runtime= how the model runs.
    vocab_size: int = option(50257, "tokens in the vocabulary (GPT-2 BPE: 50257)", shape="weights")
    block_size: int = option(1024, "context length: the largest sequence the model reads", shape="context")
    n_layer: int = option(12, "transformer blocks", shape="weights")
    n_head: int = option(12, "attention heads per block", shape="weights")
    n_embd: int = option(768, "width of the residual stream", shape="weights")
    dropout: float = option(0.0, "dropout rate on embeddings, attention weights and residual branches", runtime=True)
    pad_vocab_multiple: int = option(
        1, "pad the embedding table to a multiple of this (64 gives 50304: faster)", shape="padding", runtime=True
    )
    dtype: DType = option("float32", "compute dtype of activations and matmuls", runtime=True)
    param_dtype: DType = option("float32", "storage dtype of the parameters (keep float32 to train)", runtime=True)
    attention: AttentionImpl = option(
        "auto",
        "attention kernel: xla, cudnn (flash, GPU), splash (flash, TPU; interpreted elsewhere: slow) or auto",
        runtime=True,
    )
    loss: LossImpl = option(
        "auto",
        "head + cross-entropy: fused (tiled, no [tokens, vocab] logits), fused_pallas (plus a Pallas head kernel, "
        "GPU), plain, or auto (plain on CPU, else fused)",
        runtime=True,
    )
    remat: bool = option(
        False, "rematerialise each block in the backward pass (saves memory, costs FLOPs)", runtime=True
    )
    layer_norm_eps: float = option(1e-5, "LayerNorm/RMSNorm epsilon (GPT-2: 1e-5)")
    # Architecture options beyond GPT-2 (modded-nanogpt's speedrun); the defaults are GPT-2 exactly.
    # architecture=True: the options that change the computation away from GPT-2's (zero_init_proj only changes
    # the start).
    position_embedding: PositionEmbedding = option(
        "learned", "learned (GPT-2's wpe table) or rotary (RoPE, no wpe)", architecture=True
    )
    rope_base: float = option(10000.0, "rotary embedding base (theta)")
    norm: Norm = option(
        "layernorm", "normalisation of the blocks and the final one: layernorm or rmsnorm", architecture=True
    )
    norm_scale: bool = option(
        True, "learnable scale in every norm (off: a parameter-free norm, as modded-nanogpt)", architecture=True
    )
    qk_norm: bool = option(
        False, "RMS-normalise queries and keys per head before attention (QK-norm)", architecture=True
    )
    activation: Activation = option(
        "gelu", "MLP nonlinearity: gelu (GPT-2's tanh approximation) or relu2 (ReLU squared)", architecture=True
    )
    tie_embeddings: bool = option(
        True, "output head shares the token embedding (off: a separate lm_head matrix)", architecture=True
    )
    bias: bool = option(True, "biases in the projections and norms", architecture=True)
    zero_init_proj: bool = option(False, "initialise the residual output projections (and an untied head) to zero")
    logit_softcap: float = option(0.0, "squash logits to (-c, c) with c*tanh(logits/c) (0: off)", architecture=True)

    def __post_init__(self) -> None:
        for name in shape_fields():
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.position_embedding == "rotary" and self.head_dim % 2:
            raise UserError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if self.logit_softcap < 0:
            raise UserError(f"logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
        if self.loss in ("fused", "fused_pallas") and self.logit_softcap:
            raise UserError("the fused loss has no logit soft-cap: use --loss plain (or auto) with --logit_softcap")

    def non_gpt2_options(self) -> list[str]:
        """The architecture options set away from GPT-2's (empty for OpenAI's architecture)."""
        gpt2 = GPTConfig()
        return [
            f"{name}={getattr(self, name)}"
            for name in ARCHITECTURE_OPTIONS
            if getattr(self, name) != getattr(gpt2, name)
        ]

    @property
    def padded_vocab_size(self) -> int:
        """The embedding table's rows: vocab_size rounded up to pad_vocab_multiple."""
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        """Each attention head's size: n_embd / n_head."""
        return self.n_embd // self.n_head

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with ``changes``, checked again as a new config is."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as the run file and the checkpoints store them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """A config from stored fields: unknown keys (another version's) are ignored, missing ones take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def shape_fields(*kinds: str) -> tuple[str, ...]:
    """GPTConfig's sizes, all positive, which a resumed run keeps from its checkpoint: of ``kinds`` (all if none)
    ``weights`` (they fix the parameters' shapes), ``context`` (block_size) and ``padding`` (pad_vocab_multiple)."""
    return tagged(GPTConfig, "shape", *kinds)


def runtime_fields() -> tuple[str, ...]:
    """GPTConfig's fields that say how a model runs (dtypes, kernels, dropout, padding), not what its weights
    are: a model loaded to fine-tune takes the command line's."""
    return tagged(GPTConfig, "runtime")


ARCHITECTURE_OPTIONS = tagged(GPTConfig, "architecture")  # changed from GPT-2's: non_gpt2_options reports them

# The four sizes OpenAI released (n_layer, n_head, n_embd); all use 1024 positions and 50257 tokens.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """The config of a named GPT-2 size, with any field overridden."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
