"""Text in, streamed text out: prompts from the command line, a file or stdin, and tokens written as they come."""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import jax
from jax.sharding import Mesh

from jaxgpt.core.errors import UserError
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.config import SampleConfig
from jaxgpt.sampling.generate import check_prompts, generate
from jaxgpt.tokenizer.encoding import Tokenizer

DEFAULT_NEW_TOKENS = 256  # without --max_new_tokens: this many, or fewer where the context has less room
FILE_PREFIX = "FILE:"
SEPARATOR = "---------------"
PROMPT = "prompt> "  # what --interactive asks with on a terminal


def load_prompt(text: str) -> str:
    """The prompt itself, or the contents of the file named after ``FILE:``."""
    if not text.startswith(FILE_PREFIX):
        return text
    path = Path(text.removeprefix(FILE_PREFIX)).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"could not read the prompt file {path}: {getattr(err, 'strerror', None) or err}") from err


def input_lines(stdin: TextIO, prompt: str, *, skip_blank: bool = False) -> Iterator[str]:
    """Each line of ``stdin`` until it ends, without its newline; on a terminal ``prompt`` (on stderr) asks for it.

    ``sample.py --interactive`` keeps blank lines (an empty prompt: <|endoftext|>), ``--chat`` skips them.
    """
    while True:
        if stdin.isatty():
            print(prompt, end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        if line.strip() or not skip_blank:
            yield line.rstrip("\n")


class TextStream:
    """``generate``'s on_token for a batch of one: writes the text while its tokens arrive, after ``prompt``.

    A character split across tokens waits for its last byte. ``hide_eot``: the end-of-text token that ends a
    sample is not shown; ``strip_space``: leading whitespace is dropped (a chat answer: the
    template's space, a speaker's newline); ``close`` writes ``end``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        out: TextIO,
        prompt: str = "",
        hide_eot: bool = True,
        *,
        strip_space: bool = False,
        end: str = "\n" + SEPARATOR + "\n",
    ):
        self.tokenizer, self.out, self.hide_eot, self.end = tokenizer, out, hide_eot, end
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = strip_space
        out.write(prompt)

    def __call__(self, row: int, token: int) -> None:
        """Writes ``token``'s text (``row`` is always 0)."""
        if self.hide_eot and token == self.tokenizer.eot_id:
            return
        text = self._utf8.decode(self.tokenizer.decode_bytes([token]))
        if self._strip_space:  # until the first visible text: a model trained on plays may start with a newline
            text = text.lstrip()
            self._strip_space = not text
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        """Writes what is left of a split character, then ``end``."""
        self.out.write(self._utf8.decode(b"", final=True) + self.end)
        self.out.flush()


def sample_prompt(
    model: GPT, tokenizer: Tokenizer, prompt: str, config: SampleConfig, key: jax.Array, out: TextIO, mesh: Mesh | None
) -> None:
    """Writes ``config.num_samples`` continuations of ``prompt`` (text or FILE:path), each after the prompt."""
    prompt = load_prompt(prompt)
    encoded = tokenizer.encode(prompt, allow_eot=True) or [tokenizer.eot_id]
    room = max(1, model.config.block_size - len(encoded))  # none left: check_prompts says so
    max_new_tokens = config.max_new_tokens or min(DEFAULT_NEW_TOKENS, room)
    tokens = check_prompts(model, [encoded], max_new_tokens)[0]
    kwargs = dict(
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        stop_at_eot=config.stop_at_eot, mesh=mesh, eot_id=tokenizer.eot_id,
    )  # fmt: skip
    new_stream = lambda: TextStream(tokenizer, out, prompt, hide_eot=config.stop_at_eot)
    if config.stream:  # one sample at a time: the lines of samples streamed together would interleave
        for i in range(config.num_samples):
            stream = new_stream()
            generate(model, [tokens], max_new_tokens, key=jax.random.fold_in(key, i), on_token=stream, **kwargs)
            stream.close()
        return
    for row_tokens in generate(model, [tokens] * config.num_samples, max_new_tokens, key=key, **kwargs):
        stream = new_stream()
        for token in row_tokens:
            stream(0, token)
        stream.close()
