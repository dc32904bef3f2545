"""The chat page at / in a real browser: headless Chromium (Debian's) driven by Selenium."""

from __future__ import annotations

import shutil
import tempfile
import time

import openai
import pytest

from tests.serve_utils import MAX_LEN, MODEL_NAME, wait_all_free

pytest_plugins = ("tests.serve_utils",)  # the module fixtures model, engine (MAX_BATCH slots) and url

MAX_BATCH = 2

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
STEP_DELAY_S = 0.05  # slows each decode step so that Stop lands mid-reply


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="jaxgpt-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def set_field(browser, name: str, value: str) -> None:
    field = browser.find_element("id", name)
    field.clear()
    field.send_keys(value)


def ask(browser, text: str) -> None:
    set_field(browser, "input", text)
    browser.find_element("id", "send").click()


def last(browser, css: str, wait_done: bool = True, timeout: float = 60):
    """The newest element matching ``css`` (once its reply is done, with ``wait_done``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = browser.find_elements("css selector", css)
        if found and (not wait_done or found[-1].get_attribute("data-done") == "true"):
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no finished {css} within {timeout}s")


def api_reply(url: str, messages: list[dict], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0)
    return out.choices[0].message.content


def test_page_streams_the_apis_greedy_reply_over_two_turns(browser, url):
    browser.get(url + "/")
    assert browser.title == "jaxgpt chat"
    set_field(browser, "system", "Be brief.")
    set_field(browser, "temperature", "0")
    set_field(browser, "max_tokens", "12")
    ask(browser, "What is a neural network?")
    first = last(browser, ".msg.assistant").text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a neural network?"}]
    assert first == api_reply(url, messages, 12).strip()  # the page shows the text, less trailing blanks
    ask(browser, "And then?")
    replies = browser.find_elements("css selector", ".msg.assistant")
    second = last(browser, ".msg.assistant").text
    assert len(browser.find_elements("css selector", ".msg.assistant")) == len(replies) == 2
    history = [*messages, {"role": "assistant", "content": api_reply(url, messages, 12)}]
    assert second == api_reply(url, [*history, {"role": "user", "content": "And then?"}], 12).strip()
    assert browser.find_element("id", "model").text == MODEL_NAME


def test_page_shows_the_servers_errors(browser, url):
    browser.get(url + "/")
    set_field(browser, "max_tokens", str(MAX_LEN * 2))
    ask(browser, "Hello")
    error = last(browser, ".msg.error", wait_done=False)
    assert "maximum context length" in error.text


def test_stop_cancels_generation_on_the_server(browser, url, engine):
    step = engine._step

    def slow_step(*args):
        time.sleep(STEP_DELAY_S)
        return step(*args)

    engine._step = slow_step
    try:
        browser.get(url + "/")
        set_field(browser, "temperature", "0")
        set_field(browser, "max_tokens", "40")
        ask(browser, "Tell me a story")
        last(browser, ".msg.assistant", wait_done=False)
        deadline = time.monotonic() + 20
        while engine.stats()["running"] == 0 or not last(browser, ".msg.assistant", wait_done=False).text:
            assert time.monotonic() < deadline, "the reply never started"
            time.sleep(0.02)
        browser.find_element("id", "stop").click()
        stopped_at = time.monotonic()
        reply = last(browser, ".msg.assistant")
        assert reply.get_attribute("data-stopped") == "true"
        assert wait_all_free(engine, timeout=5)["free_slots"] == engine.max_batch
        assert time.monotonic() - stopped_at < 40 * STEP_DELAY_S / 2  # freed long before the 40 tokens were done
    finally:
        engine._step = step
    full = api_reply(url, [{"role": "user", "content": "Tell me a story"}], 40)
    assert full.startswith(reply.text) and len(reply.text) < len(full)
