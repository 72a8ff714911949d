"""TaskBench (Hugging Face tools domain): its data, its planning metrics, and the bridge to our plans.

The metrics re-implement what ``taskbench/evaluate.py`` computes (see shared/taskbench/README.md §4): node F1
(micro, over the 23 tool classes, set-based, unknown tool names ignored on both sides), edge F1 (binary over
``(source, target)`` tool-name pairs derived from ``<node-j>`` arguments), task-argname F1 and value F1
(binary over ``"{task}-{argname}"`` and ``"{task}-{argname}-{value}"``). Two deliberate differences, both
from the README: a missing or failed prediction is scored as an empty plan (upstream silently drops it, which
flatters weak models), and coverage is reported. A gold sample whose ``<node-j>`` cannot be resolved is
excluded from every metric, as upstream does.
"""

from __future__ import annotations

import json
import mimetypes
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.plan import GENERATED_RE, Plan
from agent.resources import Resource
from agent.tasks import TASKS, Modality

__all__ = [
    "DATA_DIR",
    "GOLD_FILE",
    "Canonical",
    "Counts",
    "GoldRecord",
    "Node",
    "Scores",
    "TaskBench",
    "canonicalise",
    "content_type",
    "oracle_plan",
    "request_resources",
    "score",
    "to_taskbench",
]

DATA_DIR = "data_huggingface"
GOLD_FILE = "gold_sample_44.laminair_migrated.jsonl"

Node = Mapping[str, Any]
"""A TaskBench plan node: ``{"task": tool name, "arguments": [text | file name | "<node-j>"]}``."""

_NODE_RE = re.compile(r"<node-(\d+)>")
_IMAGE_EXT = ("jpg", "png", "jpeg", "gif", "bmp", "tiff", "svg", "ico")
_AUDIO_EXT = ("mp3", "wav", "wma", "ogg", "aac", "flac", "aiff", "au")
_VIDEO_EXT = ("mp4", "avi", "mov", "flv", "wmv", "mkv", "webm", "m4v", "mpg", "mpeg")
_FILE_RE = re.compile(
    r"[\w\-]+(?:\.[\w\-]+)*\.(" + "|".join((*_IMAGE_EXT, *_AUDIO_EXT, *_VIDEO_EXT, "txt")) + r")\b",
    re.IGNORECASE,
)


def content_type(argument: str) -> Modality:
    """TaskBench's argument name for a literal: the kind its file extension says, else ``text``.

    A substring test, as upstream: any ``.png`` inside a sentence makes it an image.
    """
    content = argument.strip("'")
    kinds: tuple[tuple[Modality, tuple[str, ...]], ...] = (
        ("image", _IMAGE_EXT),
        ("audio", _AUDIO_EXT),
        ("video", _VIDEO_EXT),
    )
    for kind, extensions in kinds:
        if any(f".{ext}" in content for ext in extensions):
            return kind
    return "text"


def _flat(argument: Any) -> str:
    """Upstream's argument flattening: a dict gives its first value, a list its items joined by spaces."""
    if isinstance(argument, dict):
        argument = next(iter(argument.values()), "")
    if isinstance(argument, list):
        argument = " ".join(str(a) for a in argument)
    return str(argument)


@dataclass(frozen=True)
class Canonical:
    """One plan reduced to what the metrics compare: sets of names, links, argument names and values."""

    names: frozenset[str]
    links: frozenset[tuple[str, str]]
    argnames: frozenset[str]
    values: frozenset[str]


