"""Driving the playground page as a user does: fields typed, keys pressed, text read back."""
from __future__ import annotations

import json

from playwright.sync_api import Page

from textmill.loader.bundled import BUNDLED_NAME

MODEL = BUNDLED_NAME
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens: generation runs to max_tokens
# Form fields whose defaults the page fills in; a test sets them all, so nothing else is sent.
DEFAULTS = {"max_tokens": 64, "temperature": 1, "top_p": 1, "n": 1, "best_of": "", "seed": "",
            "presence_penalty": 0, "frequency_penalty": 0, "logprobs": 5, "stop": "", "logit_bias": ""}


def load(page: Page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def compose(page: Page, prompt: str, **fields) -> None:
    """Fill the compose form: `fields` over the page's defaults (a dict value is typed as JSON)."""
    page.fill("#prompt", prompt)
    for name, value in {**DEFAULTS, **fields}.items():
        if name == "echo":
            page.set_checked("#echo", bool(value))
            continue
        text = json.dumps(value) if isinstance(value, dict) else str(value)
        page.fill(f"#{name}", text)


def run(page: Page) -> str:
    """Ctrl+Enter, then wait for the run to end; returns how it ended (done, stopped, error)."""
    page.eval_on_selector("#results", "el => el.removeAttribute('data-state')")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#results:not([data-state='running'])[data-state]", state="attached")
    return page.get_attribute("#results", "data-state")


def choice_texts(page: Page) -> list[str]:
    cards = page.locator(".result .text")
    return [cards.nth(i).text_content() for i in range(cards.count())]


def error_text(page: Page) -> str:
    page.wait_for_selector("#error:not([hidden])")
    return page.text_content("#error")
