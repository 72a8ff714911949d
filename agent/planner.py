"""Stage 1, task planning: the LLM turns a request into a typed ``Plan`` of tasks with dependencies.

The prompt is the paper's: a specification of the output format and of the task types, demonstrations
(request → plan), then the chat log, the conversation's files and the request. A backend that compiles a
schema into a grammar gets the request's own schema (``exact_plan_schema``), which already holds most rules,
so even a tiny model writes plans that run; other servers get the plain ``plan_schema``. The reply is parsed
leniently (JSON repair, code fences, prose around it, a bare list or ``{"tasks": [...]}``) but validated
strictly, so the executor only ever sees plans it can run. A rejected plan is sent back once with the reason.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Protocol

from .errors import PlanningError, PlanParseError, PlanValidationError
from .events import LLMUsage
from .grammar import GRAMMAR_MAX_REPEAT
from .llm import LLM, estimate_message_tokens, estimate_tokens
from .plan import GENERATED_RE, Plan, PlannedTask
from .prompts import clip, load_prompt, prompt_template
from .replies import parse_json_reply
from .request import ChatTurn, Request
from .resources import Origin, Resource
from .settings import Settings
from .tasks import MEDIA_KINDS, TASKS, Arg, Modality, TaskType

__all__ = [
    "DEMO_COUNT",
    "DemoSelector",
    "Demonstration",
    "FixedDemos",
    "Planner",
    "exact_plan_schema",
    "load_demonstrations",
    "parse_plan_text",
    "plan_messages",
    "plan_schema",
    "validate_plan",
]

log = logging.getLogger(__name__)

DEMO_COUNT = 8
_TEXT_MAX_CHARS = 4000  # longest text argument the portable schema allows
_NAME_MAX_CHARS = 100
_TEXT_SLACK_CHARS = 100  # what a text argument may add to the words it quotes
_TURN_MAX_CHARS = 1500
_FILES_SHOWN = 30
_RETRY_ECHO_CHARS = 4000


@dataclass(frozen=True)
class Demonstration:
    """One worked example for the prompt: a request (with its history and files) and its plan."""

    request: Request
    plan: tuple[dict[str, Any], ...]


class DemoSelector(Protocol):
    """Chooses the demonstrations shown for a request (fixed, or retrieved by similarity)."""

    async def select(self, text: str, k: int) -> list[Demonstration]: ...


class FixedDemos:
    """The first ``k`` demonstrations of the bank, whose head is ordered to cover the main plan shapes."""

    def __init__(self, bank: Sequence[Demonstration]) -> None:
        self.bank = list(bank)

    async def select(self, text: str, k: int) -> list[Demonstration]:
        return self.bank[:k]


@cache
def load_demonstrations() -> tuple[Demonstration, ...]:
    """The bundled demonstration bank (``agent/prompts/demonstrations.json``)."""
    raw = json.loads(load_prompt("demonstrations.json"))
    demos = []
    for item in raw:
        files = tuple(
            Resource(
                name=r["name"],
                kind=r["kind"],
                mime="",
                sha256="",
                size=0,
                origin=Origin(r.get("origin", "upload")),
            )
            for r in item["resources"]
        )
        request = Request(
            text=item["request"],
            history=tuple(ChatTurn(t["role"], t["text"]) for t in item.get("history", ())),
            resources=files,
            attachments=tuple(r["name"] for r in item["resources"] if r["attached"]),
        )
        demos.append(Demonstration(request=request, plan=tuple(item["plan"])))
    return tuple(demos)


def plan_schema(max_tasks: int) -> dict[str, Any]:
    """JSON schema of a plan reply: the plan's shape, in the keywords every schema-taking server knows
    (OpenAI's structured outputs among them). ``exact_plan_schema`` says much more, for grammar backends."""
    arg_keys = sorted({a.key: a.modality for t in TASKS.values() for a in t.args}.items())
    args = {
        key: {"type": "string", "maxLength": _NAME_MAX_CHARS if modality in MEDIA_KINDS else _TEXT_MAX_CHARS}
        for key, modality in arg_keys
    }
    task = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "task": {"type": "string", "enum": sorted(TASKS)},
            "dep": {"type": "array", "items": {"type": "integer"}, "maxItems": max_tasks},
            "args": {"type": "object", "properties": args, "additionalProperties": False},
        },
        "required": ["id", "task", "dep", "args"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"tasks": {"type": "array", "items": task, "maxItems": max_tasks}},
        "required": ["tasks"],
        "additionalProperties": False,
    }


