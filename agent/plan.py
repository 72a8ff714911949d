"""Typed plans and task results: what stage 1 produces and stage 3 fills in.

A ``Plan`` is valid by construction, as an httpx ``URL`` is: ``Plan(tasks)`` checks the graph (distinct ids,
dependencies that exist, every ``<GENERATED>-N`` among them, no cycle) and ``Plan.from_raw`` reads an LLM's
JSON into one, checking everything else against the task registry and the conversation's files. So the
executor trusts any ``Plan`` it is given and checks nothing again.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import PlanValidationError
from .resources import Resource
from .tasks import MEDIA_KINDS, TASKS, Modality, TaskType
from .text import clip

__all__ = [
    "GENERATED_RE",
    "MAX_TEXT_ARG_CHARS",
    "ModelChoice",
    "Plan",
    "PlannedTask",
    "TaskOutput",
    "TaskResult",
    "TaskStatus",
]

GENERATED_RE = re.compile(r"<GENERATED>-(\d+)")

MAX_TEXT_ARG_CHARS = 4000
"""Longest text argument a plan may carry: a plan quotes the request, it does not carry a book (a 70 KB plan
once became a 100 MB prompt)."""

TaskStatus = Literal["ok", "failed", "skipped"]

_MISSING_MAX = 3


@dataclass(frozen=True)
class PlannedTask:
    """One task of a plan. ``args`` values are literal text, a resource name, or ``<GENERATED>-N``; ``dep``
    holds every task it waits for, the ``<GENERATED>-N`` it names included."""

    id: int
    task: str
    dep: tuple[int, ...]
    args: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "dep": list(self.dep), "args": dict(self.args)}


@dataclass(frozen=True)
class Plan:
    """Tasks in the order the LLM wrote them. Construction raises ``PlanValidationError`` if the graph is
    unsound: two tasks with one id, a dependency on a missing task or on itself, a ``<GENERATED>-N`` that is
    not a dependency, or a cycle.

    ``missing`` names task types the request needs that cannot run here (the planner says so rather than
    plan around them); the tasks, if any, are what can be done.
    """

    tasks: tuple[PlannedTask, ...] = ()
    missing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ids = [t.id for t in self.tasks]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise PlanValidationError(f"two tasks have the id {twice}; ids must be distinct")
        for t in self.tasks:
            if t.id in t.dep:
                raise PlanValidationError(f"task {t.id} depends on itself")
            missing = [d for d in t.dep if d not in ids]
            if missing:
                raise PlanValidationError(f"task {t.id} depends on task {missing[0]}, which is not in the plan")
            named = {int(n) for v in t.args.values() for n in GENERATED_RE.findall(v)}
            if not named <= set(t.dep):
                raise PlanValidationError(f"task {t.id} uses the output of a task it does not depend on")
        _check_acyclic(self.tasks)

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, task_id: int) -> PlannedTask:
        return next(t for t in self.tasks if t.id == task_id)

    def task_types(self) -> set[str]:
        return {t.task for t in self.tasks}

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.tasks]

    @classmethod
    def from_raw(
        cls,
        raw: Any,
        resources: Sequence[Resource],
        max_tasks: int,
        task_types: Collection[str] | None = None,
    ) -> Plan:
        """Check a parsed plan reply against every rule the executor relies on, and type it.

        Accepts a bare list of tasks, ``{"tasks": [...]}`` or one task object. ``<GENERATED>-N`` placeholders
        add task N to the dependencies; a dependency of -1 (the paper's "none") is dropped. Nothing is
        renumbered. ``task_types`` limits the task types a plan may use (those that can run here); by default
        every registered one. A reply's ``"missing"`` list keeps only task types that exist and cannot run.
        """
        items = _task_items(raw)
        if len(items) > max_tasks:
            raise PlanValidationError(f"the plan has {len(items)} tasks; at most {max_tasks} are allowed")
        ids = _ids(items)
        allowed = TASKS.keys() if task_types is None else task_types
        types: dict[int, TaskType] = {}
        for task_id, item in zip(ids, items, strict=True):
            name = str(item.get("task") or "").strip().lower()
            task_type = TASKS.get(name)
            if task_type is None:
                raise PlanValidationError(f"task {task_id}: {clip(name or 'nothing', 60)!r} is not a known task type")
            if name not in allowed:
                raise PlanValidationError(f"task {task_id}: {name} cannot run here; use another task type")
            types[task_id] = task_type
        by_name = {r.name: r for r in resources}
        tasks = []
        for task_id, item in zip(ids, items, strict=True):
            args, used = _check_args(task_id, types[task_id], item.get("args"), types, by_name)
            deps = _declared_deps(task_id, item.get("dep"), types) | used
            tasks.append(PlannedTask(id=task_id, task=types[task_id].name, dep=tuple(sorted(deps)), args=args))
        return cls(tuple(tasks), _missing(raw, allowed))


@dataclass(frozen=True)
class ModelChoice:
    """Stage 2's answer for one task: the chosen model, why, and the ranked fallbacks after it."""

    task_id: int
    model: str
    reason: str
    candidates: tuple[str, ...] = ()


@dataclass
class TaskOutput:
    """What a task produced: text (for text arguments and the answer), files, and raw structured data."""

    text: str | None = None
    resources: list[Resource] = field(default_factory=list)
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.text is not None:
            out["text"] = self.text
        if self.resources:
            out["files"] = [r.name for r in self.resources]
        if self.data is not None:
            out["data"] = self.data
        return out


@dataclass
class TaskResult:
    """How one task ended. The executor makes it once; the event stream, the run's result, the recorder and
    the progress display all read this same object."""

    id: int
    task: str
    model: str | None
    status: TaskStatus
    seconds: float = 0.0
    output: TaskOutput | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "model": self.model,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "output": self.output.to_json() if self.output else None,
            "error": self.error,
        }


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


