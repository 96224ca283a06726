"""Helpers for the operations tests: the real app under textmill's own GracefulServer in a
thread (so a test can drain it), an optional runner wrapper, and metric scraping."""
from __future__ import annotations

import json
from collections.abc import Callable
import threading
import time

import httpx

from textmill.loader.bundled import BUNDLED_NAME

from .server import Running, serving  # noqa: F401 (Running is used by the tests' annotations)

MODEL = BUNDLED_NAME


# The operations tests drive the same server as every other integration test.
ops_server = serving


def scrape(base_url: str, headers: dict | None = None) -> dict[str, float]:
    """Prometheus samples by name (labels dropped: each of ours has one series per name)."""
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels.split("{", 1)[0]] = samples.get(name_labels.split("{", 1)[0], 0.0) + float(value)
    return samples


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Stream:
    """A streaming completion read in a thread; `started` is set at its first chunk."""

    def __init__(self, url: str, body: dict, request_id: str | None = None):
        self.started = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None
        headers = {"X-Request-Id": request_id} if request_id else {}
        self.thread = threading.Thread(target=self._run, args=(url, body, headers), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict, headers: dict) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers,
                          timeout=300) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.started.set()
        self.started.set()

    def result(self) -> tuple[str, list[dict]]:
        self.thread.join(timeout=300)
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")), chunks


NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens: generation runs to max_tokens
