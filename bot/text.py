"""Text for Discord: answers split into 2,000-character messages, links shown for what they are, thread
names, request text from a message.

Pure functions, so the rules are tested directly (``tests/test_bot_text.py`` uses hypothesis).
"""

from __future__ import annotations

import re

__all__ = [
    "MESSAGE_LIMIT",
    "THREAD_NAME_LIMIT",
    "human_size",
    "request_text",
    "split_message",
    "thread_name",
    "unmask_links",
]

MESSAGE_LIMIT = 2000
THREAD_NAME_LIMIT = 100

# A fence line as we track it: up to 3 spaces, 3–16 backticks or tildes, a short info string (the language).
# Longer lines are left alone, so the room a split reserves for closing and reopening a block stays bounded.
_FENCE = re.compile(r"^ {0,3}(`{3,16}|~{3,16})([^`\n]{0,40})$")
_FENCE_OVERHEAD = 2 * (3 + 16 + 40 + 1)


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` characters, at line ends where possible.

    A code block cut by a split is closed at the end of one message and reopened (same language) at the start
    of the next, so both render as code. Lines longer than a message are cut, at a space when there is one.
    Blank messages are dropped: Discord refuses them.
    """
    if limit <= _FENCE_OVERHEAD * 2:
        raise ValueError(f"limit must be more than {_FENCE_OVERHEAD * 2}")
    chunks: list[str] = []
    lines: list[str] = []
    size = 0  # len("\n".join(lines))
    fence: str | None = None  # the opening line of the code block still open at the end of ``lines``

    for line in text.split("\n"):
        for piece in _cut(line, limit - _FENCE_OVERHEAD):
            after = _toggle(fence, piece)
            reserve = len(_closer(after)) + 1 if after else 0
            if lines and size + 1 + len(piece) + reserve > limit:
                if fence:
                    lines.append(_closer(fence))
                chunks.append("\n".join(lines))
                lines = [fence] if fence else []
                size = len(fence) if fence else 0
            size += len(piece) + (1 if lines else 0)
            lines.append(piece)
            fence = after
    chunks.append("\n".join(lines))
    return [c for c in chunks if c.strip()]


def _toggle(fence: str | None, line: str) -> str | None:
    """The open block after ``line``: a fence line opens one, or closes the open one if it matches."""
    match = _FENCE.match(line)
    if match is None:
        return fence
    if fence is None:
        return line.strip()
    opener = _FENCE.match(fence)
    assert opener is not None
    marker = match.group(1)
    closes = not match.group(2).strip() and marker[0] == opener.group(1)[0] and len(marker) >= len(opener.group(1))
    return None if closes else fence


def _closer(fence: str) -> str:
    match = _FENCE.match(fence)
    assert match is not None
    return match.group(1)


def _cut(line: str, width: int) -> list[str]:
    """``line`` in pieces of at most ``width`` characters, cut after a space when one is in the second half."""
    pieces: list[str] = []
    while len(line) > width:
        space = line.rfind(" ", width // 2, width)
        end = space + 1 if space != -1 else width
        pieces.append(line[:end])
        line = line[end:]
    pieces.append(line)
    return pieces


# A masked link as Discord renders it: [label](target), the target optionally in <> and with a "title".
_MASKED_LINK = re.compile(r"\[([^\[\]\n]{1,256})\]\(\s*<?([a-zA-Z][a-zA-Z0-9+.-]{1,20}:[^\s()<>]{1,2000})>?(?:\s+\"[^\"\n]{0,256}\")?\s*\)")


def unmask_links(text: str) -> str:
    """Every masked link ``[label](target)`` shown as ``label (<target>)``: the reader sees where it goes.

    Model output is untrusted: "[discord.com/gifts/free-nitro](https://evil.example)" would otherwise read as a
    Discord link. The angle brackets also keep Discord from previewing the target.
    """
    return _MASKED_LINK.sub(lambda m: f"{m.group(1)} (<{m.group(2)}>)", text)


def thread_name(text: str) -> str:
    """A thread name from a request: its first non-empty line, whitespace collapsed, at most 100 characters."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    name = " ".join(first.split())
    if not name:
        return "HuggingGPT request"
    if len(name) > THREAD_NAME_LIMIT:
        name = name[: THREAD_NAME_LIMIT - 1].rstrip() + "…"
    return name


def request_text(content: str, bot_id: int) -> str:
    """The request in a message: its text without the mentions of the bot."""
    return re.sub(rf"<@!?{bot_id}>", "", content).strip()


def human_size(n: int) -> str:
    """A byte count as people read it: bytes, KiB under a MiB, else MiB with one decimal."""
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"