def exact_plan_schema(
    max_tasks: int, resources: Sequence[Resource] = (), text_max_chars: int = GRAMMAR_MAX_REPEAT
) -> dict[str, Any]:
    """JSON schema of a plan reply for this request, for backends that turn a schema into a grammar (the
    embedded LLM, a llama.cpp server).

    It spells out the rules a grammar can enforce, so that even a small model cannot break them: task ``i``
    of the list has id ``i`` and depends only on earlier tasks (no self-dependency, no cycle, no missing
    task); its ``args`` are exactly its task type's arguments; an image, audio or video argument is one of
    ``resources`` of that kind or the ``<GENERATED>-N`` of an earlier task, and text names only earlier
    tasks too. Whether task N makes the kind its placeholder needs is left to ``validate_plan``: a schema
    cannot see which task type an earlier item chose. Task types that take the same arguments share one
    branch and the repeated parts are ``$defs``, to keep the grammar small. A text argument is at most
    ``text_max_chars`` long: the planner passes about the length of the request, since a small model
    otherwise rambles on inside a string until the bound (and each character costs a token's time).
    """
    names = {kind: [r.name for r in resources if r.kind == kind] for kind in MEDIA_KINDS}
    defs: dict[str, Any] = {"dep-0": {"const": []}}
    for group, task_names in _arg_groups():
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
        branches = (_task_branch(i, group, defs) for group, _ in _arg_groups())
        defs[f"task-{i}"] = {"anyOf": [b for b in branches if b is not None]}
    lists: list[dict[str, Any]] = [{"const": []}]
    for n in range(1, max_tasks + 1):
        items = [{"$ref": f"#/$defs/task-{i}"} for i in range(n)]
        lists.append({"type": "array", "prefixItems": items, "items": False, "minItems": n})
    return {
        "type": "object",
        "properties": {"tasks": {"anyOf": lists}},
        "required": ["tasks"],
        "additionalProperties": False,
        "$defs": defs,
    }


@cache
def _arg_groups() -> tuple[tuple[tuple[Arg, ...], tuple[str, ...]], ...]:
    """Task types grouped by their arguments (keys, modalities, order): one schema branch per group."""
    groups: dict[tuple[Arg, ...], list[str]] = {}
    for task_type in TASKS.values():
        groups.setdefault(task_type.args, []).append(task_type.name)
    return tuple((args, tuple(names)) for args, names in groups.items())


def _group_name(args: tuple[Arg, ...]) -> str:
    return "_".join(a.key if a.required else f"{a.key}-optional" for a in args)


# What str.strip() removes beyond ASCII, so that a text that starts with none of it is not blank.
_UNICODE_SPACES = r"\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


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


def _text_bound(request: Request) -> int:
    """How long a text argument of this request's plan may be: a text argument quotes the request or a
    recent turn (or names an earlier task's output), so a little over the longest of those, and never more
    than a llama.cpp grammar can hold (the exact schema is only ever compiled into one)."""
    quoted = max((len(t.text) for t in request.history[-2:]), default=0)
    return min(GRAMMAR_MAX_REPEAT, max(len(request.text), min(quoted, _TURN_MAX_CHARS)) + _TEXT_SLACK_CHARS)


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


async def parse_plan_text(text: str) -> Any:
    """The JSON value in an LLM's plan reply, repaired if need be; ``PlanParseError`` if there is none."""
    if not text.strip():
        raise PlanParseError("the LLM's plan reply was empty")
    value = await parse_json_reply(text)
    if not isinstance(value, list | dict):
        raise PlanParseError(f"the LLM's plan reply holds no JSON plan (it began: {clip(text.strip(), 80)})")
    return value


