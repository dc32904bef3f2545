"""``sample.py --chat``: a multi-turn conversation, one user message per line, answers streamed.

Lines come from the terminal (with a ``you>`` prompt) or, when standard input is not a terminal,
from it until it ends, so ``printf 'Hi\\nWho are you?\\n' | python sample.py --chat`` works too.
Notices (turns dropped to fit the context, a message too long) go to standard error, so standard
output holds only the answers, one line each.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import jax

from jaxgpt.chat.reply import Message, generate_reply, prompt_room
from jaxgpt.core.errors import UserError
from jaxgpt.model.gpt import GPT
from jaxgpt.tokenizer import Tokenizer

USER_PROMPT = "you> "


def user_lines(stdin: TextIO) -> Iterator[str]:
    """Each line of ``stdin`` (prompting on a terminal); blank lines are skipped."""
    while True:
        if stdin.isatty():
            print(USER_PROMPT, end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


class ReplyStream:
    """``generate``'s on_token: writes the answer as it comes, without the template's leading space and EOT."""

    def __init__(self, out: TextIO, tokenizer: Tokenizer) -> None:
        self.out, self.tokenizer = out, tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def __call__(self, row: int, token: int) -> None:
        if token == self.tokenizer.eot_id:
            return
        text = self._utf8.decode(self.tokenizer.decode_bytes([token]))
        if not self._started and text:
            text, self._started = text.removeprefix(" "), True
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        self.out.write(self._utf8.decode(b"", final=True) + "\n")
        self.out.flush()


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
        stream = ReplyStream(out, tokenizer)
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
