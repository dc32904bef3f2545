from __future__ import annotations

import pytest

from jaxgpt.tokenizer import encoding as tokenizer_module
from jaxgpt.tokenizer.encoding import EOT_ID, TokenizerUnavailableError, get_tokenizer


def test_gpt2_ids_and_round_trip(shared_data):
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids for these words
    assert tok.encode("<|endoftext|>", allow_eot=True) == [EOT_ID]
    assert EOT_ID not in tok.encode("<|endoftext|>")  # ordinary text never becomes the special token
    text = "Ünïcödé, emoji 🤖 and\nnew lines  "
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    with pytest.raises(ValueError, match="outside"):
        tok.decode([50257])


def test_missing_ranks_say_how_to_fix(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokenizer_module._load_encoding.cache_clear()
    try:
        with pytest.raises(TokenizerUnavailableError, match="TIKTOKEN_CACHE_DIR"):
            tokenizer_module.Tokenizer()
    finally:
        tokenizer_module._load_encoding.cache_clear()
