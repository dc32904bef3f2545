from __future__ import annotations

import jax
import pytest
from flax import nnx

from jaxgpt.model.config import preset
from jaxgpt.model.gpt import GPT, non_embedding_params
from jaxgpt.train import metrics


def test_flops_per_token_is_nanogpts_formula_for_gpt2():
    config = preset("gpt2")
    n = non_embedding_params(nnx.eval_shape(lambda: GPT(config, nnx.Rngs(0))))
    assert n == 124_439_808 - 1024 * 768  # nanoGPT's get_num_params(): position embeddings excluded
    expected = 6 * n + 12 * 12 * 12 * 64 * 1024
    assert metrics.flops_per_token(config, n) == expected
    assert expected / 1e9 == pytest.approx(0.8552, abs=1e-4)  # GFLOP per token at T = 1024


def test_mfu_and_peak_lookup(monkeypatch):
    class FakeDevice:
        device_kind = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(jax, "devices", lambda: [FakeDevice()])
    assert metrics.peak_flops_per_device() == 989e12
    assert metrics.peak_flops_per_device(override=1e12) == 1e12
    FakeDevice.device_kind = "NVIDIA H100 PCIe"
    assert metrics.peak_flops_per_device() == 756e12
    FakeDevice.device_kind = "cpu"
    assert metrics.peak_flops_per_device() is None
    assert metrics.mfu(500_000, 0.85e9, 989e12, 1) == pytest.approx(0.4297, abs=1e-4)
    assert metrics.mfu(500_000, 0.85e9, None, 1) is None
