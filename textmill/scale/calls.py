"""What crosses from the ingress to an engine replica: one HTTP request, whole.

`prompt` is the routing key the request router reads (routing.py): the start of the first
prompt of a completion as text, "" for everything else. It never reaches the app.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

# Prefix routing looks at the start of a prompt only: blocks past this are rarely shared,
# and a bounded key keeps the router's work per request bounded.
ROUTING_CHARS = 8192
_COMPLETIONS = "/v1/completions"


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None
    scheme: str = "http"
    http_version: str = "1.1"
    prompt: str = ""  # the routing key

    def asgi_scope(self) -> dict:
        """The scope textmill's app sees, as uvicorn would build it."""
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": self.http_version, "method": self.method, "scheme": self.scheme,
            "path": self.path, "raw_path": self.raw_path, "root_path": "", "query_string": self.query_string,
            "headers": [list(h) for h in self.headers], "client": self.client, "server": None, "state": {},
        }


def routing_text(method: str, path: str, body: bytes) -> str:
    """The start of a completion's first prompt: a string as it is, token ids as text
    (prefixes of token lists are prefixes of their text). Anything unparsable: "" (the
    replica answers it with its own 400)."""
    if method != "POST" or path != _COMPLETIONS:
        return ""
    try:
        prompt = json.loads(body).get("prompt")
    except (ValueError, AttributeError):
        return ""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch goes to one replica: route by its first prompt
    if isinstance(prompt, str):
        return prompt[:ROUTING_CHARS]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt[:ROUTING_CHARS // 4]):
        return " ".join(map(str, prompt[:ROUTING_CHARS // 4]))[:ROUTING_CHARS]
    return ""
