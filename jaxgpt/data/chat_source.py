"""Chat data for ``prepare --format chat``: JSON lines -> checked conversations -> tokens and labels.

Each non-blank line of a ``.jsonl`` file (``--input`` is one file or a folder of them, read in
sorted order) is one JSON object in one of the formats TRL's SFT trainer reads:

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``{"prompt": "...", "response": "..."}`` (or ``"completion"``), optionally with ``"system"``
* ``{"prompt": [messages], "completion": [messages]}``

A line is bad when it is not JSON, has none of these shapes, has an unknown role or an empty
content, does not end with an assistant message, or renders (``jaxgpt.chat``) to more than
``block_size`` tokens without ``--truncate`` (which keeps the first ``block_size`` tokens, as
TRL's ``max_length`` does, as long as some assistant token survives). A bad line is an error
naming ``file:line``, or with ``--skip_bad`` it is skipped and counted. Conversations are dealt
to val by index exactly as documents are (``sources.is_val_document``).

``--dataset alpaca`` streams tatsu-lab/alpaca (52K single-turn instructions, CC BY-NC 4.0) and
``--dataset dolly`` databricks/databricks-dolly-15k (15K, CC BY-SA 3.0) from the Hugging Face hub,
each row turned into a user message (instruction, then the input or context after a blank
line) and the assistant's answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.chat import template as chat
from jaxgpt.core.errors import UserError
from jaxgpt.data import shards, sources
from jaxgpt.tokenizer import Tokenizer

CONVERSATIONS_PER_TASK = 256  # conversations sent to a tokenizer worker at a time
SKIP_HINT = "fix the line, or pass --skip_bad to skip bad lines"


def alpaca_messages(row: dict[str, Any]) -> list[chat.Message]:
    """One Alpaca row (instruction, optional input, output) as a user turn and the assistant's answer."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def dolly_messages(row: dict[str, Any]) -> list[chat.Message]:
    """One Dolly row (instruction, optional context, response) as a user turn and the assistant's answer."""
    user = row["instruction"] + (f"\n\n{row['context']}" if row.get("context") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]


# name -> (hub repository, split, row -> messages)
HUB_CHAT_DATASETS: dict[str, tuple[str, str, Callable[[dict[str, Any]], list[chat.Message]]]] = {
    "alpaca": ("tatsu-lab/alpaca", "train", alpaca_messages),
    "dolly": ("databricks/databricks-dolly-15k", "train", dolly_messages),
}


class BadLine(ValueError):
    """Why one line is not a usable conversation (turned into a UserError naming file:line)."""


class BadLines:
    """Bad lines stop preparation with their location, or with ``skip`` are counted."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.count = 0
        self.first: str | None = None  # the first skipped line and why, for the summary

    def reject(self, origin: str, reason: str) -> None:
        """With ``skip``, counts a bad line (remembering the first); without, stops preparation with it."""
        if not self.skip:
            raise UserError(f"{origin}: {reason}; {SKIP_HINT}")
        self.count += 1
        self.first = self.first or f"{origin}: {reason}"


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One conversation read from a file or a hub dataset, where it came from and the split it goes to."""

    messages: list[chat.Message]
    origin: str  # "file:line" or "dataset row N", for error messages
    split: str


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A rendered conversation, or (``problem`` set) the reason it cannot be used."""

    split: str
    tokens: np.ndarray  # uint16
    labels: np.ndarray  # uint8: shards.LOSS | shards.START bits
    origin: str
    problem: str | None = None


def line_messages(record: object) -> list[chat.Message]:
    """The messages of one parsed JSON line in any of the accepted shapes; raises BadLine."""
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and ("response" in record or "completion" in record):
        prompt, answer = record["prompt"], record.get("response", record.get("completion"))
        if isinstance(prompt, list) and isinstance(answer, list):
            messages = prompt + answer
        elif isinstance(prompt, str) and isinstance(answer, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            if "system" in record:
                messages.insert(0, {"role": "system", "content": record["system"]})
        else:
            raise BadLine("'prompt' and 'response'/'completion' must both be strings or both lists of messages")
    else:
        raise BadLine("expected 'messages', or 'prompt' with 'response' (or 'completion')")
    try:
        messages = chat.check_messages(messages)
    except chat.ChatError as err:
        raise BadLine(str(err)) from err
    empty = next((i for i, m in enumerate(messages) if not m["content"].strip()), None)
    if empty is not None:
        raise BadLine(f"message {empty} ({messages[empty]['role']}) has empty content")
    if messages[-1]["role"] != "assistant":
        raise BadLine(f"the conversation ends with a {messages[-1]['role']} message, not the assistant's")
    return messages


def parse_line(line: str) -> list[chat.Message]:
    """The messages of one JSON line of a chat file; text that is not JSON or not a conversation is a BadLine."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadLine(f"not JSON ({err.msg} at column {err.colno})") from err
    return line_messages(record)


