"""The serving engine: per-row cache positions, per-row sampling, continuous batching without recompiling."""

from __future__ import annotations

import random
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.core.sharding import make_mesh, shard_model
from jaxgpt.model.decoding import decode as decode_chunk
from jaxgpt.model.decoding import init_cache
from jaxgpt.sampling.generate import generate, left_pad, process_logits
from jaxgpt.serve import engine as engine_module
from jaxgpt.serve.device import filter_rows
from jaxgpt.serve.engine import Engine, GenerationRequest, Update
from jaxgpt.serve.text import TextTracker
from jaxgpt.tokenizer import load_tokenizer
from tests.serve_utils import MAX_LEN, tiny_model

pytest_plugins = ("tests.serve_utils",)  # the module fixtures model, engine (MAX_BATCH slots) and url
WARMUP = True  # the compile counts start from a warm engine

PROMPTS = [[464, 3290, 318], list(range(100, 116)), [50256, 7, 8, 9, 10, 11, 12, 13, 14]]
decode = nnx.jit(decode_chunk)
forward = nnx.jit(lambda model, tokens: model(tokens))


def run_all(engine: Engine, requests: list[GenerationRequest], delays: list[float] | None = None) -> list[list[Update]]:
    """Submits each request after its delay (seconds from now, from a thread); waits for every one to end."""
    updates: list[list[Update]] = [[] for _ in requests]
    finished = threading.Semaphore(0)

    def sink(i: int, update: Update) -> None:
        updates[i].append(update)
        if update.finish_reason is not None:
            finished.release()

    def submit_all() -> None:
        start = time.monotonic()
        for i in np.argsort(delays) if delays else range(len(requests)):
            if delays:
                time.sleep(max(0.0, start + delays[i] - time.monotonic()))
            engine.submit(requests[i], lambda u, i=int(i): sink(i, u))

    thread = threading.Thread(target=submit_all)
    thread.start()
    for _ in requests:
        assert finished.acquire(timeout=120), "a request never finished"
    thread.join()
    return updates


def tokens_of(updates: list[Update]) -> list[int]:
    return [t for u in updates for t in u.tokens]


def test_per_row_cache_index_matches_the_shared_index_and_each_row_alone(model):
    """decode with a slot per row == the shared-slot path when the slots agree, == each row alone when not."""
    tokens, positions, key_mask = left_pad(PROMPTS, 16, 64)
    cache = init_cache(model.config, 3, 64)
    _, cache = decode(model, jnp.asarray(tokens), cache, 0, positions, key_mask)
    step = jnp.asarray([[5], [6], [7]])
    shared, _ = decode(model, step, cache, 16, positions[:, -1:] + 1, key_mask)
    per_row, _ = decode(model, step, cache, jnp.full(3, 16), positions[:, -1:] + 1, key_mask)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(shared), atol=1e-6)
    # Rows at their own lengths (right-padded, no padding visible): row i decodes at slot len(prompt_i).
    right = np.zeros((3, 16), np.int32)
    for i, p in enumerate(PROMPTS):
        right[i, : len(p)] = p
    ones, positions = np.ones((3, 64), bool), np.broadcast_to(np.arange(16), (3, 16))
    _, cache = decode(model, jnp.asarray(right), init_cache(model.config, 3, 64), 0, positions, ones)
    index = jnp.asarray([len(p) for p in PROMPTS])
    batched, _ = decode(model, step, cache, index, index[:, None], ones)
    for i in range(3):  # the same row in a batch of one
        _, alone = decode(
            model, jnp.asarray(right[i : i + 1]), init_cache(model.config, 1, 64), 0, positions[:1], ones[:1]
        )
        alone, _ = decode(model, step[i : i + 1], alone, index[i : i + 1], index[i : i + 1, None], ones[:1])
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(alone[0]), atol=1e-5)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.5), (20, 0.6), (1, 1.0), (0, 1.0)])
def test_per_row_filters_keep_what_process_logits_keeps(top_k, top_p):
    logits = jax.random.normal(jax.random.key(1), (3, 1000)) * 2
    rows = jax.jit(filter_rows)(logits, jnp.asarray([top_k, 0, 3]), jnp.asarray([top_p, 1.0, 0.9]))
    for row, (k, p) in enumerate([(top_k, top_p), (0, 1.0), (3, 0.9)]):
        expected = process_logits(logits[row], 1.0, k or None, p if p < 1 else None)
        assert np.array_equal(np.isfinite(rows[row]), np.isfinite(expected)), (row, k, p)