def validate_plan(raw: Any, resources: Sequence[Resource], max_tasks: int) -> Plan:
    """Check a parsed plan against every rule the executor relies on, and type it.

    Accepts a bare list of tasks, ``{"tasks": [...]}`` or one task object. ``<GENERATED>-N`` placeholders add
    task N to the dependencies; a dependency of -1 (the paper's "none") is dropped. Nothing is renumbered.
    """
    items = _task_items(raw)
    if len(items) > max_tasks:
        raise PlanValidationError(f"the plan has {len(items)} tasks; at most {max_tasks} are allowed")
    ids: list[int] = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise PlanValidationError(f"item {n} of the plan is not a task object")
        task_id = _int(item.get("id"), f"task {n} has no valid id (a whole number from 0)")
        if task_id < 0:
            raise PlanValidationError(f"task id {task_id} is negative; ids count from 0")
        if task_id in ids:
            raise PlanValidationError(f"two tasks have the id {task_id}; ids must be distinct")
        ids.append(task_id)
    types: dict[int, TaskType] = {}
    for task_id, item in zip(ids, items, strict=True):
        name = str(item.get("task") or "").strip().lower()
        task_type = TASKS.get(name)
        if task_type is None:
            raise PlanValidationError(
                f"task {task_id}: {clip(name or 'nothing', 60)!r} is not a known task type"
            )
        types[task_id] = task_type
    by_name = {r.name: r for r in resources}
    tasks = []
    for task_id, item in zip(ids, items, strict=True):
        args, used = _check_args(task_id, types[task_id], item.get("args"), types, by_name)
        deps = _declared_deps(task_id, item.get("dep"), types) | used
        tasks.append(PlannedTask(id=task_id, task=types[task_id].name, dep=tuple(sorted(deps)), args=args))
    _check_acyclic(tasks)
    return Plan(tuple(tasks))


def plan_messages(
    request: Request, demos: Sequence[Demonstration], settings: Settings, budget_tokens: int
) -> list[dict[str, str]]:
    """The planning prompt, cut to ``budget_tokens``: oldest chat turns go first, then demonstrations."""
    system = {"role": "system", "content": _system_prompt(settings.max_tasks)}
    shots = list(demos)
    while True:
        head = [system]
        for demo in shots:
            head.append({"role": "user", "content": _render_request(demo.request, demo.request.history)})
            head.append({"role": "assistant", "content": json.dumps({"tasks": list(demo.plan)})})
        turns = _fit_history(request, head, budget_tokens)
        if turns is not None:
            return [*head, {"role": "user", "content": _render_request(request, turns)}]
        if not shots:
            raise PlanningError(
                "the request is too long for the LLM's context window "
                f"(LLM_CONTEXT_TOKENS={settings.llm_context_tokens}); shorten it or start a new conversation"
            )
        shots.pop()