def chat_files(path: Path) -> list[Path]:
    """``path`` itself, or the .jsonl files below a folder in sorted order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    if not files:
        raise UserError(f"{path} holds no .jsonl files; --format chat and preference read JSON lines")
    return files


def file_records(path: Path, bad: BadLines, parse: Callable[[str], Any] = parse_line) -> Iterator[tuple[Any, str]]:
    """(``parse(line)``, "file:line") of every good line of the JSON-lines files at ``path``."""
    for file in chat_files(path):
        try:
            with open(file, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    origin = f"{file}:{number}"
                    try:
                        yield parse(line), origin
                    except BadLine as err:
                        bad.reject(origin, str(err))
        except UnicodeDecodeError as err:
            raise UserError(f"{file}: not UTF-8 text ({err})") from err


def hub_conversations(
    dataset: str, bad: BadLines, data_files: str | None = None
) -> Iterator[tuple[list[chat.Message], str]]:
    """Streams a chat dataset from the Hugging Face hub (needs ``datasets``; the network unless ``data_files``)."""
    repo, split, to_messages = HUB_CHAT_DATASETS[dataset]
    for number, row in enumerate(sources.hub_rows(repo, None, split, data_files), start=1):
        origin = f"{repo} row {number}"
        try:
            yield line_messages({"messages": to_messages(row)}), origin
        except BadLine as err:
            bad.reject(origin, str(err))


def conversations(
    input_path: str | None, dataset: str | None, val_fraction: float, bad: BadLines, data_files: str | None = None
) -> tuple[Iterator[Conversation], str]:
    """The good conversations with their split, and a description of the source."""
    if dataset is not None:
        found = hub_conversations(dataset, bad, data_files)
        source = data_files or f"hf://{HUB_CHAT_DATASETS[dataset][0]}"
    else:
        found, source = file_records(Path(input_path), bad), str(input_path)  # type: ignore[arg-type]
    split = lambda i: "val" if sources.is_val_document(i, val_fraction) else "train"
    dealt = (Conversation(m, origin, split(i)) for i, (m, origin) in enumerate(found))
    return dealt, source


def batches(items: Iterable[Conversation], size: int = CONVERSATIONS_PER_TASK) -> Iterator[list[Conversation]]:
    """``items`` in lists of ``size`` (the last one shorter): the units of work the encoding processes take."""
    batch: list[Conversation] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode(conversation: Conversation, tokenizer: Tokenizer, block_size: int, truncate: bool) -> Encoded:
    """Renders one conversation into tokens and labels, cut to ``block_size`` tokens if ``truncate``."""
    rendered = chat.render(conversation.messages, tokenizer)
    tokens, mask = rendered.tokens, rendered.mask
    problem = None
    if len(tokens) > block_size:
        if truncate:
            tokens, mask = tokens[:block_size], mask[:block_size]
            if not mask.any():
                problem = f"no assistant token within the first {block_size} tokens (--block_size) after --truncate"
        else:
            problem = f"{len(tokens)} tokens, longer than --block_size {block_size} (or pass --truncate)"
    labels = mask * np.uint8(shards.LOSS)
    labels[0] |= shards.START
    return Encoded(conversation.split, tokens.astype(np.uint16), labels, conversation.origin, problem)


def encode_batch(
    conversations: list[Conversation], tokenizer: Tokenizer, block_size: int, truncate: bool
) -> list[Encoded]:
    """Encodes a task of conversations (in a worker process)."""
    return [encode(c, tokenizer, block_size, truncate) for c in conversations]


def accepted(encoded: Iterable[list[Encoded]], bad: BadLines) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(split, tokens, labels) of the usable conversations; the others go to ``bad``."""
    for batch in encoded:
        for item in batch:
            if item.problem is not None:
                bad.reject(item.origin, item.problem)
            else:
                yield item.split, item.tokens, item.labels
