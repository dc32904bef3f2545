"""Sample from a trained or pretrained GPT-2, streaming the text as it is generated.

    python sample.py --init_from=out/gpt2-hf --prompt="Hello, I'm a language model,"
    python sample.py --init_from=out/shakespeare --prompt=FILE:prompt.txt --num_samples=3 --top_p=0.9
    python sample.py --init_from=out/gpt2-hf --interactive      # one prompt per line until end of input
    python sample.py --init_from=out/sft --chat --system="Be brief."   # a conversation, one message per line

A prompt longer than the model's context is an error rather than silently cropped, and so is a
prompt that leaves no room for --max_new_tokens: the fix (a shorter prompt, fewer tokens) is the
user's to choose.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

import jax

from jaxgpt.chat.repl import USER_PROMPT, chat
from jaxgpt.checkpoints.loading import load_sharded, resolve_init_from
from jaxgpt.core import distributed
from jaxgpt.core.cli import build, parser_for, run
from jaxgpt.core.distributed import LaunchConfig
from jaxgpt.core.errors import UserError
from jaxgpt.sampling.config import SampleConfig
from jaxgpt.sampling.text import DEFAULT_NEW_TOKENS, PROMPT, input_lines, sample_prompt
from jaxgpt.tokenizer import tokenizer_of


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for("python sample.py", SampleConfig.__doc__, (SampleConfig, None), (LaunchConfig, None))
    namespace = parser.parse_args(argv)
    config, launch = build(SampleConfig, namespace), build(LaunchConfig, namespace)
    if launch.enabled and (config.interactive or config.chat):
        raise UserError("--interactive and --chat read this process's stdin; a multi-process run needs --prompt")
    init_from = resolve_init_from(config.init_from)
    tokenizer = tokenizer_of(init_from)  # the one the run (or exported model) carries; else GPT-2's
    distributed.initialize(launch)
    out = sys.stdout if distributed.is_main_process() else io.StringIO()  # every process samples, one prints
    model, mesh = load_sharded(init_from, config.mesh, dtype=config.dtype)
    key = jax.random.key(config.seed)
    if config.chat:
        sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, mesh=mesh)
        lines = input_lines(sys.stdin, USER_PROMPT, skip_blank=True)
        max_new_tokens = config.max_new_tokens or min(DEFAULT_NEW_TOKENS, model.config.block_size // 2)
        chat(
            model, lines, tokenizer=tokenizer, system=config.system, max_new_tokens=max_new_tokens, key=key, **sampling
        )
        return
    prompts = input_lines(sys.stdin, PROMPT) if config.interactive else [config.prompt]
    for i, prompt in enumerate(prompts):
        try:
            sample_prompt(model, tokenizer, prompt, config, jax.random.fold_in(key, i), out, mesh)
        except UserError as err:
            if not config.interactive:
                raise
            print(f"error: {err}", file=sys.stderr)  # a bad prompt should not end the session


if __name__ == "__main__":
    run(main)
