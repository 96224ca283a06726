"""The playground in headless Chromium against the real server and the bundled model: what
the page shows is held to what the API returns for the same request."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import openai
import pytest

from tests.integration.ops_server import scrape, wait_for
from tests.integration.server import running_server

from .conftest import open_tab
from .playground import MODEL, NO_EOS, choice_texts, compose, error_text, load, run


@pytest.fixture(scope="module")
def base_url():
    with running_server() as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_page_loads_without_console_errors_and_shows_api_errors(tab, base_url, screenshots):
    page = tab.page
    load(page, base_url)
    assert page.input_value("#model") == MODEL
    # SmolLM2 has no FIM tokens: /v1/models says so, and the page offers no suffix box.
    card = httpx.get(f"{base_url}/v1/models").json()["data"][0]
    assert card["supports_suffix"] is False and page.is_hidden("#suffix-row")
    assert tab.console.errors == []
    page.screenshot(path=screenshots / "loaded.png", full_page=True)

    compose(page, "Hello", top_p=2)
    assert run(page) == "error"
    api = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "top_p": 2}).json()
    shown = error_text(page)
    assert shown.startswith("400 invalid_request_error")
    assert api["error"]["message"] in shown and "param: top_p" in shown

    # best_of > n cannot stream (the API refuses it): the page sends that request whole.
    compose(page, "Hello", max_tokens=4, seed=3, best_of=2)
    assert run(page) == "done" and page.is_hidden("#error")
    whole = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "seed": 3,
                                                           "best_of": 2, "logprobs": 5}).json()
    assert choice_texts(page) == [whole["choices"][0]["text"]]
    assert "not streamed" in page.text_content(".result .stats")


def test_seeded_run_shows_the_api_text_and_shares_the_same_request(tab, browser, base_url, client, screenshots):
    page = tab.page
    load(page, base_url)
    fields = dict(max_tokens=16, temperature=0.9, seed=1234, n=2, logprobs=2, echo=True)
    compose(page, "Once upon a time", **fields)
    assert run(page) == "done"
    api = client.completions.create(model=MODEL, prompt="Once upon a time", **fields)
    expected = [c.text for c in api.choices]
    assert choice_texts(page) == expected
    # n > 1 side by side: the same row, one column each.
    first, second = (page.locator(f".result[data-index='{i}']").bounding_box() for i in range(2))
    assert first["y"] == second["y"] and second["x"] >= first["x"] + first["width"]
    stats = page.text_content(".result[data-index='0'] .stats")
    assert "TTFT" in stats and "tok/s" in stats and "16 tokens" in stats
    usage = page.text_content(".result[data-index='0'] .usage")
    assert f"completion {api.usage.completion_tokens}" in usage and "cached" in usage
    page.locator(".result[data-index='1'] .tok").nth(3).hover()
    page.wait_for_selector("#inspector:not([hidden]) .alt")
    page.screenshot(path=screenshots / "compose.png")

    # Copy as Python: the snippet, run as it is, prints the same texts.
    page.click("#copy-python")
    snippet = page.text_content("#snippet")
    printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, check=True)
    assert printed.stdout == "".join(f"--- choice {i}\n{t}\n" for i, t in enumerate(expected))
    # Copy as curl: the body it sends is the request the page sent.
    page.click("#copy-curl")
    curl = page.text_content("#snippet")
    body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0].replace("'\\''", "'"))
    assert body == {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_p": 1,
                    "n": 2, "seed": 1234, "presence_penalty": 0, "frequency_penalty": 0, "echo": True,
                    "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}

    # The URL fragment holds the page: a fresh tab opened on the link runs the same request.
    page.click("#copy-link")
    link = page.text_content("#snippet")
    assert link.startswith(base_url) and "seed=1234" in link
    other = open_tab(browser)
    try:
        other.page.goto(link)
        other.page.wait_for_selector("#results[data-state='done']")
        assert choice_texts(other.page) == expected
        assert other.page.input_value("#prompt") == "Once upon a time"
    finally:
        other.page.context.close()


def test_hovering_a_token_shows_the_api_alternatives_and_clicking_one_continues(tab, base_url, client, screenshots):
    page = tab.page
    load(page, base_url)
    prompt = "The capital of France is"
    compose(page, prompt, max_tokens=8, temperature=0, logprobs=5)
    assert run(page) == "done"
    api = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=5)
    lp = api.choices[0].logprobs
    spans = page.locator(".result[data-index='0'] .tok")
    assert spans.count() == len(lp.tokens)
    assert "".join(spans.nth(i).text_content() for i in range(spans.count())) == api.choices[0].text

    # The first token after the start with visible text and an alternative to click.
    k = next(i for i in range(1, len(lp.tokens)) if lp.tokens[i].strip() and len(lp.top_logprobs[i]) > 1)
    spans.nth(k).hover()
    page.wait_for_selector("#inspector:not([hidden]) .alt")
    page.screenshot(path=screenshots / "inspector.png")
    buttons = page.locator("#inspector .alt")
    shown = [(json.loads(buttons.nth(i).locator(".alt-text").text_content()),
              buttons.nth(i).locator(".alt-logprob").text_content(),
              buttons.nth(i).locator(".alt-prob").text_content()) for i in range(buttons.count())]
    top = sorted(lp.top_logprobs[k].items(), key=lambda kv: -kv[1])
    assert shown == [(text, f"{v:.4f}", f"{100 * math.exp(v):.2f}%") for text, v in top]
    assert f"logprob {lp.token_logprobs[k]:.4f}" in page.text_content("#inspector .chosen")

    # Click the most likely alternative that was not picked: a new request from just before
    # token k, with that alternative as the end of its prompt.
    alt = next(text for text, _ in top if text != lp.tokens[k])
    page.locator("#inspector .alt", has_text=json.dumps(alt, ensure_ascii=False)).first.click()
    page.wait_for_selector("#results[data-state='done']")
    before = (prompt + api.choices[0].text)[:lp.text_offset[k]]
    assert page.input_value("#prompt") == before + alt
    again = client.completions.create(model=MODEL, prompt=before + alt, max_tokens=8, temperature=0, logprobs=5)
    assert choice_texts(page) == [again.choices[0].text]


def test_escape_stops_the_stream_and_the_server_aborts_the_request(tab, base_url):
    page = tab.page
    load(page, base_url)
    compose(page, "Write a very long story about a lighthouse.", max_tokens=1500, temperature=1, seed=5,
            logit_bias=NO_EOS)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelectorAll('.result .tok').length >= 5")
    assert scrape(base_url)["vllm:num_requests_running"] == 1
    page.keyboard.press("Escape")
    page.wait_for_selector("#results[data-state='stopped']")
    assert "Stopped" in page.text_content("#status")
    assert wait_for(lambda: scrape(base_url)["vllm:num_requests_running"] == 0, timeout=60)
    shown = page.locator(".result .tok").count()
    assert 5 <= shown < 1500
    assert page.is_disabled("#stop-button")
    assert tab.console.errors == []  # a stop is not an error

    # A run started while another streams replaces it: the old request is aborted, and its
    # ending does not mark the new run stopped.
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelectorAll('.result .tok').length >= 3")
    page.fill("#max_tokens", "3")
    assert run(page) == "done"
    assert page.text_content("#status").startswith("Done") and page.locator(".result .tok").count() == 3
    assert wait_for(lambda: scrape(base_url)["vllm:num_requests_running"] == 0, timeout=60)


def test_score_mode_shows_the_echo_requests_total_logprob(tab, base_url, client):
    page = tab.page
    load(page, base_url)
    text = "The quick brown fox jumps over the lazy dog. Colorless green ideas sleep furiously."
    compose(page, "", max_tokens=4, temperature=0)  # for the continuation below
    page.click("#tab-score")
    page.fill("#score-text", text)
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#score-result[data-state='done']")
    api = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=5, max_tokens=0)
    scored = [v for v in api.choices[0].logprobs.token_logprobs if v is not None]
    total = sum(scored)
    assert page.text_content("#score-total") == f"{total:.4f}"
    assert page.text_content("#score-ppl") == f"{math.exp(-total / len(scored)):.3f}"
    assert page.text_content("#score-count") == str(len(scored))
    assert page.text_content("#score-result") == text

    # An alternative clicked in a scored text continues from there, in compose mode.
    lp = api.choices[0].logprobs
    k = next(i for i in range(1, len(lp.tokens)) if lp.tokens[i].strip() and len(lp.top_logprobs[i]) > 1)
    page.locator("#score-result .tok").nth(k).hover()
    alt = next(t for t, _ in sorted(lp.top_logprobs[k].items(), key=lambda kv: -kv[1]) if t != lp.tokens[k])
    page.locator("#inspector .alt", has_text=json.dumps(alt, ensure_ascii=False)).first.click()
    page.wait_for_selector("#results[data-state='done']")
    assert page.is_visible("#compose") and page.input_value("#prompt") == text[:lp.text_offset[k]] + alt
    again = client.completions.create(model=MODEL, prompt=text[:lp.text_offset[k]] + alt, max_tokens=4,
                                      temperature=0)
    assert choice_texts(page) == [again.choices[0].text]


def test_phone_width_dark_mode_and_keyboard(browser, base_url, screenshots):
    phone = open_tab(browser, viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True,
                     has_touch=True)
    page = phone.page
    try:
        load(page, base_url)
        compose(page, "The capital of France is", max_tokens=12, temperature=0)
        assert run(page) == "done"
        # Nothing wider than the screen; the text is light on dark.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(22, 22, 21)"
        page.screenshot(path=screenshots / "phone-dark.png", full_page=True)
        # Keyboard only: Tab from the last share button reaches the first token, arrows move
        # along the tokens, Enter goes into the alternatives.
        page.focus("#copy-link")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.dataset.index") == "0"
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.dataset.index") == "1"
        page.wait_for_selector("#inspector:not([hidden])")
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.classList.contains('alt')")
        page.keyboard.press("Escape")
        assert page.is_hidden("#inspector")
        assert page.evaluate("document.activeElement.dataset.index") == "1"
        assert phone.console.errors == []
    finally:
        page.context.close()
