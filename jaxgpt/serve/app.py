"""The HTTP side: FastAPI routes of vLLM's OpenAI-compatible server over a running :class:`Engine`.

Routes never touch the device: they validate, hand engine requests over and turn the engine's
updates (delivered onto the event loop) into JSON bodies or server-sent events. A client that goes
away, streaming or not, cancels its requests, which frees their slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxgpt.serve import protocol as p
from jaxgpt.serve.engine import Engine, GenerationRequest, QueueFullError, TokenLogprob, Update

MAX_BODY_BYTES = 1 << 20  # 413 past this
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.1  # how often a request waiting for a whole answer checks its client
# Longer than clients keep idle connections (httpx: 5 s), so a client never reuses one the server just closed.
KEEP_ALIVE_S = 30
PAGE = Path(__file__).with_name("static") / "chat.html"
OPEN_PATHS = ("/health", "/")  # without --api_key's bearer token: the page itself holds no data


class Choices:
    """The engine requests of one HTTP request; iterating yields (choice index, Update) until all end."""

    def __init__(self, engine: Engine, requests: Sequence[GenerationRequest]) -> None:
        self.engine, self.loop, self.queue = engine, asyncio.get_running_loop(), asyncio.Queue()
        self.tickets = []
        try:
            for i, request in enumerate(requests):
                self.tickets.append(engine.submit(request, functools.partial(self._put, i)))
        except QueueFullError as err:
            self.cancel()
            raise p.ApiError(429, f"the server is busy ({err}); retry shortly", code="rate_limit_exceeded") from None

    def _put(self, index: int, update: Update) -> None:  # on the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, update))

    async def __aiter__(self) -> AsyncIterator[tuple[int, Update]]:
        remaining = len(self.tickets)
        while remaining:
            index, update = await self.queue.get()
            if update.finish_reason == "error":
                raise p.ApiError(500, f"the engine failed: {self.engine.error!r}")
            remaining -= update.finish_reason is not None
            yield index, update

    def cancel(self) -> None:
        for ticket in self.tickets:
            if not ticket.done:
                self.engine.cancel(ticket)


class _Choice:
    """What one choice has produced so far (for a body that is not streamed)."""

    def __init__(self) -> None:
        self.text, self.tokens, self.logprobs, self.finish_reason = "", [], [], None

    def add(self, update: Update) -> None:
        self.text += update.text
        self.tokens += update.tokens
        self.logprobs += update.logprobs
        self.finish_reason = update.finish_reason or self.finish_reason


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every path but OPEN_PATHS (401 otherwise)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.expected = app, None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        guarded = self.expected is not None and scope["type"] == "http" and scope["path"] not in OPEN_PATHS
        if guarded and dict(scope["headers"]).get(b"authorization") != self.expected:
            error = p.ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")
            await JSONResponse(error.body(), error.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def read_json(request: Request) -> Any:
    """The request body as JSON: 413 past MAX_BODY_BYTES, 400 if it does not parse."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise p.ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise p.ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise p.ApiError(400, f"the request body is not valid JSON: {err}") from None


