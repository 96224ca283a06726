"""One access-log line per request, and the JSON log format.

The middleware opens a RequestTrace when a request arrives and writes the line when the
response has ended (for a stream: after [DONE]); the route fills in what only it knows
(token counts, time to first token).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field

access_log = logging.getLogger("textmill.access")

# Echoed in a header and written into logs and ids: keep it to a safe alphabet and length.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
QUIET_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapes log at debug level


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id when it is sane, else a fresh one."""
    if header and _CLIENT_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


@dataclass
class RequestTrace:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    body_bytes: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    duration_s: float | None = None
    admitted: int = 0  # candidate sequences reserved in Admission, released at the end
    user: str | None = None

    def set_usage(self, usage: dict) -> None:
        self.prompt_tokens = usage["prompt_tokens"]
        self.completion_tokens = usage["completion_tokens"]
        self.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")

    def first_token(self, now: float) -> float | None:
        """Record the first token's time once; returns the TTFT when this was it."""
        if self.ttft_s is not None:
            return None
        self.ttft_s = now - self.started
        return self.ttft_s


def log_access(trace: RequestTrace) -> None:
    fields = {k: v for k, v in asdict(trace).items() if k not in ("started", "admitted", "body_bytes")}
    level = logging.DEBUG if trace.path in QUIET_PATHS else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    text = (f"{trace.request_id} {trace.method} {trace.path} {trace.status} "
            f"prompt_tokens={_num(trace.prompt_tokens)} completion_tokens={_num(trace.completion_tokens)} "
            f"ttft_ms={_ms(trace.ttft_s)} total_ms={_ms(trace.duration_s)}")
    access_log.log(level, text, extra={"access": fields})


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access records carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for `textmill serve`; uvicorn's loggers propagate into it."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
