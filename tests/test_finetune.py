"""Fine-tuning from pretrained weights, and HellaSwag during training."""

from __future__ import annotations

import json

import numpy as np

from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import train
from jaxgpt.train.setup import setup
from tests.hf_fixtures import make_hf_gpt2
from tests.train_utils import train_args, write_token_data


def test_init_from_hf_directory_loads_weights_and_crops_context(tmp_path):
    reference = make_hf_gpt2(tmp_path / "hf", n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=256)
    data = write_token_data(tmp_path / "data")
    args = train_args(
        data, tmp_path / "out", "--init_from", str(tmp_path / "hf"), "--block_size", "16", tiny_model=False
    )
    run = setup(parse_run_config(args))
    run.checkpointer.close()
    weights = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert run.model_config.n_layer == 2 and run.model_config.n_embd == 32 and run.model_config.block_size == 16
    np.testing.assert_array_equal(run.state.params["wpe.embedding"], weights["transformer.wpe.weight"][:16])
    np.testing.assert_array_equal(run.state.params["h.1.mlp.c_fc.kernel"], weights["transformer.h.1.mlp.c_fc.weight"])


def test_hellaswag_during_training_is_logged(tmp_path):
    from tests.test_hellaswag import ITEMS, write_jsonl

    hellaswag = write_jsonl(tmp_path / "hellaswag_val.jsonl", ITEMS)
    make_hf_gpt2(tmp_path / "hf", n_layer=1, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    data = write_token_data(tmp_path / "data")
    args = train_args(
        data, tmp_path / "out", "--init_from", str(tmp_path / "hf"), "--block_size", "128", tiny_model=False
    )
    args += ["--max_steps", "2", "--hellaswag_interval", "2", "--hellaswag_path", str(hellaswag)]
    train(parse_run_config(args))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and 0.0 <= records[-1]["acc_norm"] <= 1.0 and "acc" in records[-1]
