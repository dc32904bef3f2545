"""The chat template: conversations as GPT-2 tokens with a loss mask, and replying within a conversation.

GPT-2 has one special token, ``<|endoftext|>`` (EOT), so the template is plain text around it::

    <|endoftext|>System: You are terse.\\n          (optional)
    User: What is the capital of Zorbia?\\n
    Assistant: Quellburg.<|endoftext|>
    User: ...\\n
    Assistant: ...<|endoftext|>

A conversation starts with EOT (as every document of the pretraining shards does). Each message
is its role marker (``System:``, ``User:``, ``Assistant:``), a space and its content, then the end
of its turn: a newline after system and user messages, EOT after the assistant's. Each of these
pieces is encoded ON ITS OWN and the token lists are joined, so a marker is the same tokens
whatever the content around it (for ordinary text this also equals encoding the whole string:
GPT-2's pre-tokeniser splits before " word" and around newlines anyway).

The loss mask is 1 on the assistant's content tokens and on the EOT that closes its turn, 0 on
everything else (every assistant turn is trained, as TRL's ``assistant_only_loss``). A reply is
generated from the history plus ``Assistant:`` and ends when the model emits EOT, which is where
``jaxgpt.sampling.generate`` stops (``jaxgpt.chat.reply.generate_reply``). This module needs no JAX, so
data preparation can use it. Content that itself contains a line starting with ``User:``
reads like a new turn: the template has no escaping (nor has any plain-text template).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from jaxgpt.core.errors import UserError
from jaxgpt.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MARKERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
TEMPLATE = "jaxgpt.chat v1: <|endoftext|>User: {content}\\nAssistant: {content}<|endoftext|>..."  # for meta.json
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


class ChatError(UserError):
    """A conversation the template cannot render: not a list of messages, an unknown role, non-text content."""


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation as the model reads it: its tokens and the loss mask over them."""

    tokens: np.ndarray  # int32 [n]
    mask: np.ndarray  # uint8 [n]: 1 where the token is trained (the assistant's content and its closing EOT)


def check_messages(messages: object) -> list[Message]:
    """The messages as plain ``{"role", "content"}`` dicts; anything else is a :class:`ChatError`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatError("expected a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatError(f"message {i} is not an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatError(f"message {i} has role {role!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"message {i} ({role}) has content of type {type(content).__name__}, not text")
        out.append({"role": role, "content": content})
    return out


@dataclasses.dataclass(frozen=True)
class _Piece:
    tokens: list[int]
    trained: bool


def _message_pieces(message: Message, tokenizer: Tokenizer) -> list[_Piece]:
    encode = tokenizer.encode
    is_reply = message["role"] == "assistant"
    end = [tokenizer.eot_id] if is_reply else encode("\n")
    return [
        _Piece(encode(MARKERS[message["role"]]), False),
        _Piece(encode(" " + message["content"]) + end, is_reply),
    ]


def _join(pieces: Sequence[_Piece]) -> Rendered:
    tokens = np.fromiter((t for p in pieces for t in p.tokens), np.int32)
    mask = np.fromiter((p.trained for p in pieces for _ in p.tokens), np.uint8)
    return Rendered(tokens, mask)


def generation_prompt(tokenizer: Tokenizer) -> list[int]:
    """The tokens that open the assistant's turn."""
    return tokenizer.encode(MARKERS["assistant"])


def render(
    messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, *, add_generation_prompt: bool = False
) -> Rendered:
    """A conversation's tokens and loss mask; ``add_generation_prompt`` appends ``Assistant:`` to reply."""
    pieces = [_Piece([tokenizer.eot_id], False)]
    pieces += [p for m in check_messages(messages) for p in _message_pieces(m, tokenizer)]
    if add_generation_prompt:
        pieces.append(_Piece(generation_prompt(tokenizer), False))
    return _join(pieces)


def fit_history(
    messages: Sequence[Mapping[str, str]], max_tokens: int, tokenizer: Tokenizer
) -> tuple[list[Message], int]:
    """The newest messages whose prompt (with ``Assistant:``) fits ``max_tokens``, and how many were dropped.

    System messages at the start are always kept; the oldest other messages go first, and the kept
    history starts with a user message. A last message that cannot fit even alone is a UserError.
    """
    messages = check_messages(messages)
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    lengths = [sum(len(p.tokens) for p in _message_pieces(m, tokenizer)) for m in messages]
    fixed = 1 + sum(lengths[:n_system]) + len(generation_prompt(tokenizer))
    start = n_system
    while start < len(messages) and (messages[start]["role"] != "user" or fixed + sum(lengths[start:]) > max_tokens):
        start += 1
    if start == len(messages):
        need = fixed + lengths[-1]
        raise UserError(
            f"the last message needs {need} tokens with the system prompt, but only {max_tokens} fit beside "
            f"the reply; shorten it, or ask for fewer new tokens"
        )
    return messages[:n_system] + messages[start:], start - n_system
