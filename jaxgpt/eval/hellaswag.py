"""HellaSwag (Zellers et al., 2019): which of four endings does the model find most likely?

Scored exactly as build-nanogpt's ``hellaswag.py`` and llm.c do: the context's tokens are
``encode(ctx)``, ending ``j``'s are ``encode(" " + endings[j])`` (the space belongs to the
ending, where GPT-2's tokenizer attaches it to the next word), the model reads context +
ending and we add up ``log p(token | all tokens before it)`` over the ending's tokens.
``acc`` picks the ending with the largest sum (build-nanogpt's ``pred``: argmin of the
summed loss); ``acc_norm`` the largest mean per token (its ``pred_norm``: argmin of the
average loss). Ties go to the first ending, as with torch's argmin.

Fixed shapes, so no compilation per item: the rows (4 per item) are sorted by length and scored
``4 * batch_size`` at a time by :func:`jaxgpt.eval.scoring.score_rows`; each batch is padded to the
first of a few lengths (64, 96, 128, 192, 256, ... and block_size) that holds it, and the last batch
is padded with empty rows. A run compiles at most one shape per length, once per model.

Long items: a row longer than ``block_size + 1`` tokens keeps its last ``block_size + 1``
(the model reads all but the last), so the context is truncated from the left. If an
ending alone is that long, its first tokens lose their context and are not scored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jax.sharding import Mesh

from jaxgpt.core.errors import UserError
from jaxgpt.core.sharding import data_axis_size
from jaxgpt.eval.scoring import RowScorer, score_rows
from jaxgpt.model.gpt import GPT
from jaxgpt.tokenizer import Tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_ITEMS = 10042
N_ENDINGS = 4
DEFAULT_BATCH_ITEMS = 8


@dataclasses.dataclass(frozen=True)
class HellaSwagItem:
    """One question: a context, four candidate endings and the index of the right one."""

    ind: int
    ctx: str
    endings: tuple[str, ...]
    label: int
    activity_label: str = ""


class EndingScores(NamedTuple):
    """Per item and ending [N, 4]: log-likelihood of the ending's tokens, summed and per token."""

    sum_logprob: np.ndarray
    mean_logprob: np.ndarray
    num_tokens: np.ndarray


# ----------------------------------------------------------------------------- data


