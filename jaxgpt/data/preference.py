"""Preference data for ``prepare --format preference`` (DPO): JSON lines -> checked pairs -> tokens and labels.

Each non-blank line is one object in TRL's preference format:

* ``{"prompt": "...", "chosen": "...", "rejected": "..."}``, optionally with ``"system"``
* ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``
* ``{"chosen": [messages], "rejected": [messages]}`` (implicit prompt: their shared first messages)

Both replies are rendered after the prompt with ``jaxgpt.chat``'s template; the completion (the
tokens after ``Assistant:``, through the EOT that closes the turn) is what the loss scores, as
TRL's ``completion_mask``. A pair is stored as two consecutive conversations in chat shards,
chosen then rejected, each with its ``START`` bit and ``LOSS`` on its completion tokens, and
``meta.json`` says ``"format": "preference"`` (:class:`jaxgpt.data.pipeline.Pairs` reads them).
Bad lines, ``--skip_bad``, ``--truncate`` and the val split work as for chat data
(:mod:`jaxgpt.data.chat_source`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxgpt.chat import template as chat
from jaxgpt.data import shards, sources
from jaxgpt.data.chat_source import BadLine, BadLines, Encoded, file_records
from jaxgpt.tokenizer import Tokenizer

FORMAT = "preference"


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: list[chat.Message]
    chosen: list[chat.Message]
    rejected: list[chat.Message]
    origin: str  # "file:line", for error messages
    split: str


def _messages(value: object, what: str) -> list[chat.Message]:
    try:
        messages = chat.check_messages(value)
    except chat.ChatError as err:
        raise BadLine(f"'{what}': {err}") from err
    empty = next((i for i, m in enumerate(messages) if not m["content"].strip()), None)
    if empty is not None:
        raise BadLine(f"'{what}' message {empty} ({messages[empty]['role']}) has empty content")
    return messages


def record_pair(record: object) -> tuple[list[chat.Message], list[chat.Message], list[chat.Message]]:
    """(prompt, chosen, rejected) messages of one parsed JSON line; raises BadLine."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise BadLine("expected an object with 'chosen' and 'rejected' (and 'prompt')")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        system = [{"role": "system", "content": record["system"]}] if "system" in record else []
        prompt = [*system, {"role": "user", "content": prompt}]
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    elif prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0  # TRL's extract_prompt: the longest common prefix of the two conversations
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif not all(isinstance(x, list) for x in (prompt, chosen, rejected)):
        raise BadLine("'prompt', 'chosen' and 'rejected' must all be strings or all lists of messages")
    prompt = _messages(prompt, "prompt")
    if prompt[-1]["role"] == "assistant":
        raise BadLine("the prompt ends with an assistant message; the replies are 'chosen' and 'rejected'")
    replies = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for name, reply in zip(("chosen", "rejected"), replies, strict=True):
        if [m["role"] for m in reply] != ["assistant"]:
            raise BadLine(f"'{name}' must be one assistant message, got roles {[m['role'] for m in reply]}")
    return prompt, *replies


def parse_pair_line(line: str) -> tuple[list[chat.Message], list[chat.Message], list[chat.Message]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadLine(f"not JSON ({err.msg} at column {err.colno})") from err
    return record_pair(record)


def pairs(input_path: str, val_fraction: float, bad: BadLines) -> tuple[Iterator[Pair], str]:
    """The good pairs with their split (dealt by index as documents are), and the source's name."""
    found = file_records(Path(input_path), bad, parse_pair_line)
    split = lambda i: "val" if sources.is_val_document(i, val_fraction) else "train"
    dealt = (Pair(*messages, origin, split(i)) for i, (messages, origin) in enumerate(found))
    return dealt, str(input_path)


def completion(
    prompt: list[chat.Message], reply: list[chat.Message], tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of prompt + reply and the labels: LOSS on the reply after ``Assistant:``, START on the first."""
    tokens = chat.render(prompt + reply, tokenizer).tokens
    prompt_len = len(chat.render(prompt, tokenizer, add_generation_prompt=True).tokens)
    assert prompt_len < len(tokens), "the template renders the prompt as a prefix"
    labels = np.where(np.arange(len(tokens)) >= prompt_len, shards.LOSS, 0).astype(np.uint8)
    labels[0] |= shards.START
    return tokens, labels


def encode_pair(pair: Pair, tokenizer: Tokenizer, block_size: int, truncate: bool) -> Encoded:
    """Chosen then rejected, each cut to ``block_size`` tokens with ``truncate`` (TRL's keep_start)."""
    halves, problem = [], None
    for name, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        tokens, labels = completion(pair.prompt, reply, tokenizer)
        if len(tokens) > block_size:
            if not truncate:
                problem = f"prompt + {name} is {len(tokens)} tokens, longer than --block_size {block_size}"
            elif not (labels[:block_size] & shards.LOSS).any():
                problem = f"the prompt fills --block_size {block_size}: no {name} token left after --truncate"
            tokens, labels = tokens[:block_size], labels[:block_size]
        halves.append((tokens, labels))
    tokens = np.concatenate([t for t, _ in halves]).astype(np.uint16)
    return Encoded(pair.split, tokens, np.concatenate([lab for _, lab in halves]), pair.origin, problem)


def encode_batch(items: list[Pair], tokenizer: Tokenizer, block_size: int, truncate: bool) -> list[Encoded]:
    """Encodes a task of pairs (in a worker process)."""
    return [encode_pair(p, tokenizer, block_size, truncate) for p in items]
