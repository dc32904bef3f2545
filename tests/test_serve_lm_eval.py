"""lm-eval's ``local-completions`` model through the server scores as lm-eval's ``jaxgpt`` model does."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it

from jaxgpt.checkpoints.loading import load_model
from jaxgpt.eval import harness  # noqa: F401  registers lm-eval's "jaxgpt" model
from tests.serve_utils import MODEL_NAME, live_server, new_engine
from tests.test_harness import HELLASWAG_STYLE, model_dir, write_local_task  # noqa: F401  model_dir: a fixture


def evaluate(model: str, model_args: str, tasks_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(model=model, model_args=model_args, tasks=["tiny_choice"], task_manager=manager,
                           log_samples=True)  # fmt: skip


def per_choice(results: dict) -> np.ndarray:
    """Each item's log-likelihood of each ending, [items, endings]."""
    samples = sorted(results["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    return np.asarray([[float(r[0][0]) for r in s["resps"]] for s in samples])


def test_local_completions_through_the_server_matches_the_jaxgpt_model(model_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_local_task(tmp_path / "tasks", HELLASWAG_STYLE)
    reference = evaluate("jaxgpt", f"init_from={model_dir},batch_size=8", tasks)
    engine = new_engine(load_model(str(model_dir)), max_batch=4)
    try:
        with live_server(engine) as url:
            args = (f"model={MODEL_NAME},base_url={url}/v1/completions,tokenizer_backend=remote,"
                    "num_concurrent=1,max_retries=1,max_length=64")  # fmt: skip
            served = evaluate("local-completions", args, tasks)
    finally:
        engine.stop(10)
    ours, theirs = per_choice(served), per_choice(reference)
    assert ours.shape == theirs.shape == (len(HELLASWAG_STYLE), 4)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert served["results"]["tiny_choice"]["acc,none"] == reference["results"]["tiny_choice"]["acc,none"]
