"""Reading JSON from LLM replies: strict on the event loop, lenient in a child process with a time limit, and
never more than ``MAX_JSON_REPLY_CHARS`` of it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import PlanParseError
from agent.replies import MAX_JSON_REPLY_CHARS, REPAIR_SECONDS, parse_json_reply
from agent.workers import _loop_workers

# json_repair's quadratic case: 4 KB of it take ~2.6 s on this machine, 8 KB ~10 s.
QUADRATIC = '{"a": ' + "b}]}{" * 1600


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"tasks": []}', {"tasks": []}),
        ('Sure! Here is the plan:\n```json\n[{"id": 0}]\n```\nHope it helps.', [{"id": 0}]),
        ('<think>maybe [1] or {2}</think>\n{"a": 1}', {"a": 1}),
        ('{"tasks": [{"id": 0, "task": "x",}', {"tasks": [{"id": 0, "task": "x"}]}),
        ('{"tasks": []} and then {"other": 1}', {"tasks": []}),
        ('{"a": 1} {"b": 2', {"a": 1}),
        ("no json at all", None),
        ("<think>never closed {", {}),
    ],
)
async def test_parse_json_reply(text: str, expected: object) -> None:
    assert await parse_json_reply(text) == expected


async def test_a_reply_over_the_cap_is_refused_unread() -> None:
    with pytest.raises(PlanParseError, match=r"is 32,001 characters long; at most 32,000 are read as JSON"):
        await parse_json_reply("[" + "1," * 16_000)
    assert await parse_json_reply(json.dumps(["x" * (MAX_JSON_REPLY_CHARS - 10)])) is not None


async def test_the_repair_runs_off_the_loop_and_is_killed_at_its_time_limit() -> None:
    """While the repair of a hostile reply runs, the loop serves other work; at the limit the child dies.

    Fixed: the repair ran on the loop (8 KB of this held it 30 s; 40 KB froze the bot for 37 s and more).
    """
    started = time.monotonic()
    parsing = asyncio.create_task(parse_json_reply(QUADRATIC))
    longest, last = 0.0, time.monotonic()
    for turn in range(20):  # a turn of the loop would wait for the whole repair if it ran on the loop
        await asyncio.sleep(0.01)
        longest, last = max(longest, time.monotonic() - last), time.monotonic()
        assert not parsing.done(), turn
    with pytest.raises(PlanParseError, match=rf"could not be repaired within {REPAIR_SECONDS:g} s"):
        await parsing
    seconds = time.monotonic() - started
    worker = _loop_workers[(asyncio.get_running_loop(), "json-repair")]
    assert not worker.alive  # killed: its CPU time stopped with it
    print(f"\nrefused after {seconds:.2f} s; the loop's longest wait meanwhile {longest * 1000:.0f} ms")
    # The next repair starts a fresh child and works.
    assert await parse_json_reply('{"a": [1, 2,}') == {"a": [1, 2]}
    assert worker.alive


async def test_repairs_of_different_loops_use_their_own_child_and_closed_loops_lose_theirs() -> None:
    await parse_json_reply("{'single': 'quotes'}")
    mine = _loop_workers[(asyncio.get_running_loop(), "json-repair")]

    def other_loop() -> object:
        return asyncio.run(parse_json_reply("{'other': 'loop'}"))

    assert await asyncio.to_thread(other_loop) == {"other": "loop"}
    assert await parse_json_reply("[1, 2,") == [1, 2]  # stops the closed loop's worker
    assert [w for (_, name), w in _loop_workers.items() if name == "json-repair"] == [mine]


JSONISH = st.text(alphabet=st.sampled_from(list('{}[]":,ab1 \n<>/thinkx`')), max_size=300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), JSONISH))
async def test_the_parser_returns_json_or_none_or_raises_a_plan_parse_error(text: str) -> None:
    try:
        value = await parse_json_reply(text, repair_seconds=2.0)
    except PlanParseError as err:
        assert "could not be repaired" in str(err)
        return
    assert value is None or isinstance(value, dict | list | str | int | float | bool)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(MAX_JSON_REPLY_CHARS + 1, 3 * MAX_JSON_REPLY_CHARS), st.sampled_from(["[", "{", "x", "b}]}{"])
)
async def test_the_parser_never_reads_more_than_its_cap(size: int, unit: str) -> None:
    with pytest.raises(PlanParseError, match="characters long"):
        await parse_json_reply((unit * size)[:size])
