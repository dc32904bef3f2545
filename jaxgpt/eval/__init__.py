"""Evaluation: validation loss over token shards and HellaSwag accuracy (``python -m jaxgpt.eval``)."""

from jaxgpt.eval.hellaswag import (
    EndingScores,
    HellaSwagItem,
    evaluate_hellaswag,
    load_hellaswag,
    score_endings,
)
from jaxgpt.eval.loss import evaluate_loss

__all__ = ["EndingScores", "HellaSwagItem", "evaluate_hellaswag", "evaluate_loss", "load_hellaswag", "score_endings"]
