"""JSON schemas that llama.cpp can compile into a grammar, whether it runs in-process (the embedded LLM) or
behind an OpenAI-compatible server (``response_format`` of type ``json_object`` with a ``schema``).

llama.cpp's grammar parser refuses a bounded repetition much longer than about a thousand (measured with
llama-cpp-python 0.3.36: a plan schema whose text pattern repeats ``{0,1000}`` compiles, ``{0,1023}`` does not),
and llama-cpp-python does not check: the process dies with a segmentation fault at the first sampled token.
Its server died that way on a 1,170-character request. A ``maxLength`` becomes such a repetition too.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["GRAMMAR_MAX_REPEAT", "grammar_safe"]

# Longest string, and longest bounded repetition in a pattern, a grammar may hold.
GRAMMAR_MAX_REPEAT = 1000
_REPETITION_RE = re.compile(r"(?<!\\)\{(\d+)(?:,(\d+))?\}")


def grammar_safe(schema: Any) -> Any:
    """``schema`` (not changed) with every free string at most ``GRAMMAR_MAX_REPEAT`` characters and every
    bounded repetition in a pattern at most that many times; unbounded strings get the bound too, since a
    small model loops inside an unbounded string."""
    if isinstance(schema, list):
        return [grammar_safe(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: grammar_safe(v) for k, v in schema.items()}
    if out.get("type") == "string" and isinstance(out.get("pattern"), str):
        out["pattern"] = _REPETITION_RE.sub(_capped_repetition, out["pattern"])
    elif out.get("type") == "string" and not ({"enum", "const"} & out.keys()):
        out["maxLength"] = min(int(out.get("maxLength", GRAMMAR_MAX_REPEAT)), GRAMMAR_MAX_REPEAT)
        if "minLength" in out:
            out["minLength"] = min(int(out["minLength"]), out["maxLength"])
    return out


def _capped_repetition(match: re.Match[str]) -> str:
    bounds = [str(min(int(n), GRAMMAR_MAX_REPEAT)) for n in match.groups() if n is not None]
    return "{" + ",".join(bounds) + "}"
