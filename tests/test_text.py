"""The shared text helpers: cutting, showing safely, file names."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from agent.text import clip, display_name, terminal_safe, valid_text


@given(st.text(), st.integers(1, 50))
def test_clip_never_exceeds_its_limit_and_marks_a_cut(text: str, limit: int) -> None:
    out = clip(text, limit)
    assert len(out) <= limit
    assert out == text or out.endswith("…")


@given(st.text())
def test_nothing_a_terminal_obeys_survives(text: str) -> None:
    shown = terminal_safe(text)
    for ch in shown:
        assert ch in "\n\t" or not (unicodedata.category(ch) == "Cc" or ch in "\u202a\u202b\u202c\u202d\u202e")
        assert not ("\u2066" <= ch <= "\u2069") and not ("\ud800" <= ch <= "\udfff")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=200))
def test_ordinary_text_is_shown_as_it_is(text: str) -> None:
    if not any(c in text for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"):
        assert terminal_safe(text) == text


def test_escapes_are_spelled_out() -> None:
    assert terminal_safe("a\x1b[2Jb\x07c\r\nd\tok") == "a^[[2Jb^Gc^M\nd\tok"
    assert terminal_safe("\x9b\u202e") == "<U+009B><U+202E>"
    assert valid_text("a\ud800b") == "a\ufffdb"


@given(st.text())
def test_display_names_are_short_single_printable_names(name: str) -> None:
    shown = display_name(name)
    assert 1 <= len(shown) <= 80 and "/" not in shown and "\\" not in shown
    assert all(ch.isprintable() for ch in shown)
