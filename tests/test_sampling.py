"""Generation: the KV-cache path against the full forward pass and transformers, sampling rules, sample.py."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxgpt.convert import load_hf_gpt2
from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import make_mesh, shard_model
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.decoding import decode as decode_chunk
from jaxgpt.model.decoding import init_cache
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling import generate as sampling
from jaxgpt.sampling.config import SampleConfig
from jaxgpt.sampling.generate import generate, left_pad, process_logits, sample_token
from jaxgpt.sampling.text import TextStream
from jaxgpt.tokenizer import load_tokenizer
from tests.hf_fixtures import make_hf_gpt2

REPO = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
PROMPTS = [[464, 3290, 318], list(range(100, 116)), [50256, 7, 8, 9, 10, 11, 12, 13, 14]]  # 3, 16, 9 tokens


def tiny_model(seed: int = 0) -> GPT:
    return GPT(CONFIG, nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    ref = make_hf_gpt2(path, n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=1)
    with torch.no_grad():  # so greedy tokens vary with the position instead of one token forever
        ref.transformer.wpe.weight.mul_(10)
    ref.save_pretrained(path)
    return path


forward = nnx.jit(lambda model, tokens: model(tokens))
decode = nnx.jit(decode_chunk)


def greedy_by_forward(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache; right padding to the context keeps one compiled forward (causal)."""
    tokens = np.zeros((1, CONFIG.block_size), np.int32)
    tokens[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        tokens[0, i] = int(jnp.argmax(forward(model, jnp.asarray(tokens))[0, i - 1]))
    return tokens[0, len(prompt) : len(prompt) + n].tolist()


def test_cached_decode_logits_match_full_forward(model):
    """Left-padded batched prefill + decoding in chunks of 1 to 5 tokens == the unpadded forward pass of each row."""
    assert_cached_decode_matches_forward(model)


def test_cached_decode_with_rotary_and_qk_norm_matches_full_forward():
    """Keys are cached rotated to their own positions (per row: ragged, left-padded prompts)."""
    modern = CONFIG.replace(
        position_embedding="rotary", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False,
        bias=False, logit_softcap=10.0,
    )  # fmt: skip
    assert_cached_decode_matches_forward(GPT(modern, nnx.Rngs(0)))


def assert_cached_decode_matches_forward(model: GPT) -> None:
    chunks, prompt_len, cache_len = (1, 3, 1, 2, 5, 1), 16, 64
    steps = sum(chunks)
    rng = np.random.default_rng(0)
    continuations = rng.integers(0, CONFIG.vocab_size, (len(PROMPTS), steps)).astype(np.int32)
    tokens, positions, key_mask = left_pad(PROMPTS, prompt_len, cache_len)
    logits, cache = decode(model, jnp.asarray(tokens), init_cache(model.config, 3, cache_len), 0, positions, key_mask)
    cached = [np.asarray(logits)]
    next_positions = np.array([len(p) for p in PROMPTS])[:, None]
    for start, size in zip(np.cumsum((0, *chunks[:-1])), chunks, strict=True):
        chunk = jnp.asarray(continuations[:, start : start + size])
        chunk_positions = next_positions + start + np.arange(size)
        chunk_logits, cache = decode(model, chunk, cache, prompt_len + start, chunk_positions, key_mask)
        cached.append(np.asarray(chunk_logits))
    cached = np.concatenate(cached, axis=1)  # [B, prompt_len + steps, V]
    worst = 0.0
    for row, prompt in enumerate(PROMPTS):
        full = np.asarray(forward(model, jnp.asarray([prompt + list(continuations[row])])))[0]  # unpadded
        ours = cached[row, prompt_len - len(prompt) :]  # this row's real positions
        assert ours.shape == full.shape
        worst = max(worst, float(np.abs(ours - full).max()))
    print(f"max |cached - forward| logits: {worst:.2e}")
    assert worst < 1e-5


def test_batched_greedy_matches_one_prompt_at_a_time(model):
    out = generate(model, PROMPTS, 10, temperature=0, stop_at_eot=False)
    assert out == [greedy_by_forward(model, p, 10) for p in PROMPTS]


def test_greedy_matches_transformers_generate(hf_dir):
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = generate(load_hf_gpt2(hf_dir), PROMPTS, 32, temperature=0, stop_at_eot=False)
    for prompt, new in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = ref.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                pad_token_id=0,
            )  # fmt: skip
        assert new == theirs[0, len(prompt) :].tolist()


