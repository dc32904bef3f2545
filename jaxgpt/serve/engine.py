"""Continuous batching over the KV cache: requests join and leave a running batch between decode steps.

The engine owns ``max_batch`` slots, each a row of one KV cache. A waiting request is prefilled into
a free slot (one compiled prefill per prompt bucket) and from then on decoded together with every
other running request, each row at its own position (one compiled decode step per bucket of rows and
of cache slots); a row that ends frees its slot for the next waiting request at once. The engine runs
on its own thread and knows nothing about HTTP: ``submit`` hands it a request and a ``sink`` that it
calls with each :class:`Update` (from the engine's thread). The host reads a step's tokens while the next step
runs, so the device is never idle waiting for the host, let alone for a client.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import data_axis_size, kv_cache_sharding, replicated
from jaxgpt.model.decoding import init_cache
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.generate import bucket_cache_len, bucket_prompt_len
from jaxgpt.serve.device import Picked, RowRules, model_leaves
from jaxgpt.serve.text import TextTracker
from jaxgpt.tokenizer import Tokenizer

MIN_SLOT_BUCKET = 128  # the fewest cache slots a decode step reads (fewer for a shorter cache)
# A step over part of the cache copies that part out and back; above this many bytes of keys and values,
# running every row over every slot in place is faster (measured on CPU with GPT-2 124M: 1 row x 1024
# slots, 74 MB, 98 ms against 200 ms in place for 32 x 1024; 8 x 256, 151 MB, 245 ms).
MAX_PART_BYTES = 128 * 2**20


def _doubling(smallest: int, largest: int) -> list[int]:
    """``smallest``, twice that, ... up to ``largest`` (included)."""
    return sorted({min(smallest << i, largest) for i in range(largest.bit_length() + 1)})


class QueueFullError(Exception):
    """Every slot is busy and the waiting queue is full: try again later."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: the engine picks one
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past <|endoftext|> (benchmarks)
    logprobs: int | None = None  # alternatives per generated token, at most TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this position and their log-probabilities


@dataclasses.dataclass(frozen=True)
class Update:
    """New text and tokens of a request; ``finish_reason`` ("stop", "length", "cancelled") ends it."""

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


class Ticket:
    """A submitted request: the engine's bookkeeping, and the handle ``Engine.cancel`` takes."""

    def __init__(
        self, request: GenerationRequest, sink: Callable[[Update], None], seed: int, tokenizer: Tokenizer
    ) -> None:
        self.request, self.sink, self.seed = request, sink, seed
        self.text = TextTracker(tokenizer, request.stop)
        self.generated = 0  # tokens read back
        self.dispatched = 0  # tokens the device has been asked for
        self.slot: int | None = None
        self.cancelled = False
        self.done = False