def canonicalise(nodes: Sequence[Node], output_types: Mapping[str, str]) -> Canonical:
    """Upstream's argument canonicalisation; ``ValueError`` if a ``<node-j>`` points outside the plan.

    ``output_types`` maps each known tool to its first output type (``none`` if it has none); an argument
    ``<node-j>`` becomes ``{name: output type of tool j, value: tool j}`` and the link ``tool j → tool i``,
    a self-reference is dropped, any other argument is ``{name: content_type(a), value: a}``.
    """
    names = [str(n.get("task", "")).replace("_", " ") for n in nodes]
    links: set[tuple[str, str]] = set()
    argnames: set[str] = set()
    values: set[str] = set()
    for i, (node, name) in enumerate(zip(nodes, names, strict=True)):
        for raw in node.get("arguments") or ():
            argument = _flat(raw)
            ref = _NODE_RE.search(argument)
            if ref is not None:
                j = int(ref.group(1))
                if j == i:
                    continue
                if j >= len(names):
                    raise ValueError(f"node {i} refers to <node-{j}>, but the plan has {len(names)} nodes")
                source = names[j]
                links.add((source, name))
                kind, value = output_types.get(source, "other"), source
            else:
                kind, value = content_type(argument), argument
            argnames.add(f"{name}-{kind}")
            values.add(f"{name}-{kind}-{value}")
    return Canonical(frozenset(names), frozenset(links), frozenset(argnames), frozenset(values))


@dataclass
class Counts:
    """Pooled true positives, false positives and false negatives of one metric."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, gold: Iterable[Any], predicted: Iterable[Any]) -> None:
        gold_set, pred_set = set(gold), set(predicted)
        self.tp += len(gold_set & pred_set)
        self.fp += len(pred_set - gold_set)
        self.fn += len(gold_set - pred_set)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN), which is 0 when there is nothing to find and nothing found (as sklearn)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0

    def to_json(self) -> dict[str, float]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
        }


@dataclass
class Scores:
    """TaskBench's planning metrics over a set of samples, with how many had a prediction at all."""

    samples: int = 0
    predicted: int = 0
    excluded: int = 0
    node: Counts = field(default_factory=Counts)
    edge: Counts = field(default_factory=Counts)
    argname: Counts = field(default_factory=Counts)
    value: Counts = field(default_factory=Counts)

    @property
    def coverage(self) -> float:
        return self.predicted / self.samples if self.samples else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "predicted": self.predicted,
            "excluded": self.excluded,
            "coverage": round(self.coverage, 4),
            "node_f1": round(self.node.f1, 4),
            "edge_f1": round(self.edge.f1, 4),
            "argname_f1": round(self.argname.f1, 4),
            "value_f1": round(self.value.f1, 4),
            "counts": {
                "node": self.node.to_json(),
                "edge": self.edge.to_json(),
                "argname": self.argname.to_json(),
                "value": self.value.to_json(),
            },
        }


def score(
    pairs: Iterable[tuple[Sequence[Node], Sequence[Node] | None]], output_types: Mapping[str, str]
) -> Scores:
    """Score ``(gold nodes, predicted nodes or None)`` pairs. None (no usable plan) counts as an empty plan;
    so does a prediction whose ``<node-j>`` cannot be resolved. ``output_types`` holds the known tools."""
    scores = Scores()
    for gold_nodes, predicted_nodes in pairs:
        scores.samples += 1
        try:
            gold = canonicalise(gold_nodes, output_types)
        except ValueError:
            scores.excluded += 1
            continue
        empty = Canonical(frozenset(), frozenset(), frozenset(), frozenset())
        pred = empty
        if predicted_nodes is not None:
            scores.predicted += 1
            try:
                pred = canonicalise(predicted_nodes, output_types)
            except ValueError:
                pred = empty
        known = output_types.keys()
        scores.node.add(gold.names & known, pred.names & known)
        scores.edge.add(gold.links, pred.links)
        scores.argname.add(gold.argnames, pred.argnames)
        scores.value.add(gold.values, pred.values)
    return scores


def to_taskbench(plan: Plan, names: Mapping[str, str]) -> list[dict[str, Any]]:
    """Our plan as TaskBench nodes: names mapped (unmapped ones kept, so they count as unknown tools), list
    order kept, argument values as a list, ``<GENERATED>-k`` rewritten to ``<node-(index of task k)>``."""
    index = {t.id: i for i, t in enumerate(plan.tasks)}

    def node_ref(match: re.Match[str]) -> str:
        task_id = int(match.group(1))
        return f"<node-{index[task_id]}>" if task_id in index else match.group(0)

    return [
        {"task": names.get(t.task, t.task), "arguments": [GENERATED_RE.sub(node_ref, v) for v in t.args.values()]}
        for t in plan.tasks
    ]