def allowed_by_numpy(logits: np.ndarray, top_k: int | None, top_p: float | None) -> set[int]:
    order = np.argsort(-logits)
    keep = order[:top_k] if top_k else order
    probs = np.exp(logits[keep] - logits[keep].max())
    probs /= probs.sum()
    if top_p is not None:
        keep = keep[: int(np.searchsorted(np.cumsum(probs), top_p)) + 1]
    return set(keep.tolist())


@pytest.mark.parametrize(("top_k", "top_p"), [(5, None), (None, 0.5), (None, 0.9), (20, 0.6), (1, None)])
def test_top_k_and_top_p_never_sample_outside_their_set(top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(1), (1000,))) * 2
    allowed = allowed_by_numpy(logits / 1.3, top_k, top_p)  # the nucleus is taken after the temperature
    assert 1 <= len(allowed) < 700  # a strict subset
    kept = np.flatnonzero(np.isfinite(np.asarray(process_logits(jnp.asarray(logits), 1.3, top_k, top_p))))
    assert set(kept.tolist()) == allowed
    draws = np.asarray(sample_token(jnp.broadcast_to(logits, (5000, 1000)), jax.random.key(2), 1.3, top_k, top_p))
    assert set(draws.tolist()) <= allowed
    assert len(set(draws.tolist())) >= min(len(allowed), 3)  # it samples, it is not stuck on one token


def test_temperature_scales_the_distribution():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    hot = np.asarray(sample_token(jnp.broadcast_to(logits, (20000, 3)), jax.random.key(0), 1.0))
    assert np.allclose(np.bincount(hot, minlength=3) / hot.size, [0.6, 0.3, 0.1], atol=0.02)
    cold = np.asarray(sample_token(jnp.broadcast_to(logits, (20000, 3)), jax.random.key(0), 0.25))
    assert (cold == 0).mean() > 0.9


def test_temperature_zero_is_greedy_and_seeds_reproduce(model):
    logits = jax.random.normal(jax.random.key(0), (4, 50257))
    assert np.array_equal(sample_token(logits, jax.random.key(9), 0.0), jnp.argmax(logits, -1))
    ties = jnp.array([[1.0, 3.0, 3.0, 0.0], [-jnp.inf, -jnp.inf, 2.0, 2.0]])
    assert sample_token(ties, jax.random.key(9), 0.0).tolist() == [1, 2]  # the first of equal maxima, as argmax
    greedy = [generate(model, PROMPTS, 8, temperature=0, key=jax.random.key(s)) for s in (0, 1)]
    assert greedy[0] == greedy[1] == generate(model, PROMPTS, 8, temperature=0, top_k=3, top_p=0.5)
    run = lambda seed: generate(model, PROMPTS, 8, top_k=50, key=jax.random.key(seed), stop_at_eot=False)
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_no_recompilation_within_a_bucket_or_across_steps(model):
    generate(model, [[1, 2, 3]], 20, temperature=0)
    graphdef, state = nnx.split(model)
    prefill, step = sampling._compiled(graphdef, jax.tree.structure(state), sampling.SamplingRule(0.0))
    compiled = lambda: (prefill._cache_size(), step._cache_size())  # executables jax holds: one per compilation
    before = compiled()
    for length in (1, 5, 11, 16):  # all pad to the 16-token bucket; 20 steps each
        generate(model, [list(range(7, 7 + length))], 20, temperature=0)
    assert compiled() == before
    generate(model, [list(range(17))], 20, temperature=0)  # the 32-token bucket: a new prefill, same cache
    assert compiled() == (before[0] + 1, before[1])
    generate(model, [list(range(17))], 40, temperature=0)  # a longer cache: a new decode step
    assert compiled() == (before[0] + 2, before[1] + 1)


