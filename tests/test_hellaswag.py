"""HellaSwag: scores equal transformers' (build-nanogpt's method), fixed shapes, clear errors, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tiktoken
from eval_utils import TinyGPT2, hf_token_log_probs, tiny_gpt2

from jaxgpt.checkpoints.loading import load_model
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh, shard_model
from jaxgpt.data.shards import write_shard
from jaxgpt.eval import evaluate_hellaswag, load_hellaswag, score_endings
from jaxgpt.eval import hellaswag as hs
from jaxgpt.eval.scoring import SMALLEST_BUCKET
from jaxgpt.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def item(ind: int, activity: str, ctx_a: str, ctx_b: str, endings: list[str], label: int) -> dict:
    """A record with every field of HellaSwag's jsonl."""
    return {
        "ind": ind, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}".strip(),
        "split": "val", "split_type": "indomain", "label": label, "endings": endings, "source_id": f"test~{ind}",
    }  # fmt: skip


ITEMS = [
    item(0, "Washing dishes", "A woman stands at a kitchen sink filled with soapy water.", "She",
         ["scrubs a plate with a sponge and rinses it under the tap.", "throws the plate out of the window.",
          "starts singing into a wooden spoon while the dog watches.", "is a plate."], 0),
    item(1, "Riding a bike", "A boy pushes his bike to the top of a hill.", "He",
         ["rides down the hill, gaining speed as he goes.", "eats the bike.",
          "paints the hill blue with a small brush and a bucket of paint he found.", "sleeps."], 0),
    item(2, "Home and Garden", "[header] How to repot a plant [title] Choose a larger pot. [step] Pick a pot that "
         "is one or two inches wider than the current one, with holes in the bottom so water can drain.", "",
         ["[title] Water the plant a day before repotting. [step] Moist soil holds the roots together.",
          "[title] Bury the pot in the backyard. [step] Leave it there for a year.", "Pots are round.",
          "[title] Cut all of the roots off. [step] The plant will grow new ones in a week or so."], 0),
    item(3, "Playing the piano", "A man sits down at a grand piano on a stage.", "He",
         ["begins to play a slow song while the audience listens.", "closes the lid and leaves.",
          "plays.", "lifts the piano over his head and carries it off the stage to the parking lot."], 3),
    item(4, "Making a sandwich", "Two slices of bread are laid on a cutting board.", "A person",
         ["spreads butter on one slice and adds ham and cheese.", "puts the board in the oven for an hour.",
          "folds the bread into a paper plane.", "jumps."], 2),
    item(5, "Shoveling snow", "Snow covers the driveway after a long storm at night.", "A man in a red coat",
         ["clears the snow with a shovel, piling it beside the path.", "goes swimming in the snow.",
          "calls a friend.", "builds a small house out of the snow and moves into it for the rest of the winter."], 1),
]  # fmt: skip


