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

FILE_PREFIX = "FILE:"
SEPARATOR = "---------------"


def load_prompt(text: str) -> str:
    """The prompt itself, or the contents of the file named after ``FILE:``."""
    if not text.startswith(FILE_PREFIX):
        return text
    path = Path(text.removeprefix(FILE_PREFIX)).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"could not read the prompt file {path}: {getattr(err, 'strerror', None) or err}") from err


def read_prompts(config: SampleConfig, stdin: TextIO | None = None) -> Iterator[str]:
    """The --prompt, or with --interactive each line of stdin (blank: <|endoftext|>), as given (maybe FILE:path)."""
    stdin = sys.stdin if stdin is None else stdin
    if not config.interactive:
        yield config.prompt
        return
    while True:
        if stdin.isatty():
            print("prompt> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


class TextStream:
    """Writes one sample as text while its tokens arrive; a character split across tokens waits for its last byte."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO, prompt: str, hide_eot: bool):
        self.tokenizer, self.out, self.hide_eot = tokenizer, out, hide_eot
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out.write(prompt)

    def __call__(self, row: int, token: int) -> None:
        """``generate``'s on_token for a batch of one; the end-of-text token that ends a sample is not shown."""
        if not (self.hide_eot and token == self.tokenizer.eot_id):
            self.out.write(self._utf8.decode(self.tokenizer.decode_bytes([token])))
            self.out.flush()

    def close(self) -> None:
        self.out.write(self._utf8.decode(b"", final=True) + "\n" + SEPARATOR + "\n")
        self.out.flush()


def sample_prompt(
    model: GPT, tokenizer: Tokenizer, prompt: str, config: SampleConfig, key: jax.Array, out: TextIO, mesh: Mesh | None
) -> None:
    """Writes ``config.num_samples`` continuations of ``prompt`` (text or FILE:path), each after the prompt."""
    prompt = load_prompt(prompt)
    tokens = check_prompts(model, [tokenizer.encode(prompt, allow_eot=True)], config.max_new_tokens)[0]
    kwargs = dict(
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        stop_at_eot=config.stop_at_eot, mesh=mesh, eot_id=tokenizer.eot_id,
    )  # fmt: skip
    new_stream = lambda: TextStream(tokenizer, out, prompt, hide_eot=config.stop_at_eot)
    if config.stream:  # one sample at a time: the lines of samples streamed together would interleave
        for i in range(config.num_samples):
            stream = new_stream()
            generate(model, [tokens], config.max_new_tokens, key=jax.random.fold_in(key, i), on_token=stream, **kwargs)
            stream.close()
        return
    for row_tokens in generate(model, [tokens] * config.num_samples, config.max_new_tokens, key=key, **kwargs):
        stream = new_stream()
        for token in row_tokens:
            stream(0, token)
        stream.close()
