"""Stage 1: prompt, lenient parsing, strict validation, one re-prompt, context trimming."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.demos import Demonstration, FixedDemos, load_demonstrations
from agent.errors import PlanningError, PlanParseError, PlanValidationError
from agent.events import LLMUsage
from agent.grammar import GRAMMAR_MAX_REPEAT, grammar_safe
from agent.llm import OpenAILLM, estimate_message_tokens
from agent.plan import GENERATED_RE, Plan
from agent.plan_schema import exact_plan_schema, plan_schema
from agent.planner import DEMO_COUNT, Planner, parse_plan_text, plan_messages
from agent.request import ChatTurn, Request
from agent.resources import Origin, Resource
from agent.settings import Settings
from agent.tasks import MEDIA_KINDS, TASKS, Modality
from tests.fakes.llm_server import FakeLLMServer

FILES = (
    Resource("img-1.png", "image", "image/png", "a" * 64, 10),
    Resource("aud-1.wav", "audio", "audio/wav", "b" * 64, 10),
    Resource("out-1-0.png", "image", "image/png", "c" * 64, 10, origin=Origin("task", "r1", 0)),
)
REQUEST = Request(
    text="Describe img-1.png and read it aloud",
    history=(ChatTurn("user", "draw a cat"), ChatTurn("assistant", "Here it is: out-1-0.png")),
    resources=FILES,
    attachments=("img-1.png",),
)
CHAIN = [
    {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
    {"id": 1, "task": "text-to-speech", "dep": [0], "args": {"text": "<GENERATED>-0"}},
]


def make_planner(base_url: str, **settings_kw: Any) -> Planner:
    settings = Settings(openai_base_url=base_url, llm_model="planner-model", **settings_kw)
    return Planner(OpenAILLM(settings, max_retries=0), max_tasks=settings.max_tasks)


def check_invariants(plan: Plan, resources: tuple[Resource, ...], max_tasks: int) -> None:
    """Everything the executor relies on."""
    ids = [t.id for t in plan.tasks]
    assert len(ids) == len(set(ids)) and len(ids) <= max_tasks
    by_id = {t.id: t for t in plan.tasks}
    files = {r.name: r for r in resources}
    for t in plan.tasks:
        spec = TASKS[t.task]
        assert t.id not in t.dep and set(t.dep) <= set(by_id)
        assert {a.key for a in spec.args if a.required} <= set(t.args) <= {a.key for a in spec.args}
        for key, value in t.args.items():
            modality = spec.arg(key).modality  # type: ignore[union-attr]
            refs = [int(n) for n in GENERATED_RE.findall(value)]
            assert set(refs) <= set(t.dep)
            assert all(TASKS[by_id[r].task].output == modality for r in refs)
            if modality in MEDIA_KINDS:
                assert GENERATED_RE.fullmatch(value) or files[value].kind == modality
    done: set[int] = set()
    while len(done) < len(by_id):  # acyclic: repeatedly remove tasks whose deps are done
        ready = {t.id for t in plan.tasks if t.id not in done and set(t.dep) <= done}
        assert ready, "cycle"
        done |= ready


# --- demonstrations -----------------------------------------------------------------------------------------


def test_every_demonstration_is_a_valid_plan_unchanged_by_validation() -> None:
    demos = load_demonstrations()
    assert 20 <= len(demos) <= 30
    for demo in demos:
        plan = Plan.from_raw(list(demo.plan), demo.request.resources, 12)
        assert plan.to_json() == list(demo.plan), demo.request.text


def test_demonstrations_cover_the_plan_shapes() -> None:
    demos = load_demonstrations()
    plans = [d.plan for d in demos]
    used = {t["task"] for p in plans for t in p}
    assert sum(not p for p in plans) >= 3  # chit-chat
    assert any(d.request.history and d.plan for d in demos)  # follow-ups naming earlier outputs
    assert any(len(t["dep"]) >= 2 for p in plans for t in p)  # fan-in
    assert any(len([t for t in p if not t["dep"]]) >= 2 for p in plans)  # fan-out
    assert any(t["task"].endswith("-control") for p in plans for t in p)  # ControlNet
    assert {"automatic-speech-recognition", "text-to-speech", "audio-to-audio"} <= used


def test_default_demonstrations_are_a_diverse_head_of_the_bank() -> None:
    head = load_demonstrations()[:DEMO_COUNT]
    assert any(not d.plan for d in head)
    assert any(d.request.history for d in head)
    assert any(len(t["dep"]) >= 2 for d in head for t in d.plan)
    assert any(t["task"].endswith("-control") for d in head for t in d.plan)
    assert any(r.kind == "audio" for d in head for r in d.request.resources)


# --- parsing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(CHAIN),
        json.dumps({"tasks": CHAIN}),
        "Here is my plan:\n```json\n" + json.dumps({"tasks": CHAIN}) + "\n```\nLet me know!",
        json.dumps({"tasks": CHAIN})[:-3],  # truncated: repaired
        json.dumps(CHAIN).replace('"', "'"),  # single quotes: repaired
    ],
)
async def test_plans_are_read_from_lenient_json(text: str) -> None:
    plan = Plan.from_raw(await parse_plan_text(text), FILES, 12)
    assert plan.to_json() == CHAIN


async def test_single_task_object_is_a_one_task_plan() -> None:
    plan = Plan.from_raw(await parse_plan_text(json.dumps(CHAIN[0])), FILES, 12)
    assert plan.to_json() == CHAIN[:1]


@pytest.mark.parametrize("text", ["", "   ", "I cannot help with that.", '"just a string"', "42"])
async def test_unreadable_replies_are_parse_errors(text: str) -> None:
    with pytest.raises(PlanParseError):
        await parse_plan_text(text)


@given(st.text(max_size=300))
async def test_parse_plan_text_only_raises_plan_parse_error(text: str) -> None:
    try:
        value = await parse_plan_text(text)
    except PlanParseError:
        return
    assert isinstance(value, list | dict)


# --- validation -----------------------------------------------------------------------------------------------


def t(task_id: Any, task: str, dep: Any, **args: Any) -> dict[str, Any]:
    return {"id": task_id, "task": task, "dep": dep, "args": args}


def test_empty_plan_means_just_chat() -> None:
    assert not Plan.from_raw([], FILES, 12)
    assert not Plan.from_raw({"tasks": []}, FILES, 12)


def test_normalisations_that_are_allowed() -> None:
    plan = Plan.from_raw(
        [
            t("0", " Image-To-Text ", [-1], image=" img-1.png "),
            t(1, "translation", "-1", text="Translate into French: <GENERATED>-0"),
            t(2, "question-answering", [], text="who?", context=None),
        ],
        FILES,
        12,
    )
    assert plan.to_json() == [
        {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
        {
            "id": 1,
            "task": "translation",
            "dep": [0],
            "args": {"text": "Translate into French: <GENERATED>-0"},
        },
        {"id": 2, "task": "question-answering", "dep": [], "args": {"text": "who?"}},
    ]


def test_placeholders_become_dependencies_and_declared_ones_are_kept() -> None:
    plan = Plan.from_raw(
        [
            t(0, "image-to-text", [], image="img-1.png"),
            t(1, "image-to-text", [], image="out-1-0.png"),
            t(2, "sentence-similarity", [1], text="<GENERATED>-0", text2="<GENERATED>-1"),
            t(3, "text-to-speech", [2], text="done"),
        ],
        FILES,
        12,
    )
    assert [task.dep for task in plan.tasks] == [(), (), (0, 1), (2,)]


def test_ids_are_not_renumbered() -> None:
    plan = Plan.from_raw(
        [t(7, "text-to-image", [], text="a cat"), t(3, "image-to-text", [7], image="<GENERATED>-7")],
        FILES,
        12,
    )
    assert [task.id for task in plan.tasks] == [7, 3]
    assert plan.get(3).dep == (7,)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("nonsense", "not a list of tasks"),
        ([1], "item 0 of the plan is not a task object"),
        ([t("x", "text-to-image", [], text="a")], "no valid id"),
        ([t(True, "text-to-image", [], text="a")], "no valid id"),
        ([t(-2, "text-to-image", [], text="a")], "negative"),
        (
            [t(0, "text-to-image", [], text="a"), t(0, "text-to-image", [], text="b")],
            "two tasks have the id 0",
        ),
        ([t(0, "make-coffee", [], text="a")], "'make-coffee' is not a known task type"),
        ([{"id": 0, "dep": []}], "'nothing' is not a known task type"),
        ([t(0, "image-to-text", [])], "task 0 (image-to-text): missing argument image"),
        ([t(0, "image-to-text", [], image="   ")], "missing argument image"),
        (
            [t(0, "image-to-text", [], image="img-1.png", prompt="x")],
            "unknown argument 'prompt' (it takes: image)",
        ),
        ([{"id": 0, "task": "image-to-text", "dep": [], "args": ["img-1.png"]}], "args must be an object"),
        ([t(0, "image-to-text", [], image=["img-1.png"])], "must be a string"),
        ([t(0, "image-to-text", [], image="img-9.png")], "'img-9.png' is not a file of this conversation"),
        ([t(0, "image-to-text", [], image="aud-1.wav")], "needs image, but aud-1.wav is audio"),
        (
            [t(0, "automatic-speech-recognition", [], audio="img-1.png")],
            "needs audio, but img-1.png is image",
        ),
        ([t(0, "image-to-text", [], image="/images/img-1.png")], "not a path or URL"),
        ([t(0, "image-to-text", [], image="https://x.org/a.png")], "not a path or URL"),
        ([t(0, "image-to-text", [], image="../img-1.png")], "not a path or URL"),
        ([t(0, "image-to-text", [], image="C:\\img-1.png")], "not a path or URL"),
        (
            [t(0, "image-to-text", [], image="img-1.png <GENERATED>-1"), t(1, "text-to-image", [], text="a")],
            "exactly one file name or <GENERATED>-N",
        ),
        ([t(0, "image-to-text", [], image="<GENERATED>-5")], "there is no task 5"),
        ([t(0, "image-to-text", [], image="<GENERATED>-0")], "refers to the task's own output"),
        (
            [t(0, "image-to-text", [], image="img-1.png"), t(1, "image-to-text", [], image="<GENERATED>-0")],
            "needs image, but task 0 (image-to-text) makes text",
        ),
        (
            [
                t(0, "text-to-image", [], text="a"),
                t(1, "translation", [], text="say <GENERATED>-0 in French"),
            ],
            "needs text, but task 0 (text-to-image) makes image",
        ),
        ([t(0, "text-to-image", [0], text="a")], "task 0 depends on itself"),
        ([t(0, "text-to-image", [4], text="a")], "depends on task 4, which is not in the plan"),
        ([t(0, "text-to-image", ["soon"], text="a")], "dependency 'soon' is not a task id"),
        (
            [t(0, "text-to-image", [1], text="a"), t(1, "text-to-image", [0], text="b")],
            "the dependencies of tasks 0, 1 form a cycle",
        ),
        (
            [t(i, "text-to-image", [], text="a") for i in range(4)],
            "the plan has 4 tasks; at most 3 are allowed",
        ),
    ],
)
def test_broken_plans_are_rejected_with_a_reason(raw: Any, message: str) -> None:
    with pytest.raises(PlanValidationError, match=re.escape(message)):
        Plan.from_raw(raw, FILES, 3)


def test_a_text_argument_longer_than_the_bound_is_sent_back_with_the_reason() -> None:
    """A 70 KB plan once became a 100 MB prompt: text arguments have a bound the LLM is told about."""
    huge = "word " * 2_000
    with pytest.raises(PlanValidationError, match="10,000 characters long; at most 4,000"):
        Plan.from_raw([t(0, "summarization", [], text=huge)], FILES, 12)
    assert Plan.from_raw([t(0, "summarization", [], text=huge[:4000])], FILES, 12)


def test_rejection_messages_do_not_echo_huge_values() -> None:
    with pytest.raises(PlanValidationError) as caught:
        Plan.from_raw([t(0, "x" * 10_000, [], text="a")], FILES, 12)
    assert len(str(caught.value)) < 200


# --- properties -----------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 20) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
NAMES = [r.name for r in FILES]
ARG_VALUE = st.one_of(
    st.sampled_from(NAMES),
    st.integers(-1, 6).map(lambda n: f"<GENERATED>-{n}"),
    st.text(max_size=10),
    st.builds(lambda n, s: f"{s} <GENERATED>-{n}", st.integers(0, 6), st.text(max_size=5)),
    st.sampled_from(["/etc/passwd", "http://a/b.png", "../x.png", None, 3]),
)


def _kinds_source(modality: Modality) -> list[str]:
    return [r.name for r in FILES if r.kind == modality]


@st.composite
def valid_plans(draw: st.DrawFn) -> list[dict[str, Any]]:
    """DAG plans that follow every rule: each task only uses earlier tasks' outputs."""
    plan: list[dict[str, Any]] = []
    for task_id in range(draw(st.integers(0, 6))):
        spec = TASKS[draw(st.sampled_from(sorted(TASKS)))]
        args: dict[str, str] = {}
        deps: set[int] = set()
        for arg in spec.args:
            if not arg.required and draw(st.booleans()):
                continue
            producers = [p["id"] for p in plan if TASKS[p["task"]].output == arg.modality]
            options = [f"<GENERATED>-{p}" for p in producers]
            options += _kinds_source(arg.modality) if arg.modality in MEDIA_KINDS else ["some words"]
            if not options:
                break
            value = draw(st.sampled_from(options))
            args[arg.key] = value
            deps |= {int(n) for n in GENERATED_RE.findall(value)}
        else:
            plan.append({"id": task_id, "task": spec.name, "dep": sorted(deps), "args": args})
    return plan


