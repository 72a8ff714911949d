"""Images to a vision-capable controller LLM, through the real ``AsyncOpenAI`` against the fake server, which
decodes and records every image part it gets (name, format, size) and refuses them unless made with
``vision=True`` (as a text-only model's server does)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from agent.llm import OpenAILLM
from agent.plan import Plan
from agent.request import ChatTurn, Request
from agent.responder import Responder
from agent.settings import Settings
from agent.uploads import UploadLimits, check_uploads
from agent.vision import IMAGE_PROMPT_TOKENS, MAX_PROMPT_IMAGES, PROMPT_IMAGE_SIDE
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import FakeHF
from tests.fakes.llm_server import IMAGE_TOKENS, FakeLLMServer, Reply, prompt_tokens
from tests.fakes.reliability import plan_json, run_turn, stage, stage_script, start_runtime

DETECT = plan_json({"id": 0, "task": "object-detection", "dep": [], "args": {"image": "img-1.png"}})
MODELS = hf_tasks("object-detection")


async def photo(name: str, size: tuple[int, int] = (2000, 1500)):  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    Image.new("RGB", size, (40, 120, 200)).save(out, format="PNG")
    uploads, refused = await check_uploads(
        [(name, out.getvalue())], UploadLimits(50 * 1024 * 1024, 600.0, 4096)
    )
    assert not refused
    return uploads[0]


def is_probe(body: dict[str, Any]) -> bool:
    content = body["messages"][-1]["content"]
    return isinstance(content, list) and content[0]["text"].startswith("What colour is this picture")


def by_stage(llm: FakeLLMServer) -> dict[str, list[list[tuple[str, int, int]]]]:
    """For each stage, the images of each request: (name, width, height)."""
    out: dict[str, list[list[tuple[str, int, int]]]] = {}
    for body, images in zip(llm.requests, llm.images, strict=True):
        which = "probe" if is_probe(body) else stage(body)
        out.setdefault(which, []).append([(i.name, i.width, i.height) for i in images])
    return out


async def test_a_vision_llm_gets_the_images_downscaled_and_named_and_auto_probes_once(tmp_path: Path) -> None:
    script = stage_script([DETECT], ["A blue picture with one square."])
    async with FakeHF(MODELS) as hf, FakeLLMServer(script, vision=True) as llm:
        rt = await start_runtime(llm.base_url, hf.base_url, tmp_path / "data", LLM_VISION="auto")
        try:
            conversation = (await rt.conversations.open("cli")).id
            first = await run_turn(rt, conversation, "what is in it?", [await photo("big.png")])
            second = await run_turn(rt, conversation, "and now?", [await photo("small.png", (300, 200))])
        finally:
            await rt.close()
    seen = by_stage(llm)
    assert seen["probe"] == [[("probe.jpg", 8, 8)]]  # once for the process, before the first plan
    side = PROMPT_IMAGE_SIDE
    # The planner sees the picture downscaled (768 px at most), named as in the prompt's file list.
    assert seen["plan"][0] == [("img-1.png", side, side * 3 // 4)]
    plan_request = next(b for b in llm.requests if stage(b) == "plan")
    assert (
        "- img-1.png (image, attached to this request)" in plan_request["messages"][-1]["content"][0]["text"]
    )
    # The responder also sees what the task made.
    assert [name for name, *_ in seen["respond"][0]] == ["img-1.png", "out-1-0.png"]
    # The next turn: this request's picture first (small ones are not enlarged), then the earlier ones.
    assert seen["plan"][1] == [
        ("img-2.png", 300, 200),
        ("out-1-0.png", side, side * 3 // 4),
        ("img-1.png", side, side * 3 // 4),
    ]
    # Tokens are the server's count, images included; the probe counts in the run that made it.
    result = first.result
    assert result.status == "ok", result.error
    assert result.llm.calls == 3 and second.result.llm.calls == 2
    sent = [b for b in llm.requests[:3]]
    assert result.llm.prompt_tokens == sum(prompt_tokens(b["messages"]) for b in sent)
    assert result.llm.prompt_tokens > 3 * IMAGE_TOKENS


async def test_with_vision_off_no_image_is_sent_and_nothing_probed(tmp_path: Path) -> None:
    script = stage_script([DETECT], ["A square."])
    async with FakeHF(MODELS) as hf, FakeLLMServer(script, vision=True) as llm:
        rt = await start_runtime(llm.base_url, hf.base_url, tmp_path / "data", LLM_VISION="off")
        try:
            conversation = (await rt.conversations.open("cli")).id
            turn = await run_turn(rt, conversation, "what is in it?", [await photo("big.png")])
        finally:
            await rt.close()
    assert turn.result.status == "ok"
    assert [stage(b) for b in llm.requests] == ["plan", "respond"]
    assert llm.images == [[], []]
    assert "img-1.png" in llm.requests[0]["messages"][-1]["content"]  # named, as always


async def test_auto_against_a_text_only_server_is_refused_once_and_remembered(tmp_path: Path) -> None:
    script = stage_script([DETECT], ["A square."])
    async with FakeHF(MODELS) as hf, FakeLLMServer(script) as llm:
        rt = await start_runtime(llm.base_url, hf.base_url, tmp_path / "data", LLM_VISION="auto")
        try:
            conversation = (await rt.conversations.open("cli")).id
            first = await run_turn(rt, conversation, "what is in it?", [await photo("a.png")])
            second = await run_turn(rt, conversation, "and this?", [await photo("b.png")])
        finally:
            await rt.close()
    assert first.result.status == second.result.status == "ok"
    assert sum(is_probe(b) for b in llm.requests) == 1
    assert [len(i) for i in llm.images] == [1, 0, 0, 0, 0]  # the probe's image, then none
    assert first.result.llm.calls == 2  # a refused probe is no answered call


async def test_at_most_a_few_images_go_with_a_call(tmp_path: Path) -> None:
    script = stage_script([plan_json()], ["Many pictures."])
    async with FakeHF(MODELS) as hf, FakeLLMServer(script, vision=True) as llm:
        rt = await start_runtime(llm.base_url, hf.base_url, tmp_path / "data", LLM_VISION="on")
        try:
            conversation = (await rt.conversations.open("cli")).id
            uploads = [await photo(f"p{n}.png", (64, 48)) for n in range(7)]
            turn = await run_turn(rt, conversation, "compare them", uploads)
        finally:
            await rt.close()
    assert turn.result.status == "ok"
    assert not any(is_probe(b) for b in llm.requests)  # "on": no probe
    assert [[name for name, *_ in images] for images in by_stage(llm)["plan"]] == [
        [f"img-{n}.png" for n in range(1, MAX_PROMPT_IMAGES + 1)]
    ]


async def test_prompts_keep_room_for_their_images() -> None:
    llm = OpenAILLM(Settings.from_mapping({"OPENAI_API_KEY": "k", "LLM_CONTEXT_TOKENS": "4096"}))
    try:
        history = tuple(
            ChatTurn("user" if n % 2 == 0 else "assistant", f"turn {n} " + "x" * 400) for n in range(40)
        )
        request = Request("describe it", history=history)
        responder = Responder(llm)
        without = responder.messages(request, Plan(), {}, [])
        with_images = responder.messages(request, Plan(), {}, [], images=MAX_PROMPT_IMAGES)
        # The chat log gives way: the images' share of the context is about what it lost.
        lost = sum(len(m["content"]) for m in without) - sum(len(m["content"]) for m in with_images)
        assert lost // 4 >= (MAX_PROMPT_IMAGES - 1) * IMAGE_PROMPT_TOKENS
    finally:
        await llm.aclose()


async def test_a_server_that_sits_on_the_probe_is_taken_as_text_only(tmp_path: Path) -> None:
    script = stage_script([DETECT], ["A square."], task=Reply("red", delay=3))
    async with FakeHF(MODELS) as hf, FakeLLMServer(script, vision=True) as llm:
        rt = await start_runtime(
            llm.base_url, hf.base_url, tmp_path / "data", LLM_VISION="auto", LLM_TIMEOUT="1"
        )
        try:
            conversation = (await rt.conversations.open("cli")).id
            first = await run_turn(rt, conversation, "what is in it?", [await photo("a.png", (64, 48))])
            second = await run_turn(rt, conversation, "and this?", [await photo("b.png", (64, 48))])
        finally:
            await rt.close()
    assert first.result.status == second.result.status == "ok"
    assert sum(is_probe(b) for b in llm.requests) == 1  # not asked again
    assert [len(i) for i in llm.images] == [1, 0, 0, 0, 0]
