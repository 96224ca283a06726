"""What a constrained request asks for, and the door through which the API has it compiled.

Torch-free and backend-free: the API layer (prepare.py) and SamplingParams use these types;
the grammar engine behind them lives in textmill/grammar/ (llguidance), reached through the
GrammarCompiler protocol, so neither `api/` nor `engine/` imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# json: a JSON schema as JSON text ({"type": "object"} for json_object); regex: a regular
# expression the whole output matches; choice: a JSON list of the strings allowed; grammar:
# GBNF (llama.cpp) or Lark text.
KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a request's generated text. Equal constraints compile once: the
    pair is the compile cache's key, so `spec` keeps the client's text (JSON key order is
    the order the schema's properties are generated in)."""

    kind: str
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")


class GrammarError(ValueError):
    """The backend cannot compile a constraint: the message is its reason, for the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class GrammarStats:
    """Totals since the server started, for /metrics."""

    requests: int  # constraints compiled or found in the cache for a request (one per request)
    compiles: int  # grammars compiled (cache misses)
    cache_hits: int
    compile_seconds: float  # time spent compiling, all compiles together
    failures: int  # constraints the backend refused


class GrammarCompiler(Protocol):
    def compile(self, structured: StructuredOutput) -> None:
        """Compile `structured` (or find it in the cache); raise GrammarError if the backend
        cannot. Thread-safe, and may take a while: call it off the event loop and off the
        engine thread."""
        ...

    def stats(self) -> GrammarStats: ...

    def start(self) -> None:
        """Begin the backend's one-time set-up (its view of the vocabulary) in the background.
        The server calls it once it is ready: before, it would compete with loading."""
        ...
