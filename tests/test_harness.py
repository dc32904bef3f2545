"""lm-evaluation-harness: the ``jaxgpt`` model answers as lm-eval's own ``hf`` model on the same weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from jaxgpt.convert import save_hf_gpt2
from jaxgpt.core.errors import UserError
from jaxgpt.eval import harness
from jaxgpt.eval.harness import JaxGPTLM
from jaxgpt.eval.hellaswag import HellaSwagItem, score_endings
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.tokenizer import load_tokenizer

BLOCK_SIZE = 64
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1492, Columbus sailed the ocean blue, and the crew",
    "def add(a, b):\n    return a + b\n",
    "She opened the door and",
]
LONG_TEXT = " ".join(SENTENCES * 6)  # ~200 tokens: several rolling windows, and truncation from the left


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 saved by ``save_hf_gpt2`` with GPT-2's tokenizer, written offline from tiktoken.

    The weights are scaled up so that next-token distributions are peaked: greedy choices are not near-ties.
    """
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    path = tmp_path_factory.mktemp("harness") / "gpt2-tiny"
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=BLOCK_SIZE), nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 6, params))
    save_hf_gpt2(model, path)
    convert_tiktoken_to_fast(load_tokenizer()._enc, str(path))
    return path


@pytest.fixture(scope="module")
def jaxgpt_lm(model_dir) -> JaxGPTLM:
    return get_model("jaxgpt").create_from_arg_string(f"init_from={model_dir},batch_size=8")


@pytest.fixture(scope="module")
def hf_lm(model_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return get_model("hf").create_from_arg_string(
        f"pretrained={model_dir},dtype=float32", {"batch_size": 4, "device": "cpu"}
    )


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


LOGLIKELIHOOD_ARGS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("In 1492, Columbus sailed ", "the ocean blue"),  # the trailing space moves to the continuation
    ("", "She opened the door and"),  # empty context: end-of-text is the context
    (LONG_TEXT, " and then it was over."),  # longer than the context: truncated from the left
    ("def add(a, b):\n", "    return a + b\n"),
    ("A", " B"),
]


def test_loglikelihood_matches_hf(jaxgpt_lm, hf_lm):
    ours = jaxgpt_lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD_ARGS), disable_tqdm=True)
    theirs = hf_lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD_ARGS), disable_tqdm=True)
    np.testing.assert_allclose([ll for ll, _ in ours], [ll for ll, _ in theirs], rtol=0, atol=1e-4)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]


def test_is_greedy_is_true_for_the_models_own_continuation(jaxgpt_lm):
    context = "The quick brown fox"
    greedy = jaxgpt_lm.generate_until(requests("generate_until", [(context, {"max_gen_toks": 6})]))[0]
    ours = jaxgpt_lm.loglikelihood(requests("loglikelihood", [(context, greedy), (context, greedy + " zebra")]))
    assert [is_greedy for _, is_greedy in ours] == [True, False]


def test_loglikelihood_rolling_matches_hf(jaxgpt_lm, hf_lm):
    docs = [(LONG_TEXT,), (SENTENCES[0],), (SENTENCES[2],)]
    ours = jaxgpt_lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs), disable_tqdm=True)
    theirs = hf_lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs), disable_tqdm=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=1e-4)  # float32 sums over ~200 tokens of ~-30


def test_generate_until_matches_hf_greedy(jaxgpt_lm, hf_lm):
    args = [
        (SENTENCES[0], {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}),
        (SENTENCES[1], {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}),
        (SENTENCES[3], {"until": ["e"], "max_gen_toks": 16}),  # cut at the first "e"
        (LONG_TEXT, {"until": ["e"], "max_gen_toks": 16}),  # left-truncated to leave room for 16 tokens
    ]
    ours = jaxgpt_lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    theirs = hf_lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert ours == theirs
    assert all("e" not in text for text in ours[2:]) and len(ours[0]) > 0