class Engine:
    """The batching engine; ``start()`` its thread, ``submit`` requests, ``stop()`` to finish (drains)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        max_len: int | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        config = model.config
        self.tokenizer = tokenizer  # the model's: its end-of-text ends a request, its bytes make the text
        self.max_len = min(max_len or config.block_size, config.block_size)  # prompt + new tokens
        if max_batch < 1 or (mesh is not None and max_batch % data_axis_size(mesh)):
            raise UserError(f"max_batch {max_batch} must be positive (and a multiple of the mesh's data axis)")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.leaves, self.fns = model_leaves(model)
        self.buckets = sorted({min(bucket_prompt_len(n), self.max_len) for n in range(1, self.max_len)})
        cache_len = bucket_cache_len(self.max_len)
        # A step runs the first k rows over the first s cache slots, k and s powers of two (or all of them), so a
        # lone short request decodes as a batch of one over a short cache; a mesh runs every row.
        self.row_buckets = [max_batch] if mesh is not None else _doubling(1, max_batch)
        self.slot_buckets = (
            [cache_len] if mesh is not None else _doubling(min(MIN_SLOT_BUCKET, cache_len // 2), cache_len)
        )
        slot_bytes = 2 * config.n_layer * config.n_embd * jnp.dtype(config.dtype).itemsize  # a key and a value
        self.step_shapes = [(max_batch, cache_len)] + [
            (k, s) for k in self.row_buckets for s in self.slot_buckets
            if k * s * slot_bytes <= MAX_PART_BYTES and (k, s) != (max_batch, cache_len)
        ]  # fmt: skip
        sharding = None if mesh is None else kv_cache_sharding(mesh, config.n_head)
        shapes = jax.eval_shape(lambda: init_cache(config, max_batch, cache_len))
        self.cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=sharding), shapes)
        self.tokens = jnp.zeros(max_batch, jnp.int32, device=None if mesh is None else replicated(mesh))
        self.index = np.zeros(max_batch, np.int32)  # each row's next slot (= position)
        self.rules = RowRules(
            np.zeros(max_batch, np.float32), np.zeros(max_batch, np.int32), np.ones(max_batch, np.float32),
            np.zeros(max_batch, np.uint32), np.zeros(max_batch, np.int32), np.zeros(max_batch, bool),
        )  # fmt: skip
        self.slots: list[Ticket | None] = [None] * max_batch
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="jaxgpt-engine", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ the HTTP side's calls

    def start(self, warmup: bool = True) -> Engine:
        if warmup:
            self._warmup()
        self.thread.start()
        return self

    def submit(self, request: GenerationRequest, sink: Callable[[Update], None]) -> Ticket:
        """Queues ``request``; ``sink`` gets its updates. QueueFullError past ``max_queue`` beyond free slots."""
        assert len(request.prompt) >= 1 and len(request.prompt) + request.max_tokens <= self.max_len, request
        seed = random.getrandbits(32) if request.seed is None else request.seed % 2**32
        ticket = Ticket(request, sink, seed, self.tokenizer)
        with self.wake:
            if self.stopping:
                raise QueueFullError("the server is shutting down")
            if len(self.waiting) >= self.max_queue + self.slots.count(None):
                raise QueueFullError(f"{len(self.waiting)} requests are waiting for a slot already")
            self.waiting.append(ticket)
            self.wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Ends a request (its client went away): its slot is freed before the next step."""
        with self.wake:
            ticket.cancelled = True
            self.wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes every running and waiting request, then ends the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def score(self, prompt: Sequence[int], top: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability after the tokens before it, with ``top`` alternatives.

        The first token has None (nothing predicts it), as OpenAI's ``echo`` with ``logprobs`` gives.
        Thread-safe: called from the HTTP side, beside the running batch.
        """
        padded = np.zeros((1, self._bucket(len(prompt))), np.int32)
        padded[0, : len(prompt)] = prompt
        token, top_ids, top_logprobs = jax.device_get(self.fns.score(self.leaves, padded))
        entries: list[TokenLogprob | None] = [None]
        for i in range(1, len(prompt)):
            alternatives = tuple(zip(top_ids[i - 1, :top].tolist(), top_logprobs[i - 1, :top].tolist(), strict=True))
            entries.append(TokenLogprob(int(prompt[i]), float(token[i - 1]), alternatives))
        return entries

    def stats(self) -> dict[str, int]:
        with self.wake:
            busy = sum(t is not None for t in self.slots)
            return {"running": busy, "waiting": len(self.waiting), "free_slots": self.max_batch - busy}

    def compilations(self) -> dict[str, int]:
        """Executables held by each compiled function: a prefill per prompt bucket, a step per row and slot bucket."""
        return {name: fn._cache_size() for name, fn in self.fns._asdict().items()}

    # ------------------------------------------------------------------ the engine's thread

    def _warmup(self) -> None:
        """Compiles the decode step and every prefill bucket before the first request waits on them."""
        for p in self.buckets:
            self._prefill(0, np.zeros(p, np.int32), p)
        for rows, slots in self.step_shapes:
            self._step(np.zeros(rows, bool), slots)
        jax.block_until_ready(self.tokens)

    def _run(self) -> None:
        inflight: collections.deque[tuple[Picked, list[Ticket | None]]] = collections.deque()
        try:
            while True:
                with self.wake:
                    self._drop_cancelled()
                    admitted = self._admit()
                    runnable = [t is not None and t.dispatched < t.request.max_tokens for t in self.slots]
                    if not (any(runnable) or inflight or admitted):
                        if self.stopping and not self.waiting:
                            return
                        self.wake.wait(0.5)
                        continue
                for slot, ticket in admitted:
                    prompt = ticket.request.prompt
                    inflight.append((self._prefill(slot, prompt, len(prompt)), [ticket]))
                    ticket.dispatched = 1
                runnable = [t is not None and t.dispatched < t.request.max_tokens for t in self.slots]
                newest = 0
                if any(runnable):
                    last = max(i for i, run in enumerate(runnable) if run)
                    reach = max(self.index[i] for i, run in enumerate(runnable) if run)
                    k, slots = self._step_shape(last, reach)
                    rows = [t if run else None for t, run in zip(self.slots[:k], runnable[:k], strict=True)]
                    inflight.append((self._step(np.array(runnable[:k]), slots), rows))
                    newest = 1
                while len(inflight) > newest:  # read what is done while the newest step runs
                    self._read(*inflight.popleft())
        except BaseException as err:  # a bug or a device error: fail every request rather than hang them
            self.error = err
            for ticket in [*self.slots, *self.waiting]:
                if ticket is not None and not ticket.done:
                    self._finish(ticket, "error")
            raise

    def _drop_cancelled(self) -> None:
        for ticket in [t for t in self.waiting if t.cancelled]:
            self.waiting.remove(ticket)
            self._finish(ticket, "cancelled")
        for ticket in self.slots:
            if ticket is not None and ticket.cancelled and not ticket.done:
                self._finish(ticket, "cancelled")

    def _admit(self) -> list[tuple[int, Ticket]]:
        admitted = []
        for slot in range(self.max_batch):
            if self.slots[slot] is None and self.waiting:
                ticket = self.waiting.popleft()
                self.slots[slot], ticket.slot = ticket, slot
                r = ticket.request
                self.index[slot] = len(r.prompt)
                for name, value in (
                    ("temperature", r.temperature), ("top_k", r.top_k), ("top_p", r.top_p), ("seed", ticket.seed),
                    ("count", 0), ("logprobs", r.logprobs is not None),
                ):  # fmt: skip
                    getattr(self.rules, name)[slot] = value
                admitted.append((slot, ticket))
        return admitted

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def _prefill(self, slot: int, prompt, length: int) -> Picked:
        padded = np.zeros((1, self._bucket(length)), np.int32)
        padded[0, :length] = prompt
        row_rules = RowRules(*(np.asarray(x[slot]) for x in self.rules))
        self.cache, self.tokens, picked = self.fns.prefill(
            self.leaves, self.cache, self.tokens, np.int32(slot), padded, np.int32(length), row_rules
        )
        return picked

    def _step_shape(self, last: int, reach: int) -> tuple[int, int]:
        """The compiled step's rows and slots for rows up to ``last`` at slots up to ``reach``: its own buckets,
        or every row over every slot where that part of the cache is too big to copy."""
        shape = (next(b for b in self.row_buckets if b > last), next(b for b in self.slot_buckets if b > reach))
        return shape if shape in self.step_shapes else self.step_shapes[0]

    def _step(self, runnable: np.ndarray, slots: int) -> Picked:
        """A decode step over the first ``len(runnable)`` rows and ``slots`` cache slots; the runnable ones advance.

        A row that is not runnable (free, or done and not yet read) computes a token nobody reads, at a
        slot inside the step's reach.
        """
        rules = self.rules._replace(count=self.rules.count.copy())
        index = np.where(np.pad(runnable, (0, self.max_batch - len(runnable))), self.index, 0).astype(np.int32)
        assert index.max() < slots, (index, slots)
        self.cache, self.tokens, picked = self.fns.step(
            self.leaves, self.cache, self.tokens, index, rules, rows=len(runnable), slots=slots
        )
        for slot in np.flatnonzero(runnable):
            self.slots[slot].dispatched += 1
            self.index[slot] += 1
            self.rules.count[slot] += 1
        return picked

    def _read(self, picked: Picked, rows: list[Ticket | None]) -> None:
        """Hands each row's token to its request (``rows``: the request of each row of ``picked``, or None)."""
        host = jax.device_get(picked)
        for slot, ticket in enumerate(rows):
            if ticket is None or ticket.done:
                continue
            token = int(host.token[slot])
            ticket.generated += 1
            logprobs = ()
            if ticket.request.logprobs is not None:
                n = ticket.request.logprobs
                top = tuple(zip(host.top_ids[slot, :n].tolist(), host.top_logprobs[slot, :n].tolist(), strict=True))
                logprobs = (TokenLogprob(token, float(host.logprob[slot]), top),)
            ticket.text.add([token])
            reason = None
            if ticket.text.stopped or (token == self.tokenizer.eot_id and not ticket.request.ignore_eos):
                reason = "stop"
            elif ticket.generated >= ticket.request.max_tokens:
                reason = "length"
            ticket.sink(Update(ticket.text.delta(final=reason is not None), (token,), logprobs, reason))
            if reason is not None:
                with self.wake:
                    self._release(ticket)

    def _finish(self, ticket: Ticket, reason: str) -> None:
        ticket.sink(Update(ticket.text.delta(final=True) if reason != "cancelled" else "", (), (), reason))
        self._release(ticket)

    def _release(self, ticket: Ticket) -> None:
        ticket.done = True
        if ticket.slot is not None and self.slots[ticket.slot] is ticket:
            self.slots[ticket.slot] = None