def _missing(raw: Any, allowed: Collection[str]) -> tuple[str, ...]:
    """The task types a reply says are missing, if they really are: known, and not among ``allowed``."""
    said = raw.get("missing") if isinstance(raw, dict) else None
    if not isinstance(said, list):
        return ()
    names = (str(n).strip().lower() for n in said if isinstance(n, str))
    return tuple(dict.fromkeys(n for n in names if n in TASKS and n not in allowed))[:_MISSING_MAX]


def _ids(items: list[Any]) -> list[int]:
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
    return ids


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
        if len(text) > MAX_TEXT_ARG_CHARS:
            raise PlanValidationError(
                f"{where}: argument {spec.key!r} is {len(text):,} characters long; at most "
                f"{MAX_TEXT_ARG_CHARS:,} are allowed (quote less, or refer to a file or a task's output)"
            )
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
        raise PlanValidationError(f"{where}: argument {key!r} refers to <GENERATED>-{ref}, but there is no task {ref}")
    if source.output != modality:
        raise PlanValidationError(
            f"{where}: argument {key!r} needs {modality}, but task {ref} ({source.name}) makes {source.output}"
        )
    return ref


def _check_file(where: str, key: str, modality: Modality, value: str, files: dict[str, Resource]) -> None:
    if GENERATED_RE.search(value):
        if not GENERATED_RE.fullmatch(value):
            raise PlanValidationError(f"{where}: argument {key!r} must be exactly one file name or <GENERATED>-N")
        return
    if any(c in value for c in "/\\:") or value.startswith("~"):
        raise PlanValidationError(
            f"{where}: argument {key!r} is {clip(value, 60)!r}; use a file's short name as listed, not a path or URL"
        )
    resource = files.get(value)
    if resource is None:
        listed = [name for name, r in files.items() if r.kind == modality]
        hint = f"the {modality} files are: {clip(', '.join(listed), 200)}" if listed else f"there is no {modality} file"
        raise PlanValidationError(f"{where}: {clip(value, 60)!r} is not a file of this conversation ({hint})")
    if resource.kind != modality:
        raise PlanValidationError(f"{where}: argument {key!r} needs {modality}, but {value} is {resource.kind}")


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
