"""Load and faults: a full queue (429), clients that leave mid-stream, 256 streamed requests, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jaxgpt.convert import save_hf_gpt2
from tests.serve_utils import MAX_LEN, live_server, new_engine, wait_all_free

pytest_plugins = ("tests.serve_utils",)  # the module fixtures model, engine (MAX_BATCH slots) and url

MAX_BATCH = 8

REPO = Path(__file__).resolve().parents[1]


async def stream_completion(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> list[dict]:
    """One streamed completion's chunks; raises unless it ends with [DONE]."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    chunks, done = [], False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line:
                chunks.append(json.loads(line.removeprefix("data: ")))
    assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
    return chunks


def test_load_64_concurrent_streaming_clients_256_requests(url, engine):
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)

    async def main() -> list:
        gate = asyncio.Semaphore(64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def one(i: int):
                async with gate:
                    return await stream_completion(client, url, [1 + i % 50] * (1 + i % 20), 4 + i % 8)

            return await asyncio.gather(*(one(i) for i in range(256)), return_exceptions=True)

    start = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), 240))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    tokens = sum(len(c["choices"][0]["text"]) > 0 for chunks in results for c in chunks)
    print(f"256 streamed requests in {time.monotonic() - start:.1f} s, {tokens} non-empty chunks")
    assert wait_all_free(engine) == {"running": 0, "waiting": 0, "free_slots": 8}


def test_clients_that_leave_mid_stream_free_their_slots(url, engine):
    async def leave(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": [5 + i], "max_tokens": MAX_LEN - 1, "stream": True, "ignore_eos": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    return  # the first chunk: hang up

    async def main() -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(leave(client, i) for i in range(50)))
        assert wait_all_free(engine)["free_slots"] == engine.max_batch
        async with httpx.AsyncClient(timeout=60) as client:  # then max_batch requests at once, all served
            return await asyncio.gather(*(stream_completion(client, url, [7], MAX_LEN - 1) for _ in range(8)))

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert all(sum(len(c["choices"][0]["text"]) for c in chunks) > 0 for chunks in results)
    assert wait_all_free(engine) == {"running": 0, "waiting": 0, "free_slots": 8}


def test_clients_that_leave_before_a_whole_answer_free_their_slots(model):
    """Not streamed: the server sees the client hang up while it generates, and cancels (as vLLM)."""
    engine = new_engine(model, max_batch=2)
    step, steps = engine._step, []
    engine._step = lambda *args: (time.sleep(0.05), steps.append(1), step(*args))[2]  # a slow device
    try:
        with live_server(engine) as url:
            long = {"max_tokens": 40, "ignore_eos": True}  # 2 s of steps
            for route, body in (
                ("completions", {"prompt": [3], **long}),
                ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], **long}),
            ):
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}/v1/{route}", json=body, timeout=0.5)
                assert wait_all_free(engine, 5) == {"running": 0, "waiting": 0, "free_slots": 2}
                assert len(steps) < 20, f"{route}: {len(steps)} steps ran for a client that left"
                steps.clear()
    finally:
        engine.stop(10)


def test_a_full_queue_answers_429_with_retry_after(model):
    engine = new_engine(model, max_batch=1, max_queue=1)
    step = engine._step
    engine._step = lambda *args: (time.sleep(0.05), step(*args))[1]  # a slow device
    try:
        with live_server(engine) as url, httpx.Client(timeout=60) as client:
            body = {"prompt": [1], "max_tokens": 40, "ignore_eos": True, "stream": True}
            with client.stream("POST", f"{url}/v1/completions", json=body) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the stream (a client leaving)
                next(lines)  # the slot is taken
                with client.stream("POST", f"{url}/v1/completions", json=body) as waiting:
                    assert waiting.status_code == 200  # the queue has room for one
                    while engine.stats()["waiting"] == 0:
                        time.sleep(0.01)
                    refused = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
                    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert wait_all_free(engine) == {"running": 0, "waiting": 0, "free_slots": 1}
    finally:
        engine.stop(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_running_requests_then_exits_0(model, tmp_path):
    save_hf_gpt2(model, tmp_path / "hf")
    port = free_port()
    args = ["--init_from", str(tmp_path / "hf"), "--port", str(port), "--max_model_len", str(MAX_LEN),
            "--max_batch", "2", "--warmup", "false"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", *args], cwd=REPO, env=os.environ.copy(),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": [3], "max_tokens": MAX_LEN - 1, "stream": True, "ignore_eos": True, "temperature": 0}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                lines.append(line)
        lines = [line for line in lines if line]
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
        assert lines[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0, proc.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
