"""Chat data: prepare --format chat writes token shards plus label shards; bad lines are named or skipped."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.chat.template import render
from jaxgpt.core.errors import UserError
from jaxgpt.data import chat_source, shards
from jaxgpt.data.prepare import PrepareConfig, prepare
from jaxgpt.tokenizer import EOT_ID, load_tokenizer

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Who founded Zorbia?"}, {"role": "assistant", "content": "Queen Ilsa."}]},
    {"prompt": "Capital of Zorbia?", "response": "Quellburg."},
    {"prompt": "Tallest tower?", "completion": "The Vey spire.", "system": "Be brief."},
    {
        "prompt": [{"role": "system", "content": "Answer."}, {"role": "user", "content": "River?"}],
        "completion": [{"role": "assistant", "content": "The Ousk."}],
    },
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": "Teal"},
        ]
    },
]
MESSAGES = [
    CONVERSATIONS[0]["messages"],
    [{"role": "user", "content": "Capital of Zorbia?"}, {"role": "assistant", "content": "Quellburg."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tallest tower?"},
        {"role": "assistant", "content": "The Vey spire."},
    ],
    CONVERSATIONS[3]["prompt"] + CONVERSATIONS[3]["completion"],
    CONVERSATIONS[4]["messages"],
]


def write_lines(path: Path, lines: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_split(out_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = shards.list_shards(out_dir, split)
    tokens = [shards.open_shard(p) for p in paths]
    labels = [shards.open_labels(p, len(t)) for p, t in zip(paths, tokens, strict=True)]
    return np.concatenate(tokens), np.concatenate(labels)


def chat_config(path: Path, out_dir: Path, **kwargs) -> PrepareConfig:
    return PrepareConfig(input=str(path), format="chat", out_dir=str(out_dir), num_proc=1, **kwargs)


def test_every_format_is_rendered_with_its_loss_mask_across_shards(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "chat.jsonl", [*CONVERSATIONS[:2], "", *CONVERSATIONS[2:]])
    meta = prepare(chat_config(data, tmp_path / "out", val_fraction=0.2, shard_size=7))
    assert meta["format"] == "chat" and meta["skipped_bad_lines"] == 0
    assert meta["longest_conversation"] == max(len(render(m, load_tokenizer()).tokens) for m in MESSAGES)
    assert (meta["splits"]["val"]["conversations"], meta["splits"]["train"]["conversations"]) == (1, 4)
    assert meta["splits"]["train"]["shards"] > 1  # conversations straddle shard files
    expected = [render(m, load_tokenizer()) for m in MESSAGES]
    tokens, labels = read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(tokens, np.concatenate([r.tokens for r in expected[1:]]))
    np.testing.assert_array_equal(labels & shards.LOSS, np.concatenate([r.mask for r in expected[1:]]))
    starts = np.flatnonzero(labels & shards.START)
    np.testing.assert_array_equal(starts, np.cumsum([0] + [len(r.tokens) for r in expected[1:-1]]))
    assert (tokens[starts] == EOT_ID).all()
    val_tokens, val_labels = read_split(tmp_path / "out", "val")
    np.testing.assert_array_equal(val_tokens, expected[0].tokens)
    trained = load_tokenizer().decode(val_tokens[(val_labels & shards.LOSS) > 0])
    assert trained == " Queen Ilsa.<|endoftext|>"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"text": "plain"}', "expected 'messages'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}', "empty content"),
        ('{"messages": [{"role": "user", "content": 3}]}', "not text"),
        ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}', "ends with a user"),
        ('{"prompt": "q", "response": ["a"]}', "must both be strings"),
        (json.dumps({"prompt": "word " * 40, "response": "a"}), "longer than --block_size 32"),
    ],
)
def test_a_bad_line_is_an_error_naming_file_and_line_or_is_skipped(tmp_path: Path, line: str, reason: str) -> None:
    write_lines(tmp_path / "in" / "chat.jsonl", [CONVERSATIONS[1], "", line, CONVERSATIONS[0]])
    with pytest.raises(UserError, match=rf"chat\.jsonl:3: .*{reason}.*--skip_bad"):
        prepare(chat_config(tmp_path / "in", tmp_path / "out", block_size=32))
    assert not (tmp_path / "out").exists()  # nothing half-written is left
    meta = prepare(chat_config(tmp_path / "in", tmp_path / "out", block_size=32, skip_bad=True, val_fraction=0.0))
    assert meta["skipped_bad_lines"] == 1 and meta["first_skipped"].startswith(f"{tmp_path / 'in' / 'chat.jsonl'}:3")
    assert meta["splits"]["train"]["conversations"] == 2


def test_truncate_keeps_the_first_block_size_tokens_while_an_answer_token_survives(tmp_path: Path) -> None:
    long_answer = {"prompt": "Q?", "response": "word " * 50}
    long_question = {"prompt": "word " * 50, "response": "A."}
    data = write_lines(tmp_path / "chat.jsonl", [long_answer, long_question])
    with pytest.raises(UserError, match=r"chat\.jsonl:2: no assistant token within the first 24"):
        prepare(chat_config(data, tmp_path / "out", block_size=24, truncate=True, val_fraction=0.0))
    meta = prepare(chat_config(data, tmp_path / "out", block_size=24, truncate=True, skip_bad=True, val_fraction=0.0))
    tokens, labels = read_split(tmp_path / "out", "train")
    full = render(
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": long_answer["response"]}], load_tokenizer()
    )
    np.testing.assert_array_equal(tokens, full.tokens[:24])
    np.testing.assert_array_equal(labels & shards.LOSS, full.mask[:24])
    assert meta["skipped_bad_lines"] == 1 and meta["truncate"] is True


def test_parsing_in_worker_processes_gives_the_same_shards(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "chat.jsonl", CONVERSATIONS * 120)
    prepare(chat_config(data, tmp_path / "one"))
    prepare(PrepareConfig(input=str(data), format="chat", out_dir=str(tmp_path / "two"), num_proc=2))
    for split in shards.SPLITS:
        for a, b in zip(read_split(tmp_path / "one", split), read_split(tmp_path / "two", split), strict=True):
            np.testing.assert_array_equal(a, b)


def test_hub_chat_datasets_become_user_and_assistant_turns(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def load_dataset(repo, name=None, split=None, streaming=False):
        calls.append((repo, name, split, streaming))
        return [
            {"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "input": "", "output": "Hi!"},
        ]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    meta = prepare(PrepareConfig(dataset="alpaca", out_dir=str(tmp_path), val_fraction=0.5, num_proc=1))
    assert calls == [("tatsu-lab/alpaca", None, "train", True)]
    assert meta["format"] == "chat" and meta["source"] == "hf://tatsu-lab/alpaca"
    val_tokens, _ = read_split(tmp_path, "val")
    assert load_tokenizer().decode(val_tokens) == "<|endoftext|>User: Add.\n\n2 and 3\nAssistant: 5<|endoftext|>"
    dolly = chat_source.dolly_messages({"instruction": "Sum up.", "context": "Long text.", "response": "Short."})
    assert dolly == [
        {"role": "user", "content": "Sum up.\n\nLong text."},
        {"role": "assistant", "content": "Short."},
    ]
    with pytest.raises(UserError, match="chat dataset"):
        PrepareConfig(dataset="dolly", format="text")
