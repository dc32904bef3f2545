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

from jaxgpt.chat.repl import chat, user_lines
from jaxgpt.checkpoints.loading import load_model
from jaxgpt.core import distributed
from jaxgpt.core.cli import build, parser_for, run
from jaxgpt.core.distributed import LaunchConfig
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh, shard_model
from jaxgpt.sampling.config import SampleConfig
from jaxgpt.sampling.text import read_prompts, sample_prompt
from jaxgpt.tokenizer import tokenizer_of


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for("python sample.py", SampleConfig.__doc__, (SampleConfig, None), (LaunchConfig, None))
    namespace = parser.parse_args(argv)
    config, launch = build(SampleConfig, namespace), build(LaunchConfig, namespace)
    if launch.enabled and (config.interactive or config.chat):
        raise UserError("--interactive and --chat read this process's stdin; a multi-process run needs --prompt")
    tokenizer = tokenizer_of(config.init_from)  # the one the run (or exported model) carries; else GPT-2's
    distributed.initialize(launch)
    out = sys.stdout if distributed.is_main_process() else io.StringIO()  # every process samples, one prints
    mesh = make_mesh(config.mesh) if config.mesh else None
    model = load_model(config.init_from, dtype=config.dtype)
    if mesh is not None:
        shard_model(model, mesh)
    key = jax.random.key(config.seed)
    if config.chat:
        sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, mesh=mesh)
        lines = user_lines(sys.stdin)
        chat(
            model,
            lines,
            tokenizer=tokenizer,
            system=config.system,
            max_new_tokens=config.max_new_tokens,
            key=key,
            **sampling,
        )
        return
    for i, prompt in enumerate(read_prompts(config)):
        try:
            sample_prompt(model, tokenizer, prompt, config, jax.random.fold_in(key, i), out, mesh)
        except UserError as err:
            if not config.interactive:
                raise
            print(f"error: {err}", file=sys.stderr)  # a bad prompt should not end the session


if __name__ == "__main__":
    run(main)