def write_jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("\n".join([*(json.dumps(r) for r in records), *extra_lines]) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyGPT2:
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def items_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl", ITEMS)


def reference_scores(model_dir: Path, block_size: int = 10**9) -> tuple[np.ndarray, np.ndarray]:
    """build-nanogpt's rendering (ctx tokens + tokens of " " + ending) scored by transformers: [N, 4] sum, mean.

    Rows longer than block_size + 1 keep their last block_size + 1 tokens.
    """
    enc = tiktoken.get_encoding("r50k_base")
    rows, n_ending = [], []
    for record in ITEMS:
        for ending in record["endings"]:
            end = enc.encode(" " + ending)
            row = (enc.encode(record["ctx"]) + end)[-(block_size + 1) :]
            rows.append(row)
            n_ending.append(min(len(end), len(row) - 1))
    log_probs = hf_token_log_probs(model_dir, rows)
    sums = np.array([lp[len(lp) - n :].sum() for lp, n in zip(log_probs, n_ending, strict=True)])
    means = sums / np.array(n_ending)
    return sums.reshape(-1, 4), means.reshape(-1, 4)


def test_scores_and_predictions_match_transformers(tiny, items_file):
    items = load_hellaswag(items_file)
    assert [i.label for i in items] == [r["label"] for r in ITEMS] and items[2].activity_label == "Home and Garden"
    sums, means = reference_scores(tiny.dir)
    scores = score_endings(tiny.model, items, load_tokenizer(), batch_size=4)  # 6 items: a full batch and a padded one
    np.testing.assert_allclose(scores.sum_logprob, sums, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(scores.mean_logprob, means, rtol=1e-6, atol=1e-5)

    pred, pred_norm = (-sums).argmin(axis=1), (-means).argmin(axis=1)  # build-nanogpt: argmin of the loss
    assert (pred != pred_norm).any(), "the test items must tell acc from acc_norm apart"
    labels = np.array([r["label"] for r in ITEMS])
    result = evaluate_hellaswag(tiny.model, items, load_tokenizer(), batch_size=4, progress=False)
    assert result == {
        "acc": pytest.approx(np.mean(pred == labels)),
        "acc_norm": pytest.approx(np.mean(pred_norm == labels)),
        "num_items": len(ITEMS),
    }
    assert np.array_equal(scores.sum_logprob.argmax(axis=1), pred)
    assert np.array_equal(scores.mean_logprob.argmax(axis=1), pred_norm)


def test_long_rows_are_truncated_from_the_left(tmp_path, items_file):
    short = tiny_gpt2(tmp_path / "short", n_positions=16, seed=1)
    sums, means = reference_scores(short.dir, block_size=16)
    scores = score_endings(short.model, load_hellaswag(items_file), load_tokenizer(), batch_size=2)
    np.testing.assert_allclose(scores.sum_logprob, sums, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(scores.mean_logprob, means, rtol=1e-6, atol=1e-5)


def test_no_recompilation_across_batches_and_calls(tiny, items_file):
    items = load_hellaswag(items_file)
    lengths = [
        max(len(r) - 1 for r, _ in rows) for rows in hs.render(items, tiny.model.config.block_size, load_tokenizer())
    ]
    items = [i for i, n in zip(items, lengths, strict=True) if n <= SMALLEST_BUCKET]  # one length bucket
    assert len({n for n in lengths if n <= SMALLEST_BUCKET}) >= 4  # ...and different context lengths
    score_endings(tiny.model, items[:1], load_tokenizer(), batch_size=1)  # compiles the one shape
    same_weights_again = load_model(tiny.dir)  # training rebuilds its model from the parameters at each call
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        score_endings(tiny.model, items, load_tokenizer(), batch_size=1)  # one batch per context length
        evaluate_hellaswag(same_weights_again, items[::-1], load_tokenizer(), batch_size=1, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_sharded_mesh_gives_the_same_scores(tiny, items_file):
    items = load_hellaswag(items_file)
    expected = score_endings(tiny.model, items, load_tokenizer(), batch_size=4)
    mesh = make_mesh("4x2")
    sharded = shard_model(load_model(tiny.dir, pad_vocab_multiple=64), mesh)
    scores = score_endings(sharded, items, load_tokenizer(), mesh=mesh)  # default batch size: 8 items, 32 rows over 4
    np.testing.assert_allclose(scores.sum_logprob, expected.sum_logprob, rtol=1e-5)
    with pytest.raises(UserError, match="not divisible"):
        score_endings(sharded, items, load_tokenizer(), batch_size=1, mesh=make_mesh("8x1"))


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"]}', "missing field(s) label"),
        ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}', "'endings' must be a list of 4 strings, got 3"),
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "'label' must be an integer from 0 to 3"),
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "x"}', "'label' must be an integer"),
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1', "invalid JSON"),
        ('["A man", ["a", "b", "c", "d"], 1]', "expected a JSON object"),
    ],
)
def test_malformed_line_is_a_user_error_naming_the_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ITEMS[:2], (bad_line,))
    with pytest.raises(UserError) as err:
        load_hellaswag(path)
    assert f"bad.jsonl, line 3: {message}" in str(err.value)


def test_download_is_cached_and_offline_asks_for_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hs, "HELLASWAG_URL", (tmp_path / "nowhere.jsonl").as_uri())  # fails like no network
    with pytest.raises(UserError, match=r"Offline\? Pass a local copy .*--hellaswag PATH") as err:
        load_hellaswag()
    assert "\n" not in str(err.value) and not list((tmp_path / "cache").iterdir())  # no partial file left
    write_jsonl(tmp_path / "nowhere.jsonl", ITEMS)  # now "online": downloaded once, then read from the cache
    with pytest.warns(UserWarning, match="not HellaSwag val's 10042"):
        assert len(load_hellaswag()) == len(ITEMS)
    (tmp_path / "nowhere.jsonl").unlink()
    with pytest.warns(UserWarning):
        assert len(load_hellaswag()) == len(ITEMS)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "jaxgpt.eval", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_end_to_end(tiny, items_file, tmp_path):
    write_shard(tmp_path / "test_val_000000.bin", np.arange(300) * 7 % 50257)
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": "run"}\n')
    args = ["--init_from", str(tiny.dir), "--val_data", str(tmp_path), "--hellaswag", str(items_file)]
    proc = run_cli(*args, "--results", str(results), "--batch_size", "8")
    assert proc.returncode == 0, proc.stderr
    for metric in ("val_loss", "perplexity", "acc", "acc_norm", "num_items"):
        assert metric in proc.stdout
    lines = results.read_text().splitlines()
    assert len(lines) == 2  # appended
    record = json.loads(lines[1])
    assert set(record) == {
        "init_from",
        "timestamp",
        "val_loss",
        "perplexity",
        "num_tokens",
        "acc",
        "acc_norm",
        "num_items",
    }
    assert record["num_items"] == len(ITEMS) and record["num_tokens"] == 299 and record["init_from"] == str(tiny.dir)


@pytest.mark.parametrize(
    "args",
    [
        ["--val_data", "/nonexistent/shards"],
        ["--hellaswag", "/nonexistent/hellaswag_val.jsonl"],
        ["--batch_size", "8"],  # nothing to evaluate
        ["--val_data", "{tmp}", "--init_from", "{tmp}/no-such-model"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tiny, tmp_path, args):
    write_shard(tmp_path / "test_val_000000.bin", np.arange(10))
    proc = run_cli("--init_from", str(tiny.dir), *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
