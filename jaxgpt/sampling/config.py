"""What ``sample.py`` is asked to do: one typed config, checked before a model is loaded."""

from __future__ import annotations

import dataclasses

from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.model.config import DType
from jaxgpt.sampling.generate import SamplingRule


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Generate text from a trained or pretrained GPT-2."""

    init_from: str | None = option(
        None, "a training out_dir, a Hugging Face GPT-2 directory, or a hub id (default: the newest run under out/)"
    )
    prompt: str = option("", "prompt text, or FILE:path to read it from a file; empty starts from <|endoftext|>")
    num_samples: int = option(1, "samples per prompt")
    max_new_tokens: int | None = option(
        None, "tokens to generate per sample; prompt + these must fit the context (default: 256 or what fits)"
    )
    temperature: float = option(0.8, "1 samples the model's distribution, lower is more conservative, 0 is greedy")
    top_k: int | None = option(200, "sample from the k most likely tokens only (none: all)")
    top_p: float | None = option(None, "nucleus sampling: the most likely tokens holding this probability (none: off)")
    seed: int = option(1337, "random seed")
    dtype: DType = option("float32", "compute dtype")
    mesh: str | None = option(None, "device mesh DxM (data x model), e.g. 4x2; default: every device on data")
    stop_at_eot: bool = option(True, "end a sample at <|endoftext|> (false: keep going to max_new_tokens)")
    stream: bool = option(True, "print tokens as they come, one sample after another (false: one batch)")
    interactive: bool = option(False, "read prompts from stdin, one per line, until end of input")
    chat: bool = option(False, "chat: one user message per line of stdin, answers with jaxgpt.chat's template")
    system: str | None = option(None, "--chat: a system message that opens the conversation")

    def __post_init__(self) -> None:
        SamplingRule(self.temperature, self.top_k, self.top_p)  # fail before loading a model
        if self.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.system is not None and not self.chat:
            raise UserError("--system opens a conversation: add --chat")
        if self.chat and (self.prompt or self.interactive or self.num_samples != 1):
            raise UserError("--chat reads the user's messages from stdin: drop --prompt, --interactive, --num_samples")