class Planner:
    """Stage 1: ``plan`` asks the LLM for a plan, validates it, and re-prompts once with the error."""

    def __init__(self, llm: LLM, settings: Settings, demos: DemoSelector | None = None) -> None:
        self.llm = llm
        self.settings = settings
        self.demos = demos or FixedDemos(load_demonstrations())
        self.reply_tokens = min(2048, llm.context_tokens // 4)

    async def plan(self, request: Request, usage: LLMUsage) -> Plan:
        shots = await self.demos.select(request.text, DEMO_COUNT)
        budget = self.llm.context_tokens - self.reply_tokens
        schema = plan_schema(self.settings.max_tasks)
        # Made only if the backend asks for it, and once for both attempts.
        exact = cache(partial(exact_plan_schema, self.settings.max_tasks, request.resources, _text_bound(request)))
        messages = plan_messages(request, shots, self.settings, budget)
        reply = await self.llm.complete_json(
            messages, schema=schema, exact_schema=exact, usage=usage, max_tokens=self.reply_tokens
        )
        try:
            return await self._read(reply, request)
        except PlanningError as err:
            log.info("plan rejected, asking once more: %s", err)
            first_error = str(err)
        echo = {"role": "assistant", "content": clip(reply, _RETRY_ECHO_CHARS)}
        retry = {
            "role": "user",
            "content": prompt_template("planner_retry.txt").substitute(error=first_error),
        }
        extra = estimate_message_tokens([echo, retry])
        messages = plan_messages(request, shots, self.settings, budget - extra)
        reply = await self.llm.complete_json(
            [*messages, echo, retry],
            schema=schema,
            exact_schema=exact,
            usage=usage,
            max_tokens=self.reply_tokens,
        )
        try:
            return await self._read(reply, request)
        except PlanParseError as err:
            raise PlanParseError(
                f"the LLM did not reply with a readable plan, even when asked again ({err}); "
                "try rephrasing the request"
            ) from err
        except PlanValidationError as err:
            raise PlanValidationError(
                f"the LLM's plan broke a rule, even when asked again ({err}); try rephrasing the request"
            ) from err

    async def _read(self, reply: str, request: Request) -> Plan:
        return validate_plan(await parse_plan_text(reply), request.resources, self.settings.max_tasks)


def _task_items(raw: Any) -> list[Any]:
    if isinstance(raw, dict) and "tasks" in raw:
        raw = raw["tasks"]
        if raw is None:
            return []
    if isinstance(raw, dict) and "task" in raw:
        return [raw]
    if not isinstance(raw, list):
        raise PlanValidationError('the plan is not a list of tasks (expected {"tasks": [...]})')
    return raw


def _int(value: Any, error: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value):
        return int(value)
    raise PlanValidationError(error)


def _declared_deps(task_id: int, raw: Any, types: dict[int, TaskType]) -> set[int]:
    if raw is None:
        return set()
    values = raw if isinstance(raw, list) else [raw]
    deps = set()
    for value in values:
        dep = _int(value, f"task {task_id}: dependency {clip(str(value), 60)!r} is not a task id")
        if dep == -1:
            continue
        if dep == task_id:
            raise PlanValidationError(f"task {task_id} depends on itself")
        if dep not in types:
            raise PlanValidationError(f"task {task_id} depends on task {dep}, which is not in the plan")
        deps.add(dep)
    return deps


def _check_args(
    task_id: int,
    task_type: TaskType,
    raw: Any,
    types: dict[int, TaskType],
    files: dict[str, Resource],
) -> tuple[dict[str, str], set[int]]:
    """The task's arguments as strings, and the tasks their placeholders refer to."""
    where = f"task {task_id} ({task_type.name})"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PlanValidationError(f"{where}: args must be an object of argument: value")
    args: dict[str, str] = {}
    used: set[int] = set()
    for key, value in raw.items():
        spec = task_type.arg(str(key))
        if spec is None:
            known = ", ".join(a.key for a in task_type.args)
            raise PlanValidationError(f"{where}: unknown argument {clip(str(key), 60)!r} (it takes: {known})")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise PlanValidationError(f"{where}: argument {spec.key!r} must be a string")
        text = str(value).strip() if spec.modality in MEDIA_KINDS else str(value)
        for ref in (int(n) for n in GENERATED_RE.findall(text)):
            used.add(_check_ref(where, task_id, spec.key, spec.modality, ref, types))
        if spec.modality in MEDIA_KINDS:
            _check_file(where, spec.key, spec.modality, text, files)
        args[spec.key] = text
    missing = [a.key for a in task_type.args if a.required and a.key not in args]
    if missing:
        raise PlanValidationError(f"{where}: missing argument {', '.join(missing)}")
    return args, used


def _check_ref(
    where: str, task_id: int, key: str, modality: Modality, ref: int, types: dict[int, TaskType]
) -> int:
    if ref == task_id:
        raise PlanValidationError(f"{where}: argument {key!r} refers to the task's own output")
    source = types.get(ref)
    if source is None:
        raise PlanValidationError(
            f"{where}: argument {key!r} refers to <GENERATED>-{ref}, but there is no task {ref}"
        )
    if source.output != modality:
        raise PlanValidationError(
            f"{where}: argument {key!r} needs {modality}, but task {ref} ({source.name}) makes {source.output}"
        )
    return ref


def _check_file(where: str, key: str, modality: Modality, value: str, files: dict[str, Resource]) -> None:
    if GENERATED_RE.search(value):
        if not GENERATED_RE.fullmatch(value):
            raise PlanValidationError(
                f"{where}: argument {key!r} must be exactly one file name or <GENERATED>-N"
            )
        return
    if any(c in value for c in "/\\:") or value.startswith("~"):
        raise PlanValidationError(
            f"{where}: argument {key!r} is {clip(value, 60)!r}; use a file's short name as listed, not a path or URL"
        )
    resource = files.get(value)
    if resource is None:
        listed = [name for name, r in files.items() if r.kind == modality]
        hint = (
            f"the {modality} files are: {clip(', '.join(listed), 200)}"
            if listed
            else f"there is no {modality} file"
        )
        raise PlanValidationError(f"{where}: {clip(value, 60)!r} is not a file of this conversation ({hint})")
    if resource.kind != modality:
        raise PlanValidationError(
            f"{where}: argument {key!r} needs {modality}, but {value} is {resource.kind}"
        )


def _check_acyclic(tasks: Sequence[PlannedTask]) -> None:
    waiting = {t.id: set(t.dep) for t in tasks}
    while waiting:
        ready = [task_id for task_id, deps in waiting.items() if not deps]
        if not ready:
            cycle = ", ".join(str(task_id) for task_id in sorted(waiting))
            raise PlanValidationError(f"the dependencies of tasks {cycle} form a cycle")
        for task_id in ready:
            del waiting[task_id]
        for deps in waiting.values():
            deps.difference_update(ready)


def _fit_history(
    request: Request, head: list[dict[str, str]], budget_tokens: int
) -> tuple[ChatTurn, ...] | None:
    """The most recent chat turns that fit the budget after ``head``; None if not even the request fits."""
    base = estimate_message_tokens([*head, {"role": "user", "content": _render_request(request, ())}])
    if base > budget_tokens:
        return None
    kept: list[ChatTurn] = []
    used = base
    for turn in reversed(request.history):
        clipped = ChatTurn(turn.role, clip(turn.text, _TURN_MAX_CHARS))
        cost = estimate_tokens(_render_turn(clipped)) + 1
        if used + cost > budget_tokens:
            break
        kept.append(clipped)
        used += cost
    return tuple(reversed(kept))


def _render_request(request: Request, turns: Sequence[ChatTurn]) -> str:
    history = "\n".join(_render_turn(t) for t in turns) or "(none)"
    return prompt_template("planner_request.txt").substitute(
        history=history, files=_render_files(request), text=request.text
    )


def _render_turn(turn: ChatTurn) -> str:
    return f"{turn.role}: {turn.text}"


def _render_files(request: Request) -> str:
    attached = set(request.attachments)
    shown = [r for r in request.resources if r.name in attached]
    older = [r for r in request.resources if r.name not in attached]
    hidden = max(0, len(older) - max(0, _FILES_SHOWN - len(shown)))
    lines = []
    for r in older[hidden:] + shown:
        if r.name in attached:
            where = "attached to this request"
        elif r.origin.source == "task":
            where = "made by a model earlier in the conversation"
        else:
            where = "uploaded earlier in the conversation"
        lines.append(f"- {r.name} ({r.kind}, {where})")
    if hidden:
        lines.insert(0, f"({hidden} older files not listed)")
    return "\n".join(lines) or "(none)"


def _system_prompt(max_tasks: int) -> str:
    lines = []
    for t in TASKS.values():
        args = ", ".join(f"{a.key}: {a.modality}{'' if a.required else ', optional'}" for a in t.args)
        lines.append(f"- {t.name}: {t.description} | {args} | {t.output}")
    return prompt_template("planner_system.txt").substitute(tasks="\n".join(lines), max_tasks=max_tasks)
