"""The OpenAI-compatible API, through the official ``openai`` client and raw HTTP: bodies, streams, errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from jaxgpt.chat.template import render
from jaxgpt.sampling.generate import generate
from jaxgpt.tokenizer import load_tokenizer
from tests.serve_utils import MAX_LEN, MODEL_NAME, live_server, wait_all_free

pytest_plugins = ("tests.serve_utils",)  # the module fixtures model, engine (MAX_BATCH slots) and url

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a neural network?"}]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def greedy_text(model, prompt: list[int], n: int) -> tuple[list[int], str]:
    """The reference: jaxgpt.sampling.generate alone (itself checked against transformers in test_sampling)."""
    tokens = generate(model, [prompt], n, temperature=0)[0]
    return tokens, load_tokenizer().decode([t for t in tokens if t != 50256])


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["free_slots"] == 4


def test_completion_greedy_matches_generate(client, model):
    prompt = "Once upon a time"
    tokens, text = greedy_text(model, load_tokenizer().encode(prompt), 12)
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == ("stop" if tokens[-1] == 50256 else "length")
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == len(tokens)
    assert out.usage.total_tokens == 4 + len(tokens)


def test_completion_stream_concatenates_to_the_same_text(client):
    kwargs = dict(model=MODEL_NAME, prompt=[464, 3290, 318], max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].usage.prompt_tokens == 3


def test_completion_lists_of_prompts_n_seed_and_stop(client, model):
    out = client.completions.create(
        model=MODEL_NAME, prompt=["Hello", "The cat"], max_tokens=6, n=2, temperature=1.0, seed=11
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    again = client.completions.create(
        model=MODEL_NAME, prompt=["Hello", "The cat"], max_tokens=6, n=2, temperature=1.0, seed=11
    )
    assert [c.text for c in out.choices] == [c.text for c in again.choices]  # seeds reproduce
    _, text = greedy_text(model, load_tokenizer().encode("Hello"), 16)
    stop = text[5:8]
    cut = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_completion_echo_and_logprobs(client):
    prompt = [464, 3290, 318, 257]
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and logprobs.token_logprobs[0] is None
    assert out.choices[0].text.startswith(load_tokenizer().decode(prompt))
    assert all(lp < 0 for lp in logprobs.token_logprobs[1:])
    greedy = logprobs.top_logprobs[-1]  # the generated token is the greedy one: its own top entry
    assert next(iter(greedy.values())) == pytest.approx(logprobs.token_logprobs[-1])


def test_chat_greedy_matches_the_template_and_streams(client, model):
    prompt = render(MESSAGES, load_tokenizer(), add_generation_prompt=True).tokens.tolist()
    _, text = greedy_text(model, prompt, 16)
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text.removeprefix(" ")
    assert out.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_sse_stream_ends_with_done(url):
    body = {"messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    json.loads(lines[-2].removeprefix("data: "))


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
        ({"prompt": 3}, 400, "prompt", ""),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
        ({"prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens", f"maximum context length is {MAX_LEN}"),
        ({"prompt": "x", "temperature": -0.5}, 400, "temperature", ">= 0"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p", ""),
        ({"prompt": "x", "n": 5}, 400, "n", "between 1 and 4"),
        ({"prompt": [70000]}, 400, "prompt", "vocabulary"),
        ({"prompt": "x", "logprobs": 9}, 400, "logprobs", ""),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
        ({"prompt": "x" * (1 << 21)}, 413, None, "bytes"),
    ],
)
def test_bad_requests_get_openai_error_bodies(url, engine, body, status, param, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"]
    assert wait_all_free(engine)["free_slots"] == 4


def test_chat_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_LEN)
    assert httpx.get(f"{client.base_url}".removesuffix("/v1/") + "/v1/nothing").status_code == 404


def test_api_key_guards_every_endpoint_but_health(engine):
    with live_server(engine, api_key="sesame") as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200  # the page; its requests carry the key
        for path in ("/v1/models", "/v1/completions"):
            response = httpx.post(f"{url}{path}", json={}) if "compl" in path else httpx.get(f"{url}{path}")
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices[0].text is not None