def test_hellaswag_choice_equals_jaxgpt_hellaswag(jaxgpt_lm):
    items = HELLASWAG_STYLE
    # 8 rows on the adapter's mesh: the shape the requests compiled, nothing compiles again
    reference = score_endings(jaxgpt_lm.model, items, load_tokenizer(), batch_size=2, mesh=jaxgpt_lm.mesh)
    args = [(item.ctx, " " + ending) for item in items for ending in item.endings]
    ours = jaxgpt_lm.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    sums = np.asarray([ll for ll, _ in ours]).reshape(len(items), 4)
    np.testing.assert_allclose(sums, reference.sum_logprob, rtol=0, atol=1e-4)
    assert (sums.argmax(axis=1) == reference.sum_logprob.argmax(axis=1)).all()


def test_sharded_mesh_gives_the_same_answers(jaxgpt_lm, model_dir):
    sharded = JaxGPTLM(init_from=str(model_dir), batch_size=8, mesh="4x2")
    expected = jaxgpt_lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD_ARGS), disable_tqdm=True)
    got = sharded.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD_ARGS), disable_tqdm=True)
    np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in expected], rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="not divisible"):
        JaxGPTLM(init_from=str(model_dir), batch_size=3, mesh="4x2")
    with pytest.raises(UserError, match="fixed shapes"):
        JaxGPTLM(init_from=str(model_dir), batch_size="auto")


HELLASWAG_STYLE = [
    HellaSwagItem(0, "A woman stands at a kitchen sink. She", ("scrubs a plate.", "throws it.", "sings.", "is."), 0),
    HellaSwagItem(1, "A boy pushes his bike up a hill. He", ("rides down.", "eats it.", "paints it.", "sleeps."), 1),
    HellaSwagItem(2, "Snow covers the driveway. A man", ("clears it.", "swims.", "calls a friend.", "builds."), 2),
    HellaSwagItem(3, "The band walks onto the stage. The drummer", ("counts in.", "leaves.", "sits.", "eats."), 3),
]  # fmt: skip


def write_local_task(path: Path, items: list[HellaSwagItem]) -> Path:
    """An lm-eval multiple-choice task over a local jsonl: lm-eval's own pipeline, offline."""
    path.mkdir()
    data = path / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"ctx": i.ctx, "endings": list(i.endings), "label": i.label}) + "\n" for i in items)
    )
    (path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n  cache_dir: {path / 'cache'}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return path


def test_simple_evaluate_runs_an_lm_eval_task_on_the_registered_model(model_dir, jaxgpt_lm, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = TaskManager(include_path=str(write_local_task(tmp_path / "tasks", HELLASWAG_STYLE)), include_defaults=False)
    results = simple_evaluate(
        model="jaxgpt", model_args=f"init_from={model_dir},batch_size=8", tasks=["tiny_choice"], task_manager=tasks
    )
    scores = score_endings(jaxgpt_lm.model, HELLASWAG_STYLE, load_tokenizer(), batch_size=2, mesh=jaxgpt_lm.mesh)
    expected = np.mean(scores.sum_logprob.argmax(axis=1) == [item.label for item in HELLASWAG_STYLE])
    assert results["results"]["tiny_choice"]["acc,none"] == expected


def test_cli_hands_lm_eval_its_run_command(monkeypatch):
    from lm_eval._cli.harness import HarnessCLI

    seen = []
    monkeypatch.setattr(harness, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    harness.main(["--init_from", "out/run", "--mesh", "4x2", "--tasks", "arc_easy,hellaswag", "--limit", "5"])
    (argv,) = seen
    args = HarnessCLI()._parser.parse_args(argv[1:])  # lm-eval's own parser accepts it
    assert (args.model, args.tasks, args.limit, args.batch_size) == ("jaxgpt", ["arc_easy", "hellaswag"], 5, "32")
    expected = {"init_from": "out/run", "dtype": "float32", "max_gen_toks": 256, "mesh": "4x2"}
    assert args.model_args == expected
    assert sys.argv[0] != "lm-eval"  # restored


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init_from", "x"], "no tasks"),
        (["--tasks", "hellaswag", "--model", "hf"], "the model is jaxgpt"),
        (["--tasks", "hellaswag", "--init_from", "a,b"], "comma"),
    ],
)
def test_cli_bad_input_is_a_user_error(args, message):
    with pytest.raises(UserError, match=message):
        harness.main(args)