@st.composite
def mutated_plans(draw: st.DrawFn) -> Any:
    """A valid plan with one thing changed, so that some still pass and the others break a rule."""
    plan = draw(valid_plans())
    if plan:
        task = draw(st.sampled_from(plan))
        mutation = draw(st.integers(0, 5))
        if mutation == 0:
            task["dep"] = draw(st.lists(st.integers(-1, 7), max_size=3) | st.integers(-1, 7))
        elif mutation == 1:
            task["args"][draw(st.sampled_from(["text", "image", "audio", "context", "text2", "foo"]))] = draw(
                ARG_VALUE
            )
        elif mutation == 2:
            task["task"] = draw(st.sampled_from([*TASKS, "nope"]))
        elif mutation == 3:
            task["id"] = draw(st.integers(-1, 7) | st.sampled_from(["0", "1", "x"]))
        elif mutation == 4 and task["args"]:
            del task["args"][draw(st.sampled_from(sorted(task["args"])))]
    return draw(st.sampled_from([plan, {"tasks": plan}, json.dumps(plan)]))


@settings(max_examples=400)
@given(JSON | mutated_plans() | st.text(max_size=200))
async def test_validation_returns_a_sound_plan_or_a_planning_error(raw: Any) -> None:
    try:
        plan = Plan.from_raw(await parse_plan_text(raw) if isinstance(raw, str) else raw, FILES, 5)
    except PlanningError as err:
        assert str(err) and len(str(err)) < 400
        return
    check_invariants(plan, FILES, 5)


