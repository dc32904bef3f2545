"""The OpenAI API as vLLM serves it: request validation, engine requests, response bodies, error bodies.

Requests are validated strictly (a string where a number belongs is a 400, not coerced); unknown
fields are ignored, as vLLM does. Every error is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from jaxgpt.chat.template import ChatError, render
from jaxgpt.serve.device import TOP_LOGPROBS
from jaxgpt.serve.engine import GenerationRequest, TokenLogprob
from jaxgpt.tokenizer import Tokenizer

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
}  # fmt: skip


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        error_type = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; -1 or 0: off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def parse(model: type[_Strict], body: Any) -> Any:
    """A validated request, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise ApiError(400, message, param)


def prompts_of(request: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of each prompt; text is encoded by the model's tokenizer (``<|endoftext|>`` allowed),
    an empty prompt starts from end-of-text."""
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    _check(len(prompt) > 0, "prompt: give at least one prompt", "prompt")
    encode, vocab = tokenizer.encode, tokenizer.vocab_size
    out = [encode(p, allow_eot=True) if isinstance(p, str) else list(p) for p in prompt]
    bad = sorted({t for p in out for t in p if not 0 <= t < vocab})
    _check(not bad, f"prompt: token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
    return [p or [tokenizer.eot_id] for p in out]


def chat_prompt(request: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The conversation rendered by jaxgpt's chat template, ending with the assistant's turn."""
    messages = [
        {"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
        for m in request.messages
    ]
    try:
        return render(messages, tokenizer, add_generation_prompt=True).tokens.tolist()
    except ChatError as err:
        raise ApiError(400, f"messages: {err}", "messages") from None


def generation_requests(
    request: _Sampling,
    prompts: Sequence[list[int]],
    max_len: int,
    max_n: int,
    logprobs: int | None,
    default_max: int | None,
) -> list[GenerationRequest]:
    """One engine request per prompt and choice (``n``), checked against the model's context ``max_len``."""
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    top_k = 0 if request.top_k in (None, -1) else request.top_k
    _check(temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {temperature}", "temperature")
    _check(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}", "top_p")
    _check(top_k >= 0, f"top_k must be -1 (off) or >= 1, got {top_k}", "top_k")
    _check(1 <= request.n <= max_n, f"n must be between 1 and {max_n}, got {request.n}", "n")
    _check(logprobs is None or 0 <= logprobs <= TOP_LOGPROBS, f"logprobs must be in [0, {TOP_LOGPROBS}]", "logprobs")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    longest = max(len(p) for p in prompts)
    max_tokens = request.max_tokens if request.max_tokens is not None else default_max or max_len - longest
    _check(max_tokens >= 1, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if longest + max_tokens > max_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            "max_tokens", "context_length_exceeded",
        )  # fmt: skip
    seeds = [None if request.seed is None else request.seed + choice for choice in range(request.n)]
    rule = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop=stop, ignore_eos=request.ignore_eos)
    return [
        GenerationRequest(tuple(prompt), max_tokens, seed=seed, logprobs=logprobs, **rule)
        for prompt in prompts
        for seed in seeds
    ]


# ---------------------------------------------------------------------- response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(object_type: str, request_id: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "object": object_type, "created": int(time.time()), "model": model,
            "choices": choices, **extra}  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """One token's text, as OpenAI's logprobs list it (a split character shows as its replacement)."""
    return tokenizer.decode([token])


def completion_logprobs(
    tokenizer: Tokenizer, entries: Sequence[TokenLogprob | None], tokens: Sequence[int], offset: int = 0
) -> dict[str, list]:
    """OpenAI's completions ``logprobs``: tokens, their log-probabilities, top alternatives, text offsets.

    An entry of None (the first prompt token when echoed: nothing predicts it) gives nulls.
    """
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, list]:
    """OpenAI's chat ``logprobs``: per token its text, log-probability, bytes and top alternatives."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(tokenizer, token), list(tokenizer.decode_bytes([token]))
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]}


def model_card(name: str, root: str, max_len: int, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "jaxgpt", "root": root,
            "parent": None, "max_model_len": max_len}  # fmt: skip
