"""``sample.py --chat``: a multi-turn conversation, one user message per line, answers streamed.

Lines come from the terminal (with a ``you>`` prompt) or, when standard input is not a terminal,
from it until it ends, so ``printf 'Hi\\nWho are you?\\n' | python sample.py --chat`` works too.
Notices (turns dropped to fit the context, a message too long) go to standard error, so standard
output holds only the answers, one line each.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TextIO

import jax

from jaxgpt.chat.reply import Message, generate_reply, prompt_room
from jaxgpt.core.errors import UserError
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.text import TextStream
from jaxgpt.tokenizer import Tokenizer

USER_PROMPT = "you> "


def chat(
    model: GPT,
    lines: Iterator[str],
    *,
    tokenizer: Tokenizer,
    system: str | None,
    max_new_tokens: int,
    key: jax.Array,
    out: TextIO | None = None,
    notices: TextIO | None = None,
    **sampling: Any,
) -> list[Message]:
    """Answers each line in turn, keeping the conversation; returns the final history.

    Answers go to ``out`` (default stdout), notices to ``notices`` (default stderr); ``sampling``
    holds generate_reply's temperature, top_k, top_p and mesh.
    """
    out, notices = out or sys.stdout, notices or sys.stderr
    prompt_room(model, max_new_tokens)  # fail before the first line if nothing could ever fit
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    for i, line in enumerate(lines):
        stream = TextStream(tokenizer, out, strip_space=True, end="\n")
        try:
            reply = generate_reply(
                model, [*history, {"role": "user", "content": line}], max_new_tokens, tokenizer=tokenizer,
                key=jax.random.fold_in(key, i), on_token=stream, **sampling,
            )  # fmt: skip
        except UserError as err:  # a message that cannot fit should not end the conversation
            print(f"error: {err}", file=notices, flush=True)
            continue
        stream.close()
        if reply.dropped:
            print(f"[dropped the {reply.dropped} oldest messages to fit the context]", file=notices, flush=True)
        if not reply.finished:
            print(f"[the answer was cut at --max_new_tokens {max_new_tokens}]", file=notices, flush=True)
        history = reply.history
    return history
