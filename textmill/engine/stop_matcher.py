"""Stop strings over streamed text: where a stop begins, and how much text to hold back.

Pure functions on `str`. The incremental decoder never hands us half a UTF-8 character,
so character offsets here are code-point offsets into the generated text, and a stop
string made of multi-byte characters is matched like any other.

Two questions are asked after each step, about `text` = all generated text so far:

1. `find_stop`: did a stop string appear? Only a match that ends inside the new text can
   be new (earlier text was already searched), so the search starts at
   `new_start - len(stop) + 1`; this also finds stops that straddle token boundaries.
2. `holdback`: how much of the unreleased tail could still become a stop?

Why not vLLM's blanket `max(len(stop)) - 1` characters: that delays every stream by that
many characters even when the tail cannot begin a stop (a stop of "\n\nUser:" would keep
the last 6 characters of every chunk away from the client, and the very last ones until
the next token arrives). The exact rule holds back only the longest suffix that is a
proper prefix of some stop string, usually nothing. It is just as safe: a stop completed
later must begin at some position p with text[p:] a prefix of it *now*; every such p lies
inside the held-back suffix, so no released character can ever belong to a later stop.
Release is monotone too: if text[p:] is not a prefix of any stop, no extension of it is.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    start: int  # character offset in the text where the stop string begins
    stop: str


def find_stop(text: str, stops: tuple[str, ...], new_start: int = 0) -> StopMatch | None:
    """The earliest stop occurrence that ends after `new_start` (the start of new text).

    When two stops begin at the same offset the one listed first wins; the cut is the same.
    """
    best: StopMatch | None = None
    for stop in stops:
        index = text.find(stop, max(0, new_start - len(stop) + 1))
        if index >= 0 and (best is None or index < best.start):
            best = StopMatch(index, stop)
    return best


def holdback(text: str, stops: tuple[str, ...], released: int = 0) -> int:
    """Characters at the end of `text` to keep back: the longest suffix of text[released:]
    that is a proper prefix of some stop string (0 when no stop could start there)."""
    tail_len = len(text) - released
    longest = 0
    for stop in stops:
        # Only proper prefixes: a whole stop would have been found by find_stop.
        for k in range(min(len(stop) - 1, tail_len), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def safe_end(text: str, stops: tuple[str, ...], released: int = 0) -> int:
    """The offset up to which `text` may be released now (assuming no stop was found)."""
    return len(text) - holdback(text, stops, released)
