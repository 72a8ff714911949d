"""JSON schemas of a plan reply: a portable one for any server, and an exact one a grammar can enforce.

``plan_schema`` describes a plan's shape in the keywords every schema-taking server knows (OpenAI's structured
outputs among them). ``exact_plan_schema`` is made per request for backends that compile a schema into a
grammar (the embedded LLM, a llama.cpp server) and spells out most of the rules ``Plan.from_raw`` checks, so
even a tiny model writes plans that run. Both take the task types that can run here: a plan can name no
other.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import cache
from typing import Any

from .grammar import GRAMMAR_MAX_REPEAT
from .plan import MAX_TEXT_ARG_CHARS
from .resources import Resource
from .tasks import MEDIA_KINDS, TASKS, Arg

__all__ = ["exact_plan_schema", "plan_schema"]

_NAME_MAX_CHARS = 100

# What str.strip() removes beyond ASCII, so that a text that starts with none of it is not blank.
_UNICODE_SPACES = r"\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def plan_schema(max_tasks: int, task_types: Collection[str] | None = None) -> dict[str, Any]:
    """JSON schema of a plan reply: the plan's shape, in the keywords every schema-taking server knows.
    ``task_types`` are the ones a plan may use (default: all); the others may be named as ``missing``."""
    names = _names(task_types)
    arg_keys = sorted({a.key: a.modality for name in names for a in TASKS[name].args}.items())
    args = {
        key: {"type": "string", "maxLength": _NAME_MAX_CHARS if modality in MEDIA_KINDS else MAX_TEXT_ARG_CHARS}
        for key, modality in arg_keys
    }
    task = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "task": {"type": "string", "enum": list(names)},
            "dep": {"type": "array", "items": {"type": "integer"}, "maxItems": max_tasks},
            "args": {"type": "object", "properties": args, "additionalProperties": False},
        },
        "required": ["id", "task", "dep", "args"],
        "additionalProperties": False,
    }
    return _reply({"type": "array", "items": task, "maxItems": max_tasks}, task_types)


def exact_plan_schema(
    max_tasks: int,
    resources: Sequence[Resource] = (),
    text_max_chars: int = GRAMMAR_MAX_REPEAT,
    task_types: Collection[str] | None = None,
) -> dict[str, Any]:
    """JSON schema of a plan reply for this request, for backends that turn a schema into a grammar.

    It spells out the rules a grammar can enforce, so that even a small model cannot break them: task ``i``
    of the list has id ``i`` and depends only on earlier tasks (no self-dependency, no cycle, no missing
    task); its task type is one that can run here and its ``args`` are exactly that type's arguments; an
    image, audio or video argument is one of ``resources`` of that kind or the ``<GENERATED>-N`` of an
    earlier task, and text names only earlier tasks too. Whether task N makes the kind its placeholder needs
    is left to ``Plan.from_raw``: a schema cannot see which task type an earlier item chose. Task types that
    take the same arguments share one branch and the repeated parts are ``$defs``, to keep the grammar
    small. A text argument is at most ``text_max_chars`` long: the planner passes about the length of the
    request, since a small model otherwise rambles on inside a string until the bound (and each character
    costs a token's time).
    """
    groups = _arg_groups(_names(task_types))
    names = {kind: [r.name for r in resources if r.kind == kind] for kind in MEDIA_KINDS}
    defs: dict[str, Any] = {"dep-0": {"const": []}}
    for group, task_names in groups:
        defs[f"{_group_name(group)}-tasks"] = {"enum": list(task_names)}
    for i in range(max_tasks):
        earlier = [f"<GENERATED>-{n}" for n in range(i)]
        defs[f"text-{i}"] = {"type": "string", "pattern": _text_pattern(i, text_max_chars)}
        if i:
            defs[f"dep-{i}"] = {
                "type": "array",
                "items": {"enum": list(range(i))},
                "uniqueItems": True,
                "maxItems": i,
            }
        for kind in MEDIA_KINDS:
            if names[kind] or earlier:
                defs[f"{kind}-{i}"] = {"enum": names[kind] + earlier}
        branches = [b for b in (_task_branch(i, group, defs) for group, _ in groups) if b is not None]
        if not branches:
            break  # no task can come first (only image tasks, say, and no image): only the empty plan
        defs[f"task-{i}"] = {"anyOf": branches}
    lists: list[dict[str, Any]] = [{"const": []}]
    for n in range(1, max_tasks + 1):
        if f"task-{n - 1}" not in defs:
            break
        items = [{"$ref": f"#/$defs/task-{i}"} for i in range(n)]
        lists.append({"type": "array", "prefixItems": items, "items": False, "minItems": n})
    return {**_reply({"anyOf": lists}, task_types), "$defs": defs}


def _reply(tasks: dict[str, Any], task_types: Collection[str] | None) -> dict[str, Any]:
    """The reply object: the tasks and, where some task types cannot run here, which of them the request
    would need (``missing``)."""
    properties: dict[str, Any] = {"tasks": tasks}
    missing = [name for name in TASKS if task_types is not None and name not in task_types]
    if missing:
        properties["missing"] = {"type": "array", "items": {"enum": missing}, "uniqueItems": True, "maxItems": 3}
    return {"type": "object", "properties": properties, "required": ["tasks"], "additionalProperties": False}


def _names(task_types: Collection[str] | None) -> tuple[str, ...]:
    """The plannable task type names, in the registry's order."""
    return tuple(name for name in TASKS if task_types is None or name in task_types)


@cache
def _arg_groups(names: tuple[str, ...]) -> tuple[tuple[tuple[Arg, ...], tuple[str, ...]], ...]:
    """Task types grouped by their arguments (keys, modalities, order): one schema branch per group."""
    groups: dict[tuple[Arg, ...], list[str]] = {}
    for name in names:
        groups.setdefault(TASKS[name].args, []).append(name)
    return tuple((args, tuple(group)) for args, group in groups.items())


def _group_name(args: tuple[Arg, ...]) -> str:
    return "_".join(a.key if a.required else f"{a.key}-optional" for a in args)


def _text_pattern(i: int, max_chars: int) -> str:
    """Text that is not blank and names only earlier tasks' outputs: ``<G`` only in ``<GENERATED>-N`` with
    N < ``i``, and no digit right after one (``<GENERATED>-1`` then ``2`` would read as task 12).

    llama.cpp applies a pattern to the raw JSON text and a schema validator to the decoded string, so it
    allows no bare ``"``, backslash or control character; escapes are spelled out. Raw text then stays a
    valid JSON string, and a decoded one has no quote or line break (the price for servers that enforce it).
    """
    ref = f"<GENERATED>-({'|'.join(map(str, range(i)))})" if i else ""
    plain = r'[^<"\\\x00-\x1f]|<[^G<"\\\x00-\x1f]'
    char = rf'{plain}|\\["\\/bfnrt]'
    first = rf'[^<"\\\x00-\x20{_UNICODE_SPACES}]|<[^G<"\\\x00-\x1f]'  # not blank
    if ref:
        after_ref = rf'{ref}[^0-9<"\\\x00-\x1f]'
        char, first = f"{char}|{after_ref}", f"{first}|{after_ref}"
    text = f"({first})({char}){{0,{max_chars - 1}}}"
    return f"^({text}({ref})?|{ref})$" if ref else f"^{text}$"


def _task_branch(i: int, group: tuple[Arg, ...], defs: dict[str, Any]) -> dict[str, Any] | None:
    """Task ``i`` as a task type taking ``group``; None if a media argument it needs can have no value."""
    name = _group_name(group)
    values = {a.key: f"{a.modality}-{i}" for a in group}
    if any(a.required and values[a.key] not in defs for a in group):
        return None
    defs[f"{name}-args-{i}"] = {
        "type": "object",
        "properties": {key: {"$ref": f"#/$defs/{value}"} for key, value in values.items() if value in defs},
        "required": [a.key for a in group if a.required],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "id": {"const": i},
            "task": {"$ref": f"#/$defs/{name}-tasks"},
            "dep": {"$ref": f"#/$defs/dep-{i}"},
            "args": {"$ref": f"#/$defs/{name}-args-{i}"},
        },
        "required": ["id", "task", "dep", "args"],
        "additionalProperties": False,
    }
