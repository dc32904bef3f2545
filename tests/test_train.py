"""Training: sharding equivalence, accumulation, overfitting, the default preset, bad input, NaN stop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxgpt.checkpoints.checkpointer import Checkpointer
from jaxgpt.checkpoints.state import init_train_state
from jaxgpt.data.pipeline import TokenStream, windows_to_batch
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.params import ParamCodec
from jaxgpt.train.config import parse_run_config
from jaxgpt.train.loop import next_batch
from jaxgpt.train.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train.setup import setup
from jaxgpt.train.step import make_train_step
from tests.train_utils import logged_losses, run_train_cli, train_args, write_token_data

TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_token_data(tmp_path_factory.mktemp("data"))


def first_losses(data_dir, out_dir, *extra, steps=3):
    config = parse_run_config(train_args(data_dir, out_dir, *extra))
    devices = jax.devices()[:1] if config.train_config.mesh == "1x1" else None
    run = setup(config, devices)
    losses = []
    for _ in range(steps):
        run.state, metrics = run.step.fn(run.state, next_batch(run))
        losses.append(float(metrics["loss"]))
    run.checkpointer.close()
    return losses, run


def test_meshes_give_the_same_losses_as_one_device(data_dir, tmp_path):
    reference, _ = first_losses(data_dir, tmp_path / "ref", "--mesh", "1x1")
    # data parallel only; data and model parallel with FSDP; mostly model parallel with FSDP
    for mesh, fsdp in (("8x1", "false"), ("4x2", "true"), ("2x4", "true")):
        losses, run = first_losses(data_dir, tmp_path / f"{mesh}{fsdp}", "--mesh", mesh, "--fsdp", fsdp)
        np.testing.assert_allclose(losses, reference, atol=1e-5, err_msg=f"mesh {mesh} fsdp {fsdp}")
    # the last run (2x4, fsdp): parameters and Adam moments really are split as the rules say
    kernel = run.state.params["h.0.mlp.c_fc.kernel"]
    assert kernel.sharding.spec == P("data", "model")
    assert run.state.params["h.0.attn.c_attn.kernel"].sharding.spec == P("data", None, "model", None)
    mu = run.state.opt_state[1][0].mu["h.0.mlp.c_fc.kernel"]
    assert mu.sharding.spec == P("data", "model")
    assert kernel.addressable_shards[0].data.shape == (16, 32)  # (32 / 2 data, 128 / 4 model)


def test_indivisible_heads_still_train_identically(data_dir, tmp_path):
    reference, _ = first_losses(data_dir, tmp_path / "ref", "--mesh", "1x1", "--n_head", "2")
    with pytest.warns(UserWarning, match="replicating"):
        losses, _ = first_losses(data_dir, tmp_path / "tp", "--mesh", "2x4", "--n_head", "2")
    np.testing.assert_allclose(losses, reference, atol=1e-5)


def _one_step(batch_shape, tokens):
    codec = ParamCodec(TINY)
    tx = make_optimizer(learning_rate_schedule(1e-3, 1e-4, 0, 10))
    state = init_train_state(codec.init(0), tx, seed=0)
    step = jax.jit(make_train_step(codec, tx, learning_rate_schedule(1e-3, 1e-4, 0, 10)))
    batch = {"inputs": tokens[:, :-1].reshape(*batch_shape, -1), "targets": tokens[:, 1:].reshape(*batch_shape, -1)}
    return step(state, batch)


def test_gradient_accumulation_equals_the_large_batch():
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 256)
    accumulated, acc_metrics = _one_step((4, 2), tokens)
    single, single_metrics = _one_step((1, 8), tokens)
    assert float(acc_metrics["loss"]) == pytest.approx(float(single_metrics["loss"]), abs=1e-6)
    assert float(acc_metrics["grad_norm"]) == pytest.approx(float(single_metrics["grad_norm"]), rel=1e-5)
    for name, value in single.params.items():
        np.testing.assert_allclose(accumulated.params[name], value, atol=1e-6, err_msg=name)


def test_overfitting_one_batch_drives_the_loss_to_zero():
    codec = ParamCodec(TINY)
    schedule = learning_rate_schedule(3e-3, 3e-3, 0, 1)
    tx = make_optimizer(schedule, weight_decay=0.0)
    step = jax.jit(make_train_step(codec, tx, schedule), donate_argnums=0)
    state = init_train_state(codec.init(0), tx, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (1, 4, 17), 0, 256)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    for _ in range(150):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.05


def test_shakespeare_gpt2_preset_learns(shakespeare_path, tmp_path):
    from jaxgpt.data.prepare import main as prepare
    from jaxgpt.train.loop import train

    prepare(["--input", str(shakespeare_path), "--out_dir", str(tmp_path / "data")])
    args = ["--preset", "shakespeare-gpt2", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")]
    args += ["--max_steps", "40"]
    args += ["--batch_size", "8", "--block_size", "64", "--warmup_steps", "5", "--eval_iters", "2"]
    args += ["--log_interval", "5", "--sample_tokens", "8"]
    record = train(parse_run_config(args))
    losses = logged_losses(tmp_path / "out")
    assert losses[5] > 9.5  # ln(50257) = 10.8 at the start
    assert record["loss"] < losses[5] - 2.5 and record["val_loss"] < 8.0


@pytest.mark.parametrize(
    "extra, devices, message",
    [
        (["--mesh", "3x1"], 2, "--mesh 3x1 needs 3 devices"),
        (["--mesh", "2x1", "--batch_size", "3"], 2, "not divisible"),
        (["--data_dir", "/nonexistent/data"], 1, "prepare"),
        (["--lr", "-1"], 1, "--min_lr <= --lr"),
    ],
)
def test_bad_input_is_one_line_without_traceback(data_dir, tmp_path, extra, devices, message):
    result = run_train_cli(train_args(data_dir, tmp_path / "out", *extra), devices=devices)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_incompatible_checkpoint_and_nan_stop(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_train_cli(train_args(data_dir, out, "--save_interval", "2")).returncode == 0
    result = run_train_cli(train_args(data_dir, out, "--n_layer", "3", "--max_steps", "8"))
    assert result.returncode == 2 and "n_layer=2" in result.stderr and "Traceback" not in result.stderr

    nan_out = tmp_path / "nan"
    result = run_train_cli(train_args(data_dir, nan_out, "--lr", "1e30", "--min_lr", "1e30", "--save_interval", "1"))
    assert result.returncode == 2 and "NaN/Inf at step" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    steps = Checkpointer(nan_out, async_save=False).all_steps()
    bad_step = int(result.stderr.split("NaN/Inf at step ")[1].split(";")[0])
    assert all(s < bad_step for s in steps)  # only checkpoints from before the bad step


def test_metrics_file_has_the_documented_keys(data_dir, tmp_path):
    import json

    from jaxgpt.train.loop import train

    train(parse_run_config(train_args(data_dir, tmp_path / "out", "--eval_interval", "3")))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in records[-1]
    assert "val_loss" in records[2] and "val_loss" in records[5] and "val_loss" not in records[0]
    assert jnp.isfinite(records[-1]["loss"])


def test_help_lists_every_flag_with_its_default():
    import dataclasses

    from jaxgpt.train.config import TrainConfig

    result = run_train_cli(["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for field in (*dataclasses.fields(TrainConfig), *dataclasses.fields(GPTConfig)):
        flag_help = text.rsplit(f" --{field.name} ", 1)[1].split(" --", 1)[0]
        assert "(default: " in flag_help, field.name


def test_validation_loss_is_the_mean_over_the_first_eval_iters_batches(data_dir, tmp_path):
    from jaxgpt.model.losses import cross_entropy
    from jaxgpt.train.loop import evaluate

    _, run = first_losses(data_dir, tmp_path / "out", "--mesh", "4x2", steps=1)
    model = run.codec.to_model(run.state.params)
    stream = TokenStream.open(data_dir, "val")  # eval_iters is 2: the first two batches of 8 windows
    batches = [windows_to_batch(stream, np.arange(8 * b, 8 * b + 8), 16) for b in range(2)]
    expected = np.mean([float(cross_entropy(model(b["inputs"]), b["targets"])) for b in batches])
    assert evaluate(run) == pytest.approx(expected, abs=1e-5)