@given(valid_plans())
async def test_valid_plans_pass_unchanged(raw: list[dict[str, Any]]) -> None:
    plan = Plan.from_raw(raw, FILES, 12)
    assert plan.to_json() == raw
    check_invariants(plan, FILES, 12)
    # And through text, as the LLM would send it.
    assert Plan.from_raw(await parse_plan_text(json.dumps({"tasks": raw})), FILES, 12).to_json() == raw


# --- the constraint schema ---------------------------------------------------------------------------------

_SCHEMA_KEYWORDS = {
    "$defs", "$ref", "additionalProperties", "anyOf", "const", "enum", "items", "maxItems", "minItems",
    "pattern", "prefixItems", "properties", "required", "type", "uniqueItems",
}  # fmt: skip


def schema_instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Every JSON value ``schema`` allows, for the keywords ``exact_plan_schema`` uses.

    It fails on any other keyword, so a schema change cannot slip past the property tests unread.
    """
    made: dict[int, st.SearchStrategy[Any]] = {}

    def strategy(node: dict[str, Any]) -> st.SearchStrategy[Any]:
        if id(node) not in made:
            made[id(node)] = build(node)
        return made[id(node)]

    def build(node: dict[str, Any]) -> st.SearchStrategy[Any]:
        assert set(node) <= _SCHEMA_KEYWORDS, set(node) - _SCHEMA_KEYWORDS
        if "$ref" in node:
            target = schema
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return strategy(target)
        if "anyOf" in node:
            return st.one_of([strategy(s) for s in node["anyOf"]])
        if "const" in node:
            return st.just(node["const"])
        if "enum" in node:
            return st.sampled_from(node["enum"])
        if node["type"] == "object":
            assert node["additionalProperties"] is False
            required = set(node.get("required", ()))
            props = {k: strategy(v) for k, v in node["properties"].items()}
            return st.fixed_dictionaries(
                {k: v for k, v in props.items() if k in required},
                optional={k: v for k, v in props.items() if k not in required},
            )
        if node["type"] == "array" and "prefixItems" in node:
            assert node["items"] is False and node["minItems"] == len(node["prefixItems"])
            return st.tuples(*(strategy(s) for s in node["prefixItems"])).map(list)
        if node["type"] == "array":
            unique = node.get("uniqueItems", False)
            return st.lists(strategy(node["items"]), max_size=node["maxItems"], unique=unique)
        assert node["type"] == "string" and set(node) == {"type", "pattern"}
        return st.from_regex(node["pattern"], fullmatch=True)

    return strategy(schema)


KINDS = st.sampled_from(["image", "audio", "video"])
RESOURCE_SETS = st.lists(
    st.builds(lambda n, kind: Resource(f"f{n}.{kind}", kind, "", "", 0), st.integers(0, 5), KINDS),
    max_size=5,
    unique_by=lambda r: r.name,
).map(tuple)
# What a schema cannot see: the output kind of the task a placeholder names.
KIND_MISMATCH = re.compile(r"needs \w+, but task \d+ \(.*\) makes")


@settings(max_examples=300)
@given(st.data(), RESOURCE_SETS, st.integers(1, 5))
def test_every_plan_the_schema_allows_follows_the_rules_it_can_express(
    data: st.DataObject, files: tuple[Resource, ...], max_tasks: int
) -> None:
    schema = exact_plan_schema(max_tasks, files)
    raw = data.draw(schema_instances(schema))
    assert set(raw) == {"tasks"} and len(raw["tasks"]) <= max_tasks
    for position, task in enumerate(raw["tasks"]):
        spec = TASKS[task["task"]]
        assert task["id"] == position and set(task["dep"]) <= set(range(position))
        assert {a.key for a in spec.args if a.required} <= set(task["args"]) <= {a.key for a in spec.args}
        for key, value in task["args"].items():
            modality = spec.arg(key).modality  # type: ignore[union-attr]
            if modality in MEDIA_KINDS:
                earlier = {f"<GENERATED>-{n}" for n in range(position)}
                assert value in earlier | {r.name for r in files if r.kind == modality}
    try:
        plan = Plan.from_raw(raw, files, max_tasks)
    except PlanValidationError as err:
        assert KIND_MISMATCH.search(str(err)), err
        return
    check_invariants(plan, files, max_tasks)


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("a lighthouse at night", True),
        ("<GENERATED>-1", True),
        ("Translate into French: <GENERATED>-0", True),
        ("compare <GENERATED>-0 and <GENERATED>-1.", True),
        ('say \\"hi\\"\\nthen stop', True),  # escapes, as llama.cpp writes them in raw JSON
        ("<GENERATED>-2", False),  # the task itself
        ("see <GENERATED>-5", False),  # a later or missing task
        ("<GENERATED>-12", False),
        ("<GENERATED>-1<GENERATED>-0", False),
        ("is 3 < 5? <3", True),
        ("<Good>", False),  # "<G" only starts a placeholder
        ("ends with <", False),
        ("   ", False),
        ("\xa0\u3000", False),  # blank to str.strip() too
        ("日本語のテキスト", True),
        ("", False),
        ('a bare " quote', False),
    ],
)
def test_text_arguments_only_name_earlier_tasks(text: str, allowed: bool) -> None:
    pattern = exact_plan_schema(4)["$defs"]["text-2"]["pattern"]
    assert bool(re.fullmatch(pattern, text)) is allowed


def plannable(schema: dict[str, Any], position: int) -> set[str]:
    """The task types the schema allows as task ``position`` of a plan."""
    defs = schema["$defs"]
    refs = [b["properties"]["task"]["$ref"] for b in defs[f"task-{position}"]["anyOf"]]
    return {name for ref in refs for name in defs[ref.split("/")[-1]]["enum"]}


def test_schema_keeps_every_task_plannable_and_bounds_strings() -> None:
    schema = exact_plan_schema(7)
    lengths = [len(s.get("prefixItems", s.get("const", ()))) for s in schema["properties"]["tasks"]["anyOf"]]
    assert lengths == list(range(8))
    # With no files, a first task can only start from text; later ones can use an earlier task's output.
    assert plannable(schema, 0) == {name for name, t in TASKS.items() if t.inputs == ("text",)}
    assert plannable(schema, 1) == plannable(schema, 6) == set(TASKS)
    assert plannable(exact_plan_schema(3, FILES), 0) == set(TASKS)  # no task needs a video
    texts = [d for d in schema["$defs"].values() if d.get("type") == "string"]
    assert len(texts) == 7 and all(re.search(r"\{0,\d+\}", d["pattern"]) for d in texts)
    image_1 = exact_plan_schema(3, FILES)["$defs"]["image-1"]["enum"]
    assert image_1 == ["img-1.png", "out-1-0.png", "<GENERATED>-0"]
    assert "video-0" not in exact_plan_schema(3, FILES)["$defs"]


# --- the planner over the wire --------------------------------------------------------------------------------


async def test_plan_prompt_and_constrained_reply() -> None:
    async with FakeLLMServer([json.dumps({"tasks": CHAIN})]) as server:
        usage = LLMUsage()
        plan = await make_planner(server.base_url).plan(REQUEST, usage)
    assert plan.to_json() == CHAIN
    assert usage.calls == 1
    sent = server.requests[0]
    messages = sent["messages"]
    system = messages[0]["content"]
    assert all(f"- {name}:" in system for name in TASKS)
    assert "<GENERATED>-N" in system and '{"tasks": []}' in system
    last = messages[-1]["content"]
    assert "Request: Describe img-1.png and read it aloud" in last
    assert "user: draw a cat" in last and "assistant: Here it is: out-1-0.png" in last
    assert "- img-1.png (image, attached to this request)" in last
    assert "- out-1-0.png (image, made by a model earlier in the conversation)" in last
    assert "- aud-1.wav (audio, uploaded earlier in the conversation)" in last
    # Demonstrations come as user/assistant pairs whose answers are valid JSON plans.
    shots = messages[1:-1]
    assert len(shots) == 2 * DEMO_COUNT
    assert all(json.loads(m["content"])["tasks"] is not None for m in shots[1::2])
    # OpenAI's structured outputs get the portable schema; only a grammar backend gets the exact one.
    assert sent["response_format"]["json_schema"]["schema"] == plan_schema(12)


@pytest.mark.parametrize("text_chars", [20, 10_000])
async def test_a_grammar_server_gets_the_requests_exact_schema_with_text_bounded_by_the_request(
    text_chars: int,
) -> None:
    request = Request("x" * text_chars, resources=FILES)
    async with FakeLLMServer([json.dumps({"tasks": CHAIN})]) as server:
        config = Settings(openai_base_url=server.base_url, llm_model="planner-model")
        llm = OpenAILLM(config, max_retries=0, json_mode="json_object_schema")
        await Planner(llm).plan(request, LLMUsage())
    sent = server.requests[0]["response_format"]["schema"]
    # Room to quote the request whole, up to what llama.cpp's grammar parser takes (beyond it
    # llama-cpp-python's server crashed).
    bound = min(text_chars + 100, GRAMMAR_MAX_REPEAT)
    assert sent == exact_plan_schema(12, FILES, bound) == grammar_safe(sent)
    assert f"{{0,{bound - 1}}}" in sent["$defs"]["text-0"]["pattern"]


async def test_the_exact_schema_is_not_made_for_a_server_that_would_not_use_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unwanted(*args: Any) -> dict[str, Any]:
        raise AssertionError("the exact schema was built for OpenAI's json_schema mode")

    monkeypatch.setattr("agent.planner.exact_plan_schema", unwanted)
    async with FakeLLMServer([json.dumps({"tasks": CHAIN})]) as server:
        assert (await make_planner(server.base_url).plan(REQUEST, LLMUsage())).to_json() == CHAIN


async def test_empty_reply_plan_is_just_chat() -> None:
    async with FakeLLMServer(['{"tasks": []}']) as server:
        assert not await make_planner(server.base_url).plan(Request("hi!"), LLMUsage())


async def test_a_rejected_plan_is_sent_back_once_with_the_reason() -> None:
    bad = json.dumps({"tasks": [t(0, "image-to-text", [], image="/tmp/cat.png")]})
    async with FakeLLMServer([bad, json.dumps(CHAIN)]) as server:
        usage = LLMUsage()
        plan = await make_planner(server.base_url).plan(REQUEST, usage)
    assert plan.to_json() == CHAIN
    assert usage.calls == 2
    retry = server.requests[1]["messages"]
    assert retry[-2] == {"role": "assistant", "content": bad}
    assert "That plan was rejected: task 0 (image-to-text)" in retry[-1]["content"]
    assert "not a path or URL" in retry[-1]["content"]


async def test_a_second_bad_plan_fails_with_a_clear_validation_error() -> None:
    bad = json.dumps([t(0, "fly-to-the-moon", [])])
    async with FakeLLMServer([bad, bad, "never asked"]) as server:
        with pytest.raises(PlanValidationError, match=r"even when asked again.*fly-to-the-moon"):
            await make_planner(server.base_url).plan(REQUEST, LLMUsage())
    assert len(server.requests) == 2


async def test_unreadable_twice_is_a_parse_error() -> None:
    async with FakeLLMServer(["Sorry, I can't.", "I really can't."]) as server:
        with pytest.raises(PlanParseError, match="did not reply with a readable plan"):
            await make_planner(server.base_url).plan(REQUEST, LLMUsage())


async def test_a_custom_demo_selector_chooses_the_demonstrations() -> None:
    special = Demonstration(
        Request("draw a unicorn"),
        ({"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a unicorn"}},),
    )
    asked: list[tuple[str, int]] = []

    class OneDemo:
        def fixed_count(self, k: int) -> int:
            return 0

        async def select(self, text: str, k: int) -> list[Demonstration]:
            asked.append((text, k))
            return [special]

    async with FakeLLMServer(['{"tasks": []}']) as server:
        settings = Settings(openai_base_url=server.base_url)
        await Planner(OpenAILLM(settings, max_retries=0), OneDemo()).plan(REQUEST, LLMUsage())
    assert asked == [(REQUEST.text, DEMO_COUNT)]
    messages = server.requests[0]["messages"]
    assert len(messages) == 4 and "Request: draw a unicorn" in messages[1]["content"]


# --- context trimming ---------------------------------------------------------------------------------------


def test_oldest_turns_are_dropped_first_to_fit_the_context() -> None:
    history = tuple(
        ChatTurn("user" if i % 2 == 0 else "assistant", f"turn {i} " + "x" * 400) for i in range(40)
    )
    request = Request("and now?", history=history)
    demos = load_demonstrations()[:DEMO_COUNT]
    budget = 4000
    messages = plan_messages(request, demos, budget, max_tasks=12)
    last = messages[-1]["content"]
    assert estimate_message_tokens(messages) <= budget
    assert "turn 39 " in last and "turn 0 " not in last
    kept = [i for i in range(40) if f"turn {i} " in last]
    assert kept == list(range(kept[0], 40))  # a contiguous, most recent run of turns
    assert len(messages) == 2 + 2 * DEMO_COUNT  # demonstrations kept while history could shrink


def test_demonstrations_go_when_even_an_empty_history_does_not_fit() -> None:
    demos = load_demonstrations()[:DEMO_COUNT]
    full = plan_messages(Request("hi"), demos, 100_000, max_tasks=12)
    budget = estimate_message_tokens(full) - 50
    messages = plan_messages(Request("hi"), demos, budget, max_tasks=12)
    assert estimate_message_tokens(messages) <= budget
    assert 2 <= len(messages) < len(full)


def test_a_request_too_long_for_any_prompt_is_a_planning_error() -> None:
    with pytest.raises(PlanningError, match="too long for the LLM's context window"):
        plan_messages(Request("x" * 40_000), load_demonstrations(), 3000, max_tasks=12)


async def test_planner_fits_its_prompt_to_the_llms_context() -> None:
    history = tuple(ChatTurn("user", f"turn {i} " + "y" * 800) for i in range(30))
    async with FakeLLMServer(['{"tasks": []}']) as server:
        planner = make_planner(server.base_url, llm_context_tokens=4096)
        await planner.plan(Request("hi", history=history), LLMUsage())
    messages = server.requests[0]["messages"]
    assert estimate_message_tokens(messages) + planner.reply_tokens <= 4096
    assert server.requests[0]["max_tokens"] == planner.reply_tokens
    assert "turn 29 " in messages[-1]["content"]


async def test_the_fixed_demonstrations_are_offered_to_the_llm_as_a_cacheable_prefix() -> None:
    """The planner tells the LLM how many leading messages every plan shares (the embedded LLM saves its state
    after them): the system message and the demonstrations that do not depend on the request."""
    offered: list[int] = []

    class Recording(OpenAILLM):
        async def complete_json(self, messages, **kwargs):  # type: ignore[no-untyped-def]
            offered.append(kwargs["cacheable_prefix"])
            return await super().complete_json(messages, **kwargs)

    bank = list(load_demonstrations())

    class Head:
        def __init__(self, n: int) -> None:
            self.n = n

        def fixed_count(self, k: int) -> int:
            return min(self.n, k)

        async def select(self, text: str, k: int) -> list[Demonstration]:
            return bank[:k]

    async with FakeLLMServer(['{"tasks": []}'] * 3) as server:
        llm = Recording(Settings(openai_base_url=server.base_url), max_retries=0)
        for selector in (Head(0), Head(3), FixedDemos(bank)):
            await Planner(llm, selector).plan(REQUEST, LLMUsage())
    assert offered == [1, 1 + 2 * 3, 1 + 2 * DEMO_COUNT]
