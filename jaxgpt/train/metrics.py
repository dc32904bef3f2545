"""Throughput accounting: FLOPs per token, device peaks and MFU."""

from __future__ import annotations

import jax

from jaxgpt.model.config import GPTConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Matched by substring of device_kind.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token, nanoGPT/PaLM's estimate: 6N + 12·L·H·Q·T.

    N: non-embedding parameters (the token embedding counts: it is also the output head), L layers,
    H heads, Q head size, T the sequence length (the attention score and value matmuls).
    """
    t = config.block_size if seq_len is None else seq_len
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * t


def peak_flops_per_device(override: float | None = None) -> float | None:
    """The device's bf16 peak from the table, ``override`` if given, None if unknown (e.g. CPU)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def mfu(tokens_per_s: float, flops_token: float, peak_per_device: float | None, n_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the mesh's peak."""
    if not peak_per_device:
        return None
    return tokens_per_s * flops_token / (peak_per_device * n_devices)