def oracle_plan(nodes: Sequence[Node], from_taskbench: Mapping[str, str]) -> list[dict[str, Any]]:
    """A gold plan written the way our planner should write it: the ceiling our task set allows.

    Nodes whose tool has no task of ours are left out, and so are arguments that refer to them or that no
    argument of the task can take; ``<node-j>`` becomes ``<GENERATED>-j`` (ids are the gold indices).
    """
    ours = [from_taskbench.get(str(n.get("task", "")).replace("_", " ")) for n in nodes]
    plan: list[dict[str, Any]] = []
    for i, (node, name) in enumerate(zip(nodes, ours, strict=True)):
        if name is None:
            continue
        free = list(TASKS[name].args)
        args: dict[str, str] = {}
        deps: set[int] = set()
        for raw in node.get("arguments") or ():
            argument = _flat(raw)
            ref = _NODE_RE.search(argument)
            source: int | None = None
            if ref is not None:
                source = int(ref.group(1))
                upstream = ours[source] if source < len(ours) else None
                if source == i or upstream is None:
                    continue
                kind: str = TASKS[upstream].output
                argument = _NODE_RE.sub(lambda m: f"<GENERATED>-{m.group(1)}", argument)
            else:
                kind = content_type(argument)
            slot = next((a for a in free if a.modality == kind), None)
            if slot is None:
                continue
            free.remove(slot)
            args[slot.key] = argument
            if source is not None:
                deps.add(source)
        plan.append({"id": i, "task": name, "dep": sorted(deps), "args": args})
    return plan


def request_resources(text: str) -> tuple[Resource, ...]:
    """The files a TaskBench request names (``'example.jpg'``), as conversation resources of those names."""
    found: dict[str, Modality] = {}
    for match in _FILE_RE.finditer(text):
        found.setdefault(match.group(0), content_type(match.group(0)))
    return tuple(
        Resource(
            name=name,
            kind=kind,
            mime=mimetypes.guess_type(name)[0] or "application/octet-stream",
            sha256="",
            size=0,
        )
        for name, kind in found.items()
    )


@dataclass(frozen=True)
class GoldRecord:
    """A gold sample: ``request`` is the ``user_request`` TaskBench's inference sends (not ``instruction``)."""

    id: str
    type: str
    request: str
    instruction: str
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class TaskBench:
    """The HF-tools data: tools and their output types, the 7,546 requests, the gold sample, the name map."""

    output_types: dict[str, str]
    requests: dict[str, str]
    gold: tuple[GoldRecord, ...]
    to_taskbench: dict[str, str]
    from_taskbench: dict[str, str]

    @classmethod
    def load(cls, root: Path) -> TaskBench:
        data = root / DATA_DIR
        tools = json.loads((data / "tool_desc.json").read_text(encoding="utf-8"))["nodes"]
        output_types = {t["id"]: (t["output-type"][0] if t["output-type"] else "none") for t in tools}
        requests: dict[str, str] = {}
        with (data / "user_requests.json").open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    requests.setdefault(str(record["id"]), record["user_request"])
        gold = []
        with (data / GOLD_FILE).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    gold.append(
                        GoldRecord(str(r["id"]), r["type"], requests[str(r["id"])], r["instruction"], tuple(r["task_nodes"]))
                    )
        mapping = json.loads((root / "hugginggpt_taskbench_task_map.json").read_text(encoding="utf-8"))
        to_tb = {ours: tb for ours, tb in mapping["hugginggpt_to_taskbench"].items() if tb}
        return cls(output_types, requests, tuple(gold), to_tb, {tb: ours for ours, tb in to_tb.items()})
