"""Text helpers every part shares: cutting, repairing, showing safely.

One place for each rule, so the terminal, Discord and the prompts never disagree about how a text is cut
or which characters are safe to show.
"""

from __future__ import annotations

import re

__all__ = ["clip", "display_name", "terminal_safe", "valid_text"]

_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# C0 controls but tab and line feed, DEL, C1 controls (0x9b is CSI, 0x9d OSC on 8-bit terminals), and the
# bidirectional overrides and isolates that make shown text read differently from what it is.
_UNSAFE_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so it can be stored and printed as UTF-8.

    Lone surrogates are what Python makes of bytes that are not UTF-8 (a terminal in another encoding) and
    what a JSON ``\\ud800`` escape decodes to; SQLite and UTF-8 streams refuse them.
    """
    return _SURROGATE_RE.sub("\ufffd", text)


def terminal_safe(text: str) -> str:
    """``text`` as a terminal may print it: control characters shown as ``^[``-style escapes, not obeyed.

    Model output is untrusted: ESC sequences could retitle the window, clear the screen, move the cursor over
    what was printed, or write the clipboard (OSC 52); a carriage return could overwrite a line. Tabs and
    line feeds stay.
    """
    return _UNSAFE_RE.sub(_caret, valid_text(text))


def _caret(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    return f"<U+{code:04X}>"


def display_name(filename: str, limit: int = 80) -> str:
    """A user's file name as we show it: the last path part, printable characters only, at most ``limit``."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    shown = "".join(ch for ch in name if ch.isprintable() and not _UNSAFE_RE.match(ch))
    return shown[:limit] or "file"