def test_decode_step_updates_the_cache_in_place(model):
    """The compiled decode step copies no cache layer: on CPU such copies cost ~15% of a GPT-2 124M token."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    _, step = sampling._compiled(graphdef, treedef, sampling.SamplingRule(0.0))
    cache, row = init_cache(model.config, 1, 64), jnp.zeros(1, jnp.int32)
    hlo = step.lower(leaves, cache, row, 16, row, np.ones((1, 64), bool), jax.random.key(0)).compile().as_text()
    layer_size = cache[0].key.size
    copies = [
        line.strip()[:120]
        for line in hlo[hlo.index("\nENTRY") :].splitlines()
        if (match := re.match(r"\s*%\S*copy\S* = f32\[([\d,]+)\]", line))
        and math.prod(int(d) for d in match.group(1).split(",")) == layer_size
    ]
    assert not copies, copies[:3]


def test_stop_at_eot_truncates_each_row_and_streams_what_it_returns(model):
    sample = lambda **kw: generate(model, PROMPTS, 12, top_k=100, key=jax.random.key(5), **kw)
    full = sample(stop_at_eot=False)
    eot = full[1][4]  # pretend this token ends a text: row 1 stops after it
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    out = sample(eot_id=eot, on_token=lambda row, token: streamed[row].append(token))
    for row, tokens in enumerate(full):
        expected = tokens[: tokens.index(eot) + 1] if eot in tokens else tokens
        assert out[row] == expected == streamed[row]
    assert len(out[1]) == full[1].index(eot) + 1 < 12


def test_stop_ends_a_row_early_keeping_a_prefix_of_its_tokens(model):
    sample = lambda **kw: generate(model, PROMPTS, 40, top_k=100, key=jax.random.key(5), stop_at_eot=False, **kw)
    full = sample()
    out = sample(stop=lambda tokens: len(tokens) >= 3 and tokens[0] == full[0][0])  # row 0 stops, the others run
    assert 3 <= len(out[0]) < 40 and out[0] == full[0][: len(out[0])]  # read every 8 tokens: ends within 8
    assert out[1:] == full[1:]


@pytest.mark.filterwarnings("ignore:dimension .vocab.:UserWarning")  # 50257 rows do not split 2 ways
def test_sharded_generation_matches_single_device():
    mesh = make_mesh("4x2")  # 8 fake CPU devices (conftest); 3 prompts are padded to 4 rows
    expected = generate(tiny_model(), PROMPTS, 6, temperature=0)
    assert generate(shard_model(tiny_model(), mesh), PROMPTS, 6, temperature=0, mesh=mesh) == expected


@pytest.mark.parametrize(
    ("prompts", "new", "kwargs", "message"),
    [
        ([list(range(128))], 1, {}, "longer than|no room"),
        ([list(range(100))], 29, {}, "at most 28 new tokens"),
        ([[1]], 4, {"top_p": 0.0}, "top_p"),
        ([[1]], 4, {"top_p": 1.5}, "top_p"),
        ([[1]], 4, {"temperature": -0.5}, "temperature"),
        ([[1]], 4, {"top_k": 0}, "top_k"),
        ([[1]], 0, {}, "max_new_tokens"),
        ([[60000]], 4, {}, "vocabulary"),
    ],
)
def test_bad_input_is_a_user_error(model, prompts, new, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(model, prompts, new, **kwargs)


def test_text_stream_waits_for_whole_characters():
    tokenizer = load_tokenizer()
    text = "naïve 我们 🤖 café"
    tokens = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokens)  # some token ends inside a character
    out = io.StringIO()
    stream = TextStream(tokenizer, out, "> ", hide_eot=True)
    for token in [*tokens, tokenizer.eot_id]:
        stream(0, token)
    stream.close()
    assert out.getvalue().splitlines()[0] == "> " + text


def run_sample(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "sample.py", *args], cwd=REPO, env={**os.environ, **env}, input=stdin,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_sample_py_help_lists_every_flag():
    proc = run_sample("--help")
    assert proc.returncode == 0, proc.stderr
    for name in SampleConfig.__dataclass_fields__:
        assert f"--{name}" in proc.stdout
    assert proc.stdout.count("(default:") >= len(SampleConfig.__dataclass_fields__)


def test_sample_py_prints_streamed_samples(hf_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("Once upon a time")
    args = ["--init_from", str(hf_dir), "--prompt", f"FILE:{tmp_path / 'prompt.txt'}", "--max_new_tokens", "20"]
    proc = run_sample(*args, "--num_samples", "2", "--top_p", "0.9", "--stop_at_eot=false")
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith("Once upon a time") and len(s) > len("Once upon a time") + 5 for s in samples[:2])
    assert samples[0] != samples[1]


def test_sample_py_interactive_reads_prompts_until_eof(hf_dir):
    args = ["--init_from", str(hf_dir), "--interactive", "--max_new_tokens", "100", "--temperature", "0"]
    lines = ["Hello", "word " * 60, "FILE:/nonexistent/prompt.txt", ""]  # too long and missing: errors, go on
    proc = run_sample(*args, stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello") and proc.stdout.count("---------------\n") == 2
    assert proc.stderr.count("error:") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top_p", "1.5"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--prompt", "word " * 200], "context"),
        (["--init_from", "gpt2"], "local directory"),  # the default, offline
    ],
)
def test_sample_py_bad_input_is_one_line_and_exit_2(hf_dir, args, message):
    init = [] if "--init_from" in args else ["--init_from", str(hf_dir)]
    proc = run_sample(*init, *args, "--max_new_tokens", "8", HF_HUB_OFFLINE="1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