def test_text_tracker_cuts_at_stop_strings_and_holds_back_their_start():
    tokens = load_tokenizer().encode("Hello world. The end.")
    tracker, deltas = TextTracker(load_tokenizer(), ["orld.", "xyz"]), []
    for token in tokens:
        tracker.add([token])
        deltas.append(tracker.delta())
        if tracker.stopped:
            break
    assert tracker.stopped and "".join(deltas) == "Hello w"
    assert all("orld" not in d for d in deltas)


def test_greedy_under_concurrent_load_equals_each_request_alone(engine, model):
    """16 requests of mixed prompt lengths and budgets, arriving at random times into 4 slots."""
    rng = random.Random(0)
    prompts = [[rng.randrange(50256) for _ in range(rng.randint(1, 40))] for _ in range(16)]
    budgets = [rng.randint(1, MAX_LEN - len(p)) for p in prompts]
    requests = [
        GenerationRequest(tuple(p), n, temperature=0.0, ignore_eos=True) for p, n in zip(prompts, budgets, strict=True)
    ]
    before = engine.compilations()
    loaded = run_all(engine, requests, [rng.uniform(0, 1.0) for _ in requests])
    alone = [run_all(engine, [r])[0] for r in requests[:4]]  # the engine with nothing else running
    reference = generate(model, prompts, max(budgets), temperature=0, stop_at_eot=False)  # one batch, left-padded
    for i, updates in enumerate(loaded):
        assert tokens_of(updates) == reference[i][: budgets[i]]
        assert updates[-1].finish_reason == "length"
    for i, updates in enumerate(alone):
        assert tokens_of(updates) == tokens_of(loaded[i])
    assert engine.compilations() == before  # warm-up compiled every bucket; nothing compiles per request


def test_a_part_too_big_to_copy_runs_every_row_in_place(model, monkeypatch):
    """Past MAX_PART_BYTES a step runs every row over every slot, and the tokens stay those of generate."""
    monkeypatch.setattr(engine_module, "MAX_PART_BYTES", 2 * 64 * model.config.n_layer * model.config.n_embd * 4)
    engine = Engine(model, load_tokenizer(), max_batch=4, max_len=MAX_LEN).start()
    try:
        assert sorted(engine.step_shapes) == [(1, 32), (1, 64), (2, 32), (4, 64)]  # (2, 64), (4, 32): too big
        requests = [GenerationRequest(tuple(p), 20, temperature=0.0, ignore_eos=True) for p in PROMPTS]
        loaded = run_all(engine, requests, [0.0, 0.1, 0.2])
    finally:
        engine.stop()
    reference = generate(model, PROMPTS, 20, temperature=0, stop_at_eot=False)
    assert [tokens_of(u) for u in loaded] == reference


