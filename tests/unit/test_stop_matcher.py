"""Stop strings over streamed text: earliest match, exact hold-back, never past a stop."""
from __future__ import annotations

import pytest

from textmill.engine.stop_matcher import StopMatch, find_stop, holdback, safe_end


def stream(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, list[str], StopMatch | None]:
    """Feed pieces as a streamer would; return (released text, per-step deltas, match)."""
    text, released, deltas = "", 0, []
    for piece in pieces:
        new_start = len(text)
        text += piece
        match = find_stop(text, stops, new_start)
        if match is not None:
            assert match.start >= released, "a released character belonged to a stop"
            deltas.append(text[released : match.start])
            return text[: match.start], deltas, match
        end = safe_end(text, stops, released)
        assert end >= released
        deltas.append(text[released:end])
        released = end
    deltas.append(text[released:])
    return text, deltas, None


def test_stop_straddling_token_boundaries():
    text, deltas, match = stream(["Hello wo", "rld! ", "STO", "P now"], ("STOP",))
    assert match == StopMatch(len("Hello world! "), "STOP")
    assert text == "Hello world! "
    # "STO" could begin the stop, so it was held back and never released.
    assert deltas == ["Hello wo", "rld! ", "", ""]


def test_earliest_stop_wins_among_several():
    text = "one two three"
    assert find_stop(text, ("three", "two", "one two three")) == StopMatch(0, "one two three")
    assert find_stop(text, ("three", "two")) == StopMatch(4, "two")
    # Same start: the first listed is reported; the cut is the same either way.
    assert find_stop("abc", ("ab", "a")) == StopMatch(0, "ab")
    assert find_stop(text, ("four",)) is None


def test_search_only_where_a_new_match_can_end():
    text = "xSTOPy"
    # Text before new_start was already searched: a stop ending there is not new.
    assert find_stop(text, ("STOP",), new_start=5) is None
    assert find_stop(text, ("STOP",), new_start=4) == StopMatch(1, "STOP")
    assert find_stop(text, ("STOP",), new_start=1) == StopMatch(1, "STOP")


def test_holdback_is_the_longest_suffix_that_prefixes_a_stop():
    assert holdback("abc", ("xyz",)) == 0
    assert holdback("ab\n", ("\n\nUser:",)) == 1
    assert holdback("ab\n\nUs", ("\n\nUser:",)) == 4
    # Two candidates: "a" prefixes "ab", "aba" prefixes "abac": the longer one is kept.
    assert holdback("xaba", ("ab", "abac")) == 3
    # A whole stop is not a *proper* prefix; find_stop reports it instead.
    assert holdback("xab", ("ab",)) == 0
    # Never reach into released text.
    assert holdback("abab", ("abab_",)) == 4
    assert holdback("abab", ("abab_",), released=2) == 2
    assert holdback("", ("a",)) == 0


def test_holdback_is_not_blanket_max_len():
    # vLLM would hold back len(stop) - 1 = 6 characters here; nothing can start a stop.
    assert safe_end("The answer is 42.", ("\n\nUser:",)) == len("The answer is 42.")


def test_multibyte_characters_around_stops():
    text, deltas, match = stream(["caf", "é👋", "é", "!"], ("👋é",))
    assert text == "café"
    assert match == StopMatch(4, "👋é")
    assert deltas == ["caf", "é", ""]

    text, deltas, match = stream(["日本", "語の", "文"], ("語の文",))
    assert text == "日本" and deltas == ["日本", "", ""]


def test_stop_at_the_very_start():
    text, deltas, match = stream(["<", "/s>rest"], ("</s>",))
    assert match == StopMatch(0, "</s>") and text == "" and deltas == ["", ""]


def test_held_text_that_does_not_become_a_stop_is_released():
    text, deltas, match = stream(["a\n", "\nb", "c"], ("\n\n\n",))
    assert match is None
    assert deltas == ["a", "\n\nb", "c", ""]


@pytest.mark.parametrize("split", range(1, 12))
def test_any_split_gives_the_same_cut(split: int):
    full = "say hi STOP and more"
    pieces = [full[:split], full[split:]]
    text, deltas, match = stream(pieces, ("STOP", "ST0P"))
    assert text == "say hi " and "".join(deltas) == "say hi "
