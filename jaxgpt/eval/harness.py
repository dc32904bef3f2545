"""EleutherAI's lm-evaluation-harness on jaxgpt: an ``LM`` registered as model ``jaxgpt``.

    python -m jaxgpt.eval.harness --init_from out/run --tasks hellaswag,arc_easy,lambada_openai

or, after ``import jaxgpt.eval.harness``, ``lm_eval.simple_evaluate(model="jaxgpt",
model_args="init_from=out/run,dtype=bfloat16,batch_size=32", tasks=[...])``.

Requests are answered with jaxgpt's own compiled paths: ``loglikelihood`` (and the windows
of ``loglikelihood_rolling``) go through :func:`jaxgpt.eval.scoring.score_rows`, fixed-shape
batches padded to a few length buckets; ``generate_until`` through
:func:`jaxgpt.sampling.generate`, the KV-cache decoder. Both split the batch over the ``data``
axis of ``mesh`` and the model over ``model``. Tokenisation, the context/continuation split,
rolling windows, stop sequences and generation kwargs are lm-eval's own code (``TemplateLM``
and its utils), so the answers are those of lm-eval's ``hf`` model on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from jaxgpt.checkpoints.loading import LoadConfig, load_sharded, resolve_init_from
from jaxgpt.core.cli import build, parser_for, run
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.eval.scoring import RowScorer, score_rows
from jaxgpt.sampling.generate import generate
from jaxgpt.tokenizer import tokenizer_of

MODEL_NAME = "jaxgpt"
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's hf model
SAMPLING_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
LOG = logging.getLogger(__name__)
LM_EVAL_OWN_FLAGS = ("--model", "-M", "--model_args", "-a")

# (context, continuation) strings or None, context tokens, continuation tokens: TemplateLM's request form
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]
LogLikelihood = tuple[float, bool]  # log p(continuation | context), is it the greedy continuation


def parse_batch_size(value: int | str) -> int:
    """lm-eval passes the batch size as given on its command line; jaxgpt compiles one fixed size."""
    if isinstance(value, str) and not value.isdigit():
        raise UserError(f"batch_size {value!r}: jaxgpt compiles fixed shapes, give a number (e.g. 32)")
    if int(value) < 1:
        raise UserError(f"batch_size must be positive, got {value}")
    return int(value)


@register_model(MODEL_NAME)
class JaxGPTLM(TemplateLM):
    """A jaxgpt checkpoint, Hugging Face GPT-2 directory or hub id, evaluated by lm-eval.

    ``batch_size`` rows per compiled call (split over the mesh's data axis); ``mesh`` DxM as
    everywhere in jaxgpt (default: every device on data). ``device`` and ``max_batch_size``,
    which lm-eval passes to every model, are not used: the mesh places the model.
    """

    def __init__(
        self,
        init_from: str = "gpt2",
        dtype: str = "float32",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        mesh: str | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 1234,
        **lm_eval_kwargs: Any,
    ):
        super().__init__()
        unknown = set(lm_eval_kwargs) - {"device", "max_batch_size"}
        if unknown:
            known = "init_from, dtype, batch_size, mesh, max_gen_toks, seed"
            raise UserError(f"unknown jaxgpt model_args {sorted(unknown)}; known: {known}")
        self.batch_size = parse_batch_size(batch_size)
        self.model, self.mesh = load_sharded(str(init_from), None if mesh is None else str(mesh), dtype=dtype)
        self.scorer = RowScorer(self.model, self.mesh)
        self.scorer.check_rows(self.batch_size, "batch_size")
        self.bpe = tokenizer_of(str(init_from))  # the one the run carries; else GPT-2's
        self.max_length = self.model.config.block_size
        self.max_gen_toks = int(max_gen_toks)
        self.key = jax.random.key(int(seed))
        self.batch_sizes: dict[int, int] = {}  # lm-eval records these in its results (auto batch sizes)

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        """GPT-2's <|endoftext|>: lm-eval's default prefix of rolling windows and a stop sequence."""
        return self.bpe.eot_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The model's BPE; ``<|endoftext|>`` in the text is the special token, as in Hugging Face's tokenizer."""
        return self.bpe.encode(string, allow_eot=True)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` without the end-of-text token (Hugging Face's ``skip_special_tokens``)."""
        return self.bpe.decode([t for t in tokens if t != self.eot_token_id])

    def get_model_info(self) -> dict:
        """What lm-eval records about the model in its results: the parameter count and the config."""
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))
        return {"model_num_parameters": n_params, **self.model.config.to_dict()}

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False) -> list[LogLikelihood]:
        """(log p(continuation | context), is it the greedy continuation) per request.

        As lm-eval's hf model: context + continuation keeps its last ``block_size + 1`` tokens.
        """
        too_long = [len(cont) for _, _, cont in requests if len(cont) > self.max_length]
        if too_long:
            raise UserError(f"a continuation of {max(too_long)} tokens exceeds the context of {self.max_length}")
        rows = [(context + cont)[-(self.max_length + 1) :] for _, context, cont in requests]
        scores = score_rows(
            self.scorer, rows, [len(cont) for _, _, cont in requests], self.batch_size,
            desc="loglikelihood", progress=not disable_tqdm,
        )  # fmt: skip
        answers = list(zip(scores.log_likelihood.tolist(), scores.is_greedy.tolist(), strict=True))
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:  # rolling windows are cached per document instead
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of the model's context (lm-eval's windows)."""
        windows, owners = [], []
        for i, (string,) in enumerate(request.args for request in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(i)
        log_likelihoods = np.zeros(len(requests))
        answers = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        np.add.at(log_likelihoods, owners, [ll for ll, _ in answers])
        for request, total in zip(requests, log_likelihoods.tolist(), strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return log_likelihoods.tolist()

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop sequence, end-of-text or ``max_gen_toks`` tokens."""
        groups: dict[str, list[int]] = {}  # requests with the same generation kwargs run together
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=True if disable_tqdm else None)
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            for i, text in zip(indices, self._generate_group(contexts, requests[indices[0]].args[1]), strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return out

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        ignored = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if ignored:
            LOG.warning("jaxgpt ignores the generation kwargs %s", ignored)
        until = handle_stop_sequences(kwargs["until"], eos=self.bpe.decode([self.eot_token_id]))
        max_new = kwargs["max_gen_toks"]
        temperature = float(kwargs.get("temperature", 1.0)) if kwargs["do_sample"] else 0.0  # as transformers
        if max_new >= self.max_length:
            raise UserError(f"max_gen_toks={max_new} leaves no room for a prompt in a context of {self.max_length}")
        prompts = [self.tok_encode(context)[-(self.max_length - max_new) :] for context in contexts]
        stopped = lambda tokens: any(s and s in self.tok_decode(tokens) for s in until)
        order = np.argsort([-len(p) for p in prompts], kind="stable")  # similar lengths share a batch
        texts = [""] * len(prompts)
        for first in range(0, len(prompts), self.batch_size):
            batch = order[first : first + self.batch_size]
            batch_prompts = [prompts[i] for i in batch]
            batch_prompts += [batch_prompts[-1]] * (self.batch_size - len(batch))  # one compiled batch shape
            self.key, key = jax.random.split(self.key)
            new_tokens = generate(
                self.model, batch_prompts, max_new, temperature=temperature, top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"), key=key, stop=stopped, mesh=self.mesh, eot_id=self.eot_token_id,
            )  # fmt: skip
            for i, tokens in zip(batch, new_tokens, strict=False):
                texts[i] = postprocess_generated_text(self.tok_decode(tokens), until, think_end_token=None)
        return texts


# ---------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True)
class HarnessConfig(LoadConfig):
    """Run lm-evaluation-harness tasks on a jaxgpt model; every other flag is lm-eval's (lm-eval run --help)."""

    batch_size: int = option(DEFAULT_BATCH_SIZE, "rows per compiled call, split over the mesh's data axis")
    max_gen_toks: int = option(DEFAULT_MAX_GEN_TOKS, "new tokens per generation unless the task sets its own")


def lm_eval_argv(config: HarnessConfig, rest: Sequence[str]) -> list[str]:
    """``lm-eval run`` arguments: model ``jaxgpt`` with ``config`` as its model_args, then the user's flags."""
    clash = [flag for flag in rest if flag.split("=")[0] in LM_EVAL_OWN_FLAGS]
    if clash:
        raise UserError(f"{clash[0]}: the model is jaxgpt, set by --init_from, --dtype, --mesh and --max_gen_toks")
    config = dataclasses.replace(config, init_from=resolve_init_from(config.init_from))
    if "," in config.init_from:
        raise UserError(f"--init_from {config.init_from}: lm-eval's model_args cannot hold a path with a comma")
    model_args = f"init_from={config.init_from},dtype={config.dtype},max_gen_toks={config.max_gen_toks}"
    model_args += f",mesh={config.mesh}" if config.mesh else ""
    return ["run", "--model", MODEL_NAME, "--model_args", model_args, "--batch_size", str(config.batch_size), *rest]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxgpt.eval.harness``: lm-eval's own command line, with model jaxgpt and these flags as its
    model_args."""
    parser = parser_for("python -m jaxgpt.eval.harness", HarnessConfig.__doc__, (HarnessConfig, None))
    parser.epilog = "lm-eval's flags: --tasks, --num_fewshot, --limit, --output_path, --log_samples, ..."
    known, rest = parser.parse_known_args(argv)
    if "--tasks" not in rest and "-t" not in rest and not any(arg.startswith("--tasks=") for arg in rest):
        raise UserError("no tasks: pass --tasks, e.g. --tasks hellaswag,arc_easy,lambada_openai")
    saved, sys.argv = sys.argv, ["lm-eval", *lm_eval_argv(build(HarnessConfig, known), rest)]
    try:  # lm-eval's own command line: its output and result files, its table
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    run(main)