def test_one_compiled_prefill_per_bucket_and_one_decode_step(engine):
    """Whatever the mix of lengths, sampling rules, seeds and logprobs: no compilation after warm-up (one decode
    step per row and slot bucket: a step runs the first 1, 2 or 4 rows over the first 32 or 64 cache slots)."""
    before = engine.compilations()  # "score" (echo's log-likelihoods) may have compiled in another module's test
    assert (before["prefill"], before["step"]) == (len(engine.buckets), len(engine.step_shapes))
    assert engine.row_buckets == [1, 2, 4]
    assert engine.slot_buckets == [32, 64]
    assert sorted(engine.step_shapes) == [(k, s) for k in (1, 2, 4) for s in (32, 64)]  # a tiny cache: every pair
    assert engine.buckets == [16, 32, 64]
    rules = [dict(temperature=0.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
             dict(temperature=1.0, seed=3, logprobs=2), dict(temperature=0.5, top_k=40, top_p=0.5)]  # fmt: skip
    requests = [GenerationRequest(tuple(range(1, 2 + 7 * i)), 5 + i, **rules[i % 5]) for i in range(8)]
    run_all(engine, requests)
    assert engine.compilations() == before == {**before, "prefill": 3, "step": 6}


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    request = GenerationRequest((1, 2, 3), 20, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    alone = tokens_of(run_all(engine, [request])[0])
    others = [GenerationRequest((9,) * 20, 30, temperature=1.0, ignore_eos=True) for _ in range(3)]
    loaded = run_all(engine, [*others, request], [0.0, 0.0, 0.05, 0.1])
    assert tokens_of(loaded[-1]) == alone
    assert tokens_of(run_all(engine, [GenerationRequest((1, 2, 3), 20, temperature=1.0, top_k=50, seed=8)])[0]) != alone


def test_logprobs_are_the_models_log_softmax(engine, model):
    prompt = [464, 3290, 318]
    updates = run_all(engine, [GenerationRequest(tuple(prompt), 3, temperature=0.0, logprobs=3, ignore_eos=True)])[0]
    entries = [lp for u in updates for lp in u.logprobs]
    tokens = prompt + [e.token for e in entries]
    log_probs = jax.nn.log_softmax(forward(model, jnp.asarray([tokens]))[0], axis=-1)
    for i, entry in enumerate(entries):
        row = np.asarray(log_probs[len(prompt) - 1 + i])
        assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-4)
        assert [t for t, _ in entry.top] == np.argsort(-row)[:3].tolist()
        assert entry.top[0][0] == entry.token  # greedy
    scored = engine.score(tokens, 2)
    assert scored[0] is None
    for i in range(1, len(tokens)):
        assert scored[i].logprob == pytest.approx(float(log_probs[i - 1, tokens[i]]), abs=1e-4)


def test_cancel_and_stop_strings_end_a_request_and_free_its_slot(engine):
    tokens = tokens_of(run_all(engine, [GenerationRequest((5, 6, 7), 20, temperature=0.0, ignore_eos=True)])[0])
    text = load_tokenizer().decode(tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    updates = run_all(engine, [GenerationRequest((5, 6, 7), 20, temperature=0.0, stop=(stop,), ignore_eos=True)])[0]
    assert updates[-1].finish_reason == "stop"
    assert "".join(u.text for u in updates) == text[: text.index(stop)]
    done = threading.Event()
    ticket = engine.submit(GenerationRequest((1,), MAX_LEN - 1, temperature=0.0, ignore_eos=True),
                           lambda u: done.set() if u.finish_reason else None)  # fmt: skip
    engine.cancel(ticket)
    assert done.wait(10) and ticket.done
    deadline = time.monotonic() + 5
    while engine.stats()["free_slots"] < engine.max_batch and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats() == {"running": 0, "waiting": 0, "free_slots": 4}


@pytest.mark.filterwarnings("ignore:dimension .vocab.:UserWarning")  # 50257 rows do not split 2 ways
def test_a_sharded_engine_gives_the_same_greedy_tokens(engine, model):
    mesh = make_mesh("4x2")  # 8 fake CPU devices (conftest): slots over data, heads over model
    sharded = Engine(shard_model(tiny_model(), mesh), load_tokenizer(), max_batch=4, max_len=MAX_LEN, mesh=mesh)
    sharded.start(warmup=False)
    try:
        requests = [GenerationRequest(tuple(p), 8, temperature=0.0, ignore_eos=True) for p in PROMPTS]
        assert [tokens_of(u) for u in run_all(sharded, requests)] == [tokens_of(u) for u in run_all(engine, requests)]
    finally:
        sharded.stop(10)
