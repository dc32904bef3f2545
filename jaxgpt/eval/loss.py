"""Validation loss over token shards, every token of the split scored exactly once.

Which tokens are scored: the split's shards are read, in order, as one token stream
``x[0] .. x[N-1]`` and cut into windows of ``block_size + 1`` tokens that overlap by
one (stride ``T = block_size``), as training's validation batches are: window ``k``
reads ``x[kT] .. x[kT+T-1]`` and predicts ``x[kT+1] .. x[kT+T]``. So every token but
the stream's first is a target exactly once, predicted from the tokens before it in
its window (the context restarts at each window, as in training). Windows run across
shard boundaries: a shard ends wherever it filled up, not at a document boundary.

The last window is usually short and the last batch usually not full; both are padded
to the fixed batch shape and the padding gets weight 0, so nothing is dropped and
nothing counts twice. ``max_tokens`` scores only the first ``max_tokens`` targets
``x[1] .. x[max_tokens]``. The loss is the mean negative log-likelihood over the scored
tokens (summed in float64 on the host) and the perplexity its exponential.

Chat shards (with label shards) are scored as training reads them: one conversation a
row, in order, and only the targets the loss mask keeps (the assistants' tokens), so the
loss is the mean over every scored token of the split, however long each conversation.
``max_batches`` (both kinds) scores only the first ``max_batches * batch_size`` examples.
"""

from __future__ import annotations

import math
import os

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxgpt.core.errors import UserError
from jaxgpt.data.meta import read_meta
from jaxgpt.data.pipeline import Conversations, TokenStream
from jaxgpt.data.shards import list_shards
from jaxgpt.eval.scoring import RowScorer, pack_rows
from jaxgpt.model.gpt import GPT


def window_batch(stream: TokenStream, first_window: int, batch_size: int, block_size: int, end: int):
    """Inputs, targets and weights [batch_size, block_size] of windows ``first_window`` onward.

    ``end`` is one past the last stream token to use; rows past it are padding (weight 0).
    """
    t = block_size
    start = min(first_window * t, end)
    stop = min(start + batch_size * t + 1, end)
    tokens = stream.read(np.asarray([start]), stop - start)[0] if stop > start else np.zeros(0, np.int32)
    windows = [tokens[i : i + t + 1] for i in range(0, max(len(tokens) - 1, 0), t)]
    return pack_rows(windows, [len(w) - 1 for w in windows], batch_size, t)


def evaluate_loss(
    model: GPT,
    data_dir: str | os.PathLike,
    *,
    batch_size: int,
    block_size: int | None = None,
    max_tokens: int | None = None,
    max_batches: int | None = None,
    split: str = "val",
    mesh: Mesh | None = None,
    progress: bool = False,
) -> dict:
    """Mean loss over a split's shards: ``{"val_loss", "val_bpb", "perplexity", "num_tokens"}`` (module doc).

    ``batch_size`` windows of ``block_size`` (default: the model's) run per step, split over
    the mesh's ``data`` axis; the model is used as placed (shard it first for tensor parallelism).
    """
    block_size = model.config.block_size if block_size is None else block_size
    if not 1 <= block_size <= model.config.block_size:
        raise UserError(f"block_size must be between 1 and the model's {model.config.block_size}, got {block_size}")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be positive, got {max_tokens}")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"max_batches must be positive, got {max_batches}")
    scorer = RowScorer(model, mesh)
    scorer.check_rows(batch_size, "batch size")
    paths = list_shards(data_dir, split)
    stream = TokenStream(paths, vocab_size=model.config.vocab_size)
    if stream.labels is not None:
        if max_tokens is not None:
            raise UserError(f"{data_dir} holds chat data, scored by conversation: max_tokens does not apply")
        return conversation_loss(Conversations(stream, block_size), scorer, batch_size, max_batches, progress)
    if max_batches is not None:
        limit = max_batches * batch_size * block_size
        max_tokens = limit if max_tokens is None else min(max_tokens, limit)
    end = stream.num_tokens if max_tokens is None else min(stream.num_tokens, max_tokens + 1)
    num_tokens = end - 1
    if num_tokens < 1:
        raise UserError(f"the '{split}' shards in {data_dir} hold {stream.num_tokens} tokens; at least 2 are needed")

    num_windows = -(-num_tokens // block_size)
    total_log_likelihood, counted = 0.0, 0
    bar = tqdm(total=num_tokens, desc=f"{split} loss", unit="tok", unit_scale=True, disable=None if progress else True)
    for first in range(0, num_windows, batch_size):
        inputs, targets, weights = window_batch(stream, first, batch_size, block_size, end)
        total_log_likelihood += scorer(inputs, targets, weights).sum()
        counted += int(weights.sum())
        bar.update(int(weights.sum()))
    bar.close()
    assert counted == num_tokens, (counted, num_tokens)
    loss = float(-total_log_likelihood / num_tokens)
    bpb = bits_per_byte(loss, data_dir, split)
    return {"val_loss": loss, **bpb, "perplexity": math.exp(loss), "num_tokens": num_tokens}


def bits_per_byte(loss: float, data_dir: str | os.PathLike, split: str = "val") -> dict[str, float]:
    """``{"val_bpb"}``: nats per token / ln 2 x the split's tokens per byte (as nanochat), when prepare counted
    the split's UTF-8 bytes in meta.json; ``{}`` for data without (older, or chat: scored by its mask)."""
    try:
        counts = read_meta(data_dir)["splits"][split]
    except (UserError, KeyError, TypeError):
        return {}
    if not counts.get("bytes"):
        return {}
    return {"val_bpb": loss / math.log(2) * counts["tokens"] / counts["bytes"]}


def conversation_loss(
    conversations: Conversations, scorer: RowScorer, batch_size: int, max_batches: int | None, progress: bool
) -> dict:
    """Mean loss over the masked targets of the first conversations (all, or ``max_batches`` batches of them)."""
    count = len(conversations) if max_batches is None else min(len(conversations), max_batches * batch_size)
    total_log_likelihood, scored = 0.0, 0.0
    for first in tqdm(
        range(0, count, batch_size), desc="conversations", unit="batch", disable=None if progress else True
    ):
        batch = conversations.batch(np.arange(first, min(first + batch_size, count)))
        missing = ((0, batch_size - len(batch["inputs"])), (0, 0))  # the last batch: rows of weight 0
        inputs, targets, weights = (np.pad(batch[k], missing) for k in ("inputs", "targets", "weights"))
        total_log_likelihood += scorer(inputs, targets, weights).sum()
        scored += float(weights.sum())
    if scored == 0:
        raise UserError("the conversations scored hold no assistant tokens to score")
    loss = float(-total_log_likelihood / scored)
    return {"val_loss": loss, "perplexity": math.exp(loss), "num_tokens": int(scored)}
