"""OpenAI's GPT-2 weights in Hugging Face format <-> jaxgpt's NNX model.

Hugging Face stores GPT-2's projections as ``Conv1D`` weights, already laid out
(in, out), so no transpose is needed (nanoGPT transposes only because torch's
``Linear`` is (out, in)). Our attention kernels keep heads on their own axis,
so the conversion is a reshape. The attention-mask buffers of old checkpoints
(``attn.bias``, ``attn.masked_bias``) are skipped and the output head is tied to
the token embedding.

The command line (``python -m jaxgpt.convert``) is in ``__main__.py``; this module is the library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.core.errors import UserError
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.model.params import ParamCodec

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not parameters
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _param_table(config: GPTConfig) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Our parameter path -> (HF tensor name, our shape, HF shape). One table serves both directions."""
    options = config.non_gpt2_options()
    if options:
        raise UserError(
            f"this model is not GPT-2's architecture ({', '.join(options)}): Hugging Face's GPT2LMHeadModel "
            "has no place for it, so it cannot be exported in GPT-2 format. Keep it as a jaxgpt out_dir "
            "(sample.py, --init_from and the evaluators read that directly)."
        )
    c, h, d = config.n_embd, config.n_head, config.head_dim
    table = {
        "wte.embedding": ("wte.weight", (config.padded_vocab_size, c), (config.vocab_size, c)),
        "wpe.embedding": ("wpe.weight", (config.block_size, c), (config.block_size, c)),
        "ln_f.scale": ("ln_f.weight", (c,), (c,)),
        "ln_f.bias": ("ln_f.bias", (c,), (c,)),
    }
    for i in range(config.n_layer):
        for ours, theirs, our_shape, their_shape in [
            ("ln_1.scale", "ln_1.weight", (c,), (c,)),
            ("ln_1.bias", "ln_1.bias", (c,), (c,)),
            ("attn.c_attn.kernel", "attn.c_attn.weight", (c, 3, h, d), (c, 3 * c)),
            ("attn.c_attn.bias", "attn.c_attn.bias", (3, h, d), (3 * c,)),
            ("attn.c_proj.kernel", "attn.c_proj.weight", (h, d, c), (c, c)),
            ("attn.c_proj.bias", "attn.c_proj.bias", (c,), (c,)),
            ("ln_2.scale", "ln_2.weight", (c,), (c,)),
            ("ln_2.bias", "ln_2.bias", (c,), (c,)),
            ("mlp.c_fc.kernel", "mlp.c_fc.weight", (c, 4 * c), (c, 4 * c)),
            ("mlp.c_fc.bias", "mlp.c_fc.bias", (4 * c,), (4 * c,)),
            ("mlp.c_proj.kernel", "mlp.c_proj.weight", (4 * c, c), (4 * c, c)),
            ("mlp.c_proj.bias", "mlp.c_proj.bias", (c,), (c,)),
        ]:
            table[f"h.{i}.{ours}"] = (f"h.{i}.{theirs}", our_shape, their_shape)
    return table


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPTConfig:
    """Our config from a Hugging Face ``config.json`` dict (inference defaults: float32, no dropout)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"not a GPT-2 checkpoint: model_type is {hf.get('model_type')!r}")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"unsupported activation {hf['activation_function']!r}: GPT-2 uses gelu_new (tanh)")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise UserError(f"unsupported n_inner {hf['n_inner']}: GPT-2's MLP is 4 x n_embd")
    required = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
    missing = [key for key in required if not isinstance(hf.get(key), int)]
    if missing:
        raise UserError(f"config.json lacks integer {', '.join(missing)}: not a complete GPT-2 config")
    fields = dict(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=0.0,
    )
    return GPTConfig(**{**fields, **overrides})


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` (transformers' GPT2Config fields) of a GPT-2-architecture config."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "use_cache": True,
        "dtype": "float32",
    }


def looks_local(text: str) -> bool:
    """Whether a missing path was meant as a local directory rather than a hub id (``gpt2``, ``org/name``).

    Hub ids are ``name`` or ``org/name``; a path that starts at ``/``, ``.`` or ``~``, has more parts, or
    lies in a folder that exists here (``out/nothere``) is local, and so is anything under ``out/``,
    where runs are written.
    """
    parts = Path(text).parts
    return (
        text.startswith(("/", ".", "~"))
        or len(parts) > 2
        or (len(parts) == 2 and (parts[0] == "out" or Path(parts[0]).is_dir()))
    )


def resolve_hf_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; a hub id (``gpt2``...) downloaded through huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{path} is a file; pass a Hugging Face model directory or hub id")
    if looks_local(str(name_or_path)):
        raise UserError(
            f"no such run directory: {path} (nor a Hugging Face model directory); train one there first "
            f"(python train.py --out_dir {path}) or pass an existing directory"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(name_or_path), allow_patterns=["config.json", *WEIGHT_FILES])
    except Exception as err:  # offline, unknown id, missing package: all fixable by the user
        raise UserError(
            f"could not load {name_or_path!r}: not a local directory, and downloading it from the "
            f"Hugging Face hub failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Offline? Pass a local directory with config.json and model.safetensors."
        ) from err
    return Path(local)


def read_hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF checkpoint as float32 numpy, names without the ``transformer.`` prefix."""
    safetensors, pickled = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if safetensors.is_file():
            from safetensors.numpy import load_file

            raw = load_file(safetensors)
        elif pickled.is_file():
            import torch

            raw = {k: v.float().numpy() for k, v in torch.load(pickled, weights_only=True).items()}
        else:
            raise UserError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")
    except UserError:
        raise
    except Exception as err:  # safetensors and torch raise their own types for truncated or foreign files
        weights = safetensors if safetensors.is_file() else pickled
        raise UserError(f"{weights} is damaged or truncated ({type(err).__name__}: {err}); download it again") from None
    return {k.removeprefix("transformer."): np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def params_from_hf(tensors: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """Our flat parameters from HF tensors; a missing, extra or mis-shaped tensor is an error naming it."""
    table = _param_table(config)
    expected = {theirs for theirs, _, _ in table.values()}
    extra = sorted(
        k for k in tensors if k not in expected and not k.endswith(IGNORED_SUFFIXES) and k != "lm_head.weight"
    )
    missing = sorted(expected - tensors.keys())
    if missing or extra:
        raise UserError(f"checkpoint does not match GPT-2 {config.n_layer} layers: missing {missing}, extra {extra}")
    if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
        raise UserError("lm_head.weight differs from wte.weight: GPT-2's output head must be tied to the embedding")
    params = {}
    for ours, (theirs, our_shape, their_shape) in table.items():
        value = tensors[theirs]
        if value.shape != their_shape:
            raise UserError(f"tensor {theirs} has shape {value.shape}, expected {their_shape} for this config")
        if theirs == "wte.weight":  # pad rows up to the padded vocabulary; they are masked in the logits
            value = np.pad(value, ((0, our_shape[0] - value.shape[0]), (0, 0)))
        params[ours] = value.reshape(our_shape)
    return params


def params_to_hf(params: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """HF tensors (``transformer.`` names, Conv1D layout) from our flat parameters."""
    out = {}
    for ours, (theirs, _, their_shape) in _param_table(config).items():
        value = np.asarray(params[ours], dtype=np.float32)
        if theirs == "wte.weight":
            value = value[: config.vocab_size]
        out[f"transformer.{theirs}"] = np.ascontiguousarray(value.reshape(their_shape))
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def load_hf_gpt2(name_or_path: str | os.PathLike, **overrides: Any) -> GPT:
    """A GPT from a Hugging Face GPT-2 directory or hub id; float32 and dropout-free unless overridden."""
    directory = resolve_hf_dir(name_or_path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory} has no config.json; is it a Hugging Face GPT-2 directory?")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as err:
        raise UserError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_path} is not a JSON object")
    config = config_from_hf(hf_config, **overrides)
    codec = ParamCodec(config)  # a GPT built without random initialisation, filled with the HF weights
    return codec.to_model(codec.cast(params_from_hf(read_hf_tensors(directory), config)))


def save_hf_gpt2(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    tensors = params_to_hf(ParamCodec(model.config).to_host(model), model.config)  # checks the architecture first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o666 & ~_umask())  # safetensors creates it 0600
    (out / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    return out
