from __future__ import annotations

import pytest

from jaxgpt.tokenizer import EOT_ID, TokenizerUnavailableError, load_tokenizer
from jaxgpt.tokenizer import encoding as tokenizer_module


def test_gpt2_ids_and_round_trip(shared_data):
    tok = load_tokenizer()
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


# --- training a tokenizer (rustbpe) and loading it with tiktoken ---

import base64  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from jaxgpt.core.errors import UserError  # noqa: E402
from jaxgpt.tokenizer import MAX_VOCAB_SIZE, tokenizer_of  # noqa: E402
from jaxgpt.tokenizer.encoding import RANKS_FILE, SPEC_FILE, make_encoding  # noqa: E402
from jaxgpt.tokenizer.train import PATTERNS, BPEConfig, save_trained, train_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


@pytest.fixture(scope="module")
def trained(shakespeare_path, tmp_path_factory):
    """A 512-token tokenizer trained on tiny Shakespeare's first 900,000 characters, saved and reloaded."""
    text = shakespeare_path.read_text()
    out = tmp_path_factory.mktemp("tok") / "shakespeare-512"
    tokenizer = save_trained(train_bpe([text[:900_000]], BPEConfig(vocab_size=VOCAB), "shakespeare-512"), out)
    return tokenizer, out, text


def test_trained_tokenizer_is_what_tiktoken_loads_and_what_rustbpe_encodes(trained):
    import rustbpe
    import tiktoken

    tokenizer, out, text = trained
    assert tokenizer.vocab_size == VOCAB and tokenizer.eot_id == VOCAB - 1
    assert tokenizer.encode("<|endoftext|>", allow_eot=True) == [VOCAB - 1]
    # tiktoken reads the saved files by itself (its rank-file format, the spec's pattern and special token)
    spec = json.loads((out / SPEC_FILE).read_text())
    ranks = {}
    for line in (out / RANKS_FILE).read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    reference = tiktoken.Encoding(
        "ref", pat_str=spec["pattern"], mergeable_ranks=ranks, special_tokens=spec["special_tokens"]
    )
    val = text[900_000:]
    ids = tokenizer.encode(val)
    assert ids == reference.encode_ordinary(val) and tokenizer.decode(ids) == val
    assert len(val.encode()) / len(ids) > 1.8  # merges learnt: well above one byte a token
    # rustbpe, trained the same way, encodes the same ids (nanochat's check of its tiktoken export)
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter([text[:900_000]]), VOCAB - 1, pattern=PATTERNS["gpt4"])
    assert bpe.encode(val[:20_000]) == tokenizer.encode(val[:20_000])


def test_folders_carry_their_tokenizer(trained, tmp_path):
    tokenizer, out, _ = trained
    assert tokenizer_of(out).fingerprint == tokenizer.fingerprint
    assert tokenizer_of(tmp_path).is_gpt2 and tokenizer_of("gpt2").is_gpt2  # none saved: GPT-2's
    assert load_tokenizer().fingerprint != tokenizer.fingerprint
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_vocabularies_over_uint16_are_refused():
    with pytest.raises(UserError, match="uint16"):
        BPEConfig(vocab_size=MAX_VOCAB_SIZE + 1)
    ranks = {bytes([i]): i for i in range(256)} | {f"t{i}".encode(): 256 + i for i in range(MAX_VOCAB_SIZE - 256)}
    with pytest.raises(UserError, match="uint16"):
        make_encoding("big", PATTERNS["gpt2"], ranks, {"<|endoftext|>": len(ranks)})


def test_the_command_trains_and_reports_compression(shakespeare_path, tmp_path):
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "jaxgpt.tokenizer", "train", "--input", str(shakespeare_path), "--vocab_size", "300"]
    done = subprocess.run([*cmd, "--out", str(out), "--pattern", "gpt2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "val bytes/token" in done.stdout and "gpt2 (50,257)" in done.stdout
    assert tokenizer_of(out).vocab_size == 300 and tokenizer_of(out).pattern == PATTERNS["gpt2"]
    bad = subprocess.run([*cmd[:-1], "70000", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.splitlines()) == 1