def cache_dir() -> Path:
    """Where downloads are kept: ``$JAXGPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxgpt``, else ~/.cache/jaxgpt."""
    if os.environ.get("JAXGPT_CACHE_DIR"):
        return Path(os.environ["JAXGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxgpt"


def download_hellaswag(url: str | None = None) -> Path:
    """The validation jsonl in the cache, downloaded once from ``url`` (default: HellaSwag's GitHub), atomically."""
    url = url or HELLASWAG_URL
    dest = cache_dir() / "hellaswag_val.jsonl"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (OSError, ValueError) as err:  # URLError, timeouts and refused connections are OSErrors
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not download HellaSwag from {url} ({err}). Offline? Pass a local copy of "
            f"hellaswag_val.jsonl: --hellaswag PATH (or load_hellaswag(path))"
        ) from err
    os.replace(tmp, dest)
    return dest


def parse_item(line: str, where: str, default_ind: int) -> HellaSwagItem:
    """One jsonl line, checked field by field; ``where`` (file and line) starts every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("ctx", "endings", "label") if k not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
        got = f"{len(endings)} items" if isinstance(endings, list) else type(endings).__name__
        raise UserError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings, got {got}")
    if isinstance(label, str) and label.isdigit():  # Hugging Face's copy stores labels as strings
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: 'label' must be an integer from 0 to {N_ENDINGS - 1}, got {label!r}")
    ind = record.get("ind", default_ind)
    if not isinstance(ind, int) or isinstance(ind, bool):
        raise UserError(f"{where}: 'ind' must be an integer, got {ind!r}")
    return HellaSwagItem(ind, ctx, tuple(endings), label, str(record.get("activity_label", "")))


def load_hellaswag(path: str | os.PathLike | None = None) -> list[HellaSwagItem]:
    """Items of a HellaSwag jsonl file; ``None``: the validation set, downloaded once and cached."""
    downloaded = path is None
    path = download_hellaswag() if downloaded else Path(path)
    if not path.is_file():
        raise UserError(f"HellaSwag file {path} not found (or not a file); pass a hellaswag_val.jsonl file")
    items = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{where}: not UTF-8 text ({err.reason})") from err
            if line.strip():
                items.append(parse_item(line, where, default_ind=len(items)))
    if not items:
        raise UserError(f"HellaSwag file {path} holds no items")
    if downloaded and len(items) != HELLASWAG_VAL_ITEMS:
        warnings.warn(f"{path} holds {len(items)} items, not HellaSwag val's {HELLASWAG_VAL_ITEMS}", stacklevel=2)
    return items


# ----------------------------------------------------------------------------- scoring


def render(
    items: Sequence[HellaSwagItem], block_size: int, tokenizer: Tokenizer
) -> tuple[tuple[tuple[np.ndarray, int], ...], ...]:
    """Per item, its 4 rows: (context + ending tokens, left-truncated; how many ending tokens are scored).

    Cached (the last two item lists), so training's periodic evaluation tokenizes only once.
    """
    return _render(tuple(items), block_size, tokenizer)


@functools.lru_cache(maxsize=2)
def _render(
    items: tuple[HellaSwagItem, ...], block_size: int, tokenizer: Tokenizer
) -> tuple[tuple[tuple[np.ndarray, int], ...], ...]:
    contexts = tokenizer.encode_batch([item.ctx for item in items])
    endings = tokenizer.encode_batch([" " + ending for item in items for ending in item.endings])
    rendered = []
    for i, ctx in enumerate(contexts):
        rows = []
        for ending in endings[i * N_ENDINGS : (i + 1) * N_ENDINGS]:
            row = np.asarray(ctx + ending, np.int32)[-(block_size + 1) :]
            n_scored = min(len(ending), len(row) - 1)
            assert n_scored >= 1, (len(ctx), len(ending))  # ctx and " " + ending are never empty
            rows.append((row, n_scored))
        rendered.append(tuple(rows))
    return tuple(rendered)


def default_batch_size(mesh: Mesh | None) -> int:
    """8 items, or the fewest above that whose 4 rows each split evenly over the mesh's data axis."""
    data = 1 if mesh is None else data_axis_size(mesh)
    return next(b for b in range(DEFAULT_BATCH_ITEMS, DEFAULT_BATCH_ITEMS + data) if N_ENDINGS * b % data == 0)


def score_endings(
    model: GPT,
    items: Sequence[HellaSwagItem],
    tokenizer: Tokenizer,
    *,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> EndingScores:
    """Log-likelihood of each item's four endings given its context, [N, 4] each (see the module doc).

    ``batch_size`` items (4 rows each) per step; ``None``: 8, or more if the mesh's data axis needs it.
    """
    if not items:
        raise UserError("no HellaSwag items to score")
    batch_size = default_batch_size(mesh) if batch_size is None else batch_size
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    scorer = RowScorer(model, mesh)
    scorer.check_rows(N_ENDINGS * batch_size, f"HellaSwag rows per batch ({N_ENDINGS} x batch_size)")
    rows = [row for item_rows in render(items, model.config.block_size, tokenizer) for row in item_rows]
    tokens, n_scored = [row for row, _ in rows], [n for _, n in rows]
    scores = score_rows(scorer, tokens, n_scored, N_ENDINGS * batch_size, desc="hellaswag", progress=progress)
    sums = scores.log_likelihood.reshape(len(items), N_ENDINGS)
    counts = np.asarray(n_scored).reshape(len(items), N_ENDINGS)
    return EndingScores(sum_logprob=sums, mean_logprob=sums / counts, num_tokens=counts)


def evaluate_hellaswag(
    model: GPT, items: Sequence[HellaSwagItem], tokenizer: Tokenizer, *, progress: bool = True, **scoring: Any
) -> dict:
    """``{"acc", "acc_norm", "num_items"}``: accuracy of the summed and of the per-token log-likelihood;
    ``scoring``: :func:`score_endings`' ``batch_size`` and ``mesh``."""
    scores = score_endings(model, items, tokenizer, progress=progress, **scoring)
    labels = np.asarray([item.label for item in items])
    return {
        "acc": float(np.mean(scores.sum_logprob.argmax(axis=1) == labels)),
        "acc_norm": float(np.mean(scores.mean_logprob.argmax(axis=1) == labels)),
        "num_items": len(items),
    }
