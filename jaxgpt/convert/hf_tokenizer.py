"""A jaxgpt tokenizer as Hugging Face files: ``tokenizer.json`` that ``transformers.AutoTokenizer`` loads.

tiktoken's ranks become a byte-level BPE (vocabulary and merges recovered from the ranks, GPT-2's
byte-to-unicode alphabet) behind the tokenizer's own split pattern, by transformers' ``TikTokenConverter``,
fed the ranks in memory (its own loader would write a copy into tiktoken's cache folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxgpt.tokenizer import EOT, Tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, model_max_length: int) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (``<|endoftext|>`` as BOS, EOS and UNK, as GPT-2)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class FromRanks(TikTokenConverter):
        def load_tiktoken_bpe(self, _: str) -> dict[bytes, int]:  # type: ignore[override]
            return tokenizer.mergeable_ranks

    converted = FromRanks(vocab_file="<in memory>", pattern=tokenizer.pattern, extra_special_tokens=[EOT]).converted()
    out = Path(out_dir)
    converted.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
