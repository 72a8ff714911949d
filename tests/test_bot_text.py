"""Splitting answers into Discord messages, thread names, request text: pure functions, property-tested."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.text import MESSAGE_LIMIT, request_text, split_message, thread_name

_FENCE_LINE = re.compile(r"^ {0,3}(`{3,16}|~{3,16})([^`\n]{0,40})$")

words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=80)
lines = st.one_of(
    words,
    st.sampled_from(["```", "```python", "~~~", "````", "", "   ", "# heading", "- item"]),
    st.integers(1500, 5000).map(lambda n: ("ab " * n)[:n]),  # longer than a message
)
documents = st.lists(lines, max_size=120).map("\n".join)


def content(lines: Iterable[str]) -> str:
    """The characters of ``lines`` other than fence lines and whitespace."""
    return "".join("".join(line.split()) for line in lines if not _FENCE_LINE.match(line))


def balanced(text: str) -> bool:
    """Whether every code block of ``text`` is closed, by the rules ``split_message`` follows."""
    open_marker: str | None = None
    for line in text.split("\n"):
        match = _FENCE_LINE.match(line)
        if match is None:
            continue
        marker, info = match.group(1), match.group(2).strip()
        if open_marker is None:
            open_marker = marker
        elif not info and marker[0] == open_marker[0] and len(marker) >= len(open_marker):
            open_marker = None
    return open_marker is None


@settings(max_examples=150, deadline=None)
@given(documents, st.sampled_from([MESSAGE_LIMIT, 500]))
def test_every_chunk_fits_and_nothing_is_lost(text: str, limit: int) -> None:
    chunks = split_message(text, limit)
    assert all(0 < len(c) <= limit for c in chunks)
    assert all(c.strip() for c in chunks)
    # Only fence lines are added (closing and reopening blocks): every other character survives, in order.
    assert content(text.split("\n")) == content(line for c in chunks for line in c.split("\n"))


prose = st.one_of(st.text(alphabet="abc xyz.", max_size=80), st.integers(1500, 3000).map(lambda n: ("ab " * n)[:n]))
code_block = st.tuples(
    st.sampled_from([("```", "```"), ("```python", "```"), ("~~~", "~~~"), ("````md", "````")]),
    st.lists(st.one_of(prose, st.just("```inner")), max_size=60),
).map(lambda block: [block[0][0], *block[1], block[0][1]])
balanced_documents = st.lists(st.one_of(st.lists(prose, max_size=20), code_block), max_size=8).map(
    lambda blocks: "\n".join(line for block in blocks for line in block)
)


@settings(max_examples=150, deadline=None)
@given(balanced_documents, st.sampled_from([MESSAGE_LIMIT, 500]))
def test_code_blocks_stay_balanced_in_every_message(text: str, limit: int) -> None:
    assert balanced(text)
    assert all(balanced(c) for c in split_message(text, limit))


def test_short_text_is_one_message_unchanged() -> None:
    assert split_message("hello\nworld") == ["hello\nworld"]
    assert split_message("") == []
    assert split_message("\n \n") == []


def test_splits_at_line_ends_and_reopens_code_in_the_same_language() -> None:
    code = "\n".join(f"x = {n}" for n in range(400))
    chunks = split_message(f"Intro\n```python\n{code}\n```\nOutro")
    assert len(chunks) > 1
    assert chunks[0].startswith("Intro\n```python") and chunks[0].endswith("\n```")
    for chunk in chunks[1:]:
        assert chunk.startswith("```python\n")
    assert chunks[-1].endswith("```\nOutro")
    body = [line for c in chunks for line in c.split("\n") if line.startswith("x = ")]
    assert body == code.split("\n")


def test_a_line_longer_than_a_message_is_cut_at_spaces() -> None:
    text = " ".join(["word"] * 1000)
    chunks = split_message(text)
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert all(not c.startswith(" ") and c.replace(" ", "").replace("word", "") == "" for c in chunks)


def test_limit_must_leave_room_for_fences() -> None:
    with pytest.raises(ValueError):
        split_message("x", 100)


def test_thread_name_is_the_first_line_within_100_characters() -> None:
    assert thread_name("  describe\tthis   image \nplease") == "describe this image"
    assert thread_name("\n\n") == "HuggingGPT request"
    long = thread_name("a" * 300)
    assert len(long) == 100 and long.endswith("…")


@given(st.text())
def test_thread_name_is_never_empty_or_too_long(text: str) -> None:
    name = thread_name(text)
    assert 0 < len(name) <= 100 and name.strip()


def test_request_text_drops_the_bots_mentions_only() -> None:
    assert request_text("<@42> draw a cat <@!42> for <@7>", 42) == "draw a cat  for <@7>"
