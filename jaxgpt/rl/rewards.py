"""Reward functions for GRPO: ``(prompt record, completion text) -> float``, and the prompts they score.

The built-in reward is GSM8K's exact match: the completion's final number (after its last ``####``,
or else the last number in it) equals the record's ``answer`` (a bare number, or a GSM8K solution
ending in ``#### N``). ``--reward module:function`` loads any other function with that signature.
Prompt records are JSON lines ``{"prompt": "..." or "messages": [...], "answer": ...}``; GSM8K's own
rows (``{"question", "answer"}``, from ``--dataset gsm8k`` or local files in the hub's format) read
the same way.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxgpt.chat import template as chat
from jaxgpt.core.errors import UserError
from jaxgpt.data import sources

Reward = Callable[[dict[str, Any], str], float]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
GSM8K = ("openai/gsm8k", "main")  # hub repository and subset: {"question", "answer": "...#### 72"}


def final_number(text: str) -> str | None:
    """The number after the last ``####`` (else the last number), commas dropped; None if there is none."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    number = (found[0] if "####" in text else found[-1]).replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def exact_match(record: dict[str, Any], completion: str) -> float:
    """1.0 when the completion's final number is the record's answer, else 0.0 (the built-in reward)."""
    answer = final_number(str(record["answer"]))
    return float(answer is not None and final_number(completion) == answer)


def load_reward(spec: str) -> Reward:
    """``exact_match`` or ``module:function`` (imported; the module must be importable from here)."""
    if spec == "exact_match":
        return exact_match
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"--reward must be exact_match or module:function, got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--reward {spec}: cannot load it ({err})") from err
    if not callable(function):
        raise UserError(f"--reward {spec} is not a function")
    return function


def prompt_messages(record: dict[str, Any], origin: str) -> list[chat.Message]:
    """The conversation a record asks the model to continue: its messages, or its prompt (question) as a user turn."""
    if "messages" in record:
        messages = record["messages"]
    elif isinstance(record.get("prompt", record.get("question")), str):
        messages = [{"role": "user", "content": record.get("prompt", record.get("question"))}]
    else:
        raise UserError(f"{origin}: expected 'prompt' (text), 'question' or 'messages'")
    try:
        return chat.check_messages(messages)
    except chat.ChatError as err:
        raise UserError(f"{origin}: {err}") from err


def check_record(record: object, origin: str) -> dict[str, Any]:
    if not isinstance(record, dict) or "answer" not in record:
        raise UserError(f"{origin}: expected a JSON object with 'answer' and 'prompt' or 'messages'")
    prompt_messages(record, origin)
    return record


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Prompt records from a JSON-lines file (every line checked; a bad one is named by file:line)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path} is not a file of JSON lines")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(check_record(json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not JSON ({err.msg})") from err
    if not records:
        raise UserError(f"{path} holds no prompts")
    return records


def hub_prompts(dataset: str, split: str, data_files: str | None = None) -> list[dict[str, Any]]:
    """GSM8K's train or test rows from the Hugging Face hub (needs ``datasets`` and the network), or from
    ``data_files``, a local copy of that split's files as on the hub (``sources.hub_rows``)."""
    assert dataset == "gsm8k", dataset
    repo, subset = GSM8K
    rows = sources.hub_rows(repo, subset, split, data_files)
    return [check_record(row, f"{repo} row {i}") for i, row in enumerate(rows, 1)]
