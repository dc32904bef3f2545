"""sample.py without flags: as many new tokens as fit (up to 256); chat answers without leading whitespace;
the plan's text says "no peak known" once."""

from __future__ import annotations

import io

import jax
import pytest
from flax import nnx

from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.plan import report as plan
from jaxgpt.sampling import text as text_sampling
from jaxgpt.sampling.config import SampleConfig
from jaxgpt.sampling.text import TextStream
from jaxgpt.tokenizer import load_tokenizer

MODEL = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), nnx.Rngs(0))


@pytest.mark.parametrize(("prompt", "max_new_tokens", "expected"), [("", None, 15), ("ROMEO:", None, 13), ("", 4, 4)])
def test_new_tokens_default_to_what_fits_the_context(monkeypatch, prompt, max_new_tokens, expected):
    asked = []
    monkeypatch.setattr(text_sampling, "generate", lambda model, prompts, n, **kw: asked.append(n) or [[]])
    config = SampleConfig(init_from="unused", prompt=prompt, max_new_tokens=max_new_tokens, stream=False)
    assert len(load_tokenizer().encode("ROMEO:")) == 3
    text_sampling.sample_prompt(MODEL, load_tokenizer(), prompt, config, jax.random.key(0), io.StringIO(), None)
    assert asked == [expected]


def test_chat_answers_start_at_their_first_visible_character():
    tok, out = load_tokenizer(), io.StringIO()
    stream = TextStream(tok, out, strip_space=True, end="\n")  # as sample.py --chat writes replies
    for token in [*tok.encode(" \n\nJuliet, my love."), tok.eot_id]:
        stream(0, token)
    stream.close()
    assert out.getvalue() == "Juliet, my love.\n"


def test_the_plan_says_once_that_no_peak_is_known(capsys):
    tiny = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "256"]
    plan.main(["--target", "cpu", *tiny, "--batch_size", "2"])
    printed = capsys.readouterr().out
    assert printed.count("no peak known") == 1, printed