def create_app(engine: Engine, model_name: str, root: str, api_key: str | None = None) -> FastAPI:
    """The server's routes over a started ``engine``; ``model_name`` is the id clients send as ``model``."""
    app = FastAPI(title="jaxgpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BearerAuth, api_key=api_key)
    created = int(time.time())
    max_n, tokenizer = engine.max_batch, engine.tokenizer

    @app.exception_handler(p.ApiError)
    async def api_error(_: Request, err: p.ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
        return JSONResponse(err.body(), err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(p.ApiError(err.status_code, str(err.detail)).body(), err.status_code)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise p.ApiError(404, f"The model `{name}` does not exist (this server serves `{model_name}`)",
                             "model", "model_not_found")  # fmt: skip

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 503 if engine.error is not None else 200
        return JSONResponse({"status": "ok" if status == 200 else "engine failed", **engine.stats()}, status)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [p.model_card(model_name, root, engine.max_len, created)]}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return {"tokenizer_class": f"tiktoken {tokenizer.describe()}", "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>", "pad_token": None, "model_max_length": engine.max_len}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise p.ApiError(400, "prompt: give the text to tokenize", "prompt")
        tokens = tokenizer.encode(body["prompt"], allow_eot=True)
        return {"count": len(tokens), "max_model_len": engine.max_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in tokens
        ):
            raise p.ApiError(400, "tokens: give a list of token ids", "tokens")
        return {"prompt": tokenizer.decode(tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = p.parse(p.CompletionRequest, await read_json(request))
        check_model(body.model)
        prompts = p.prompts_of(body, tokenizer)
        requests = p.generation_requests(body, prompts, engine.max_len, max_n, body.logprobs, 16)
        choices = Choices(engine, requests)
        request_id, name = p.new_id("cmpl"), body.model or model_name
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        prompt_text = [tokenizer.decode(prompts[i // body.n]) for i in range(len(requests))]
        if body.stream:

            async def events() -> AsyncIterator[str]:
                completion_tokens = 0
                echoed = set()
                async for index, update in choices:
                    completion_tokens += len(update.tokens)
                    text = update.text
                    if body.echo and index not in echoed:
                        text, _ = prompt_text[index] + text, echoed.add(index)
                    logprobs = (
                        p.completion_logprobs(tokenizer, update.logprobs, update.tokens)
                        if body.logprobs is not None
                        else None
                    )
                    choice = {"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": update.finish_reason, "stop_reason": None}  # fmt: skip
                    yield sse(
                        p.envelope(
                            "text_completion", request_id, name, [choice], **({"usage": None} if include_usage else {})
                        )
                    )
                if include_usage:
                    total = sum(len(prompts[i // body.n]) for i in range(len(requests)))
                    yield sse(
                        p.envelope("text_completion", request_id, name, [], usage=p.usage(total, completion_tokens))
                    )

            return stream_response(events(), choices)
        results = await collect(choices, len(requests), request)
        out = []
        for index, result in enumerate(results):
            prompt = prompts[index // body.n]
            logprobs = None
            if body.logprobs is not None:
                entries: list[TokenLogprob | None] = list(result.logprobs)
                tokens = list(result.tokens)
                if body.echo:
                    entries = await run_in_threadpool(engine.score, prompt, body.logprobs) + entries
                    tokens = prompt + tokens
                logprobs = p.completion_logprobs(tokenizer, entries, tokens)
            text = (prompt_text[index] if body.echo else "") + result.text
            out.append({"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason, "stop_reason": None})  # fmt: skip
        prompt_tokens = sum(len(p_) for p_ in prompts) * body.n
        completion_tokens = sum(len(r.tokens) for r in results)
        return p.envelope("text_completion", request_id, name, out, usage=p.usage(prompt_tokens, completion_tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = p.parse(p.ChatCompletionRequest, await read_json(request))
        check_model(body.model)
        prompt = p.chat_prompt(body, tokenizer)
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = p.generation_requests(body, [prompt], engine.max_len, max_n, top, None)
        choices = Choices(engine, requests)
        request_id, name = p.new_id("chatcmpl"), body.model or model_name
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:

            async def events() -> AsyncIterator[str]:
                extra = {"usage": None} if include_usage else {}
                for index in range(body.n):
                    first = {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield sse(p.envelope("chat.completion.chunk", request_id, name, [first], **extra))
                started, completion_tokens = set(), 0
                async for index, update in choices:
                    completion_tokens += len(update.tokens)
                    text = update.text
                    if index not in started and text:
                        text, _ = text.removeprefix(" "), started.add(index)
                    delta = {"content": text} if text else {}
                    logprobs = p.chat_logprobs(tokenizer, update.logprobs) if body.logprobs else None
                    choice = {
                        "index": index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": update.finish_reason,
                    }
                    if delta or update.finish_reason or logprobs:
                        yield sse(p.envelope("chat.completion.chunk", request_id, name, [choice], **extra))
                if include_usage:
                    usage = p.usage(len(prompt) * body.n, completion_tokens)
                    yield sse(p.envelope("chat.completion.chunk", request_id, name, [], usage=usage))

            return stream_response(events(), choices)
        results = await collect(choices, len(requests), request)
        out = [
            {"index": i, "message": {"role": "assistant", "content": r.text.removeprefix(" ")},
             "logprobs": p.chat_logprobs(tokenizer, r.logprobs) if body.logprobs else None,
             "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]  # fmt: skip
        completion_tokens = sum(len(r.tokens) for r in results)
        return p.envelope(
            "chat.completion", request_id, name, out, usage=p.usage(len(prompt) * body.n, completion_tokens)
        )

    return app


async def collect(choices: Choices, n: int, request: Request) -> list[_Choice]:
    """Every choice's whole answer (a body that is not streamed); a client that leaves first cancels them."""

    async def watch() -> None:  # as vLLM: poll the connection while the engine works
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        choices.cancel()

    results = [_Choice() for _ in range(n)]
    watcher = asyncio.create_task(watch())
    try:
        async for index, update in choices:
            results[index].add(update)
    finally:
        watcher.cancel()
        choices.cancel()
    return results


def stream_response(events: AsyncIterator[str], choices: Choices) -> StreamingResponse:
    """Server-sent events ending with ``data: [DONE]``; a client that leaves cancels the requests."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except p.ApiError as err:
            yield sse(err.body())
        finally:
            choices.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def uvicorn_config(app: FastAPI, host: str, port: int):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """uvicorn serving ``app`` on a thread (port 0: a free one) for tests and benchmarks; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host, port))
    thread = threading.Thread(target=server.run, name="jaxgpt-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
