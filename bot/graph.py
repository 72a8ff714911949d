"""A picture of a plan: tasks as boxes, the resources flowing between them as labelled arrows.

Tasks are laid out left to right by depth (a task sits one column right of its deepest dependency), so the
picture reads in execution order. Drawing blocks (Pillow), so callers run ``draw_plan`` in a worker thread.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from agent.plan import Plan
from agent.tasks import get_task

__all__ = ["draw_plan"]

_BOX_W, _BOX_H = 220, 54
_GAP_X, _GAP_Y, _MARGIN, _LANE = 90, 28, 24, 26
_BACKGROUND, _BOX, _BORDER, _TEXT, _EDGE = "#2b2d31", "#383a40", "#5865f2", "#f2f3f5", "#b5bac1"


def draw_plan(plan: Plan) -> bytes:
    """PNG bytes of ``plan``'s task graph."""
    ids = {t.id for t in plan.tasks}
    depth: dict[int, int] = {}

    def depth_of(task_id: int, seen: frozenset[int] = frozenset()) -> int:
        if task_id not in depth:
            deps = [d for d in plan.get(task_id).dep if d in ids and d not in seen]
            depth[task_id] = 1 + max((depth_of(d, seen | {task_id}) for d in deps), default=-1)
        return depth[task_id]

    columns: dict[int, list[int]] = {}
    for t in plan.tasks:
        columns.setdefault(depth_of(t.id), []).append(t.id)
    edges = [(dep, t.id) for t in plan.tasks for dep in t.dep if dep in ids]
    # An edge that skips a column runs in a lane of its own under the boxes, so it crosses none of them.
    long_edges = [e for e in edges if depth[e[1]] - depth[e[0]] > 1]
    rows = max(len(c) for c in columns.values())
    width = 2 * _MARGIN + len(columns) * _BOX_W + (len(columns) - 1) * _GAP_X
    boxes_height = 2 * _MARGIN + rows * _BOX_H + (rows - 1) * _GAP_Y
    height = boxes_height + len(long_edges) * _LANE
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for col, task_ids in columns.items():
        top = (boxes_height - len(task_ids) * _BOX_H - (len(task_ids) - 1) * _GAP_Y) // 2
        for row, task_id in enumerate(task_ids):
            x = _MARGIN + col * (_BOX_W + _GAP_X)
            y = top + row * (_BOX_H + _GAP_Y)
            boxes[task_id] = (x, y, x + _BOX_W, y + _BOX_H)

    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    title = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=12)
    lanes = {edge: boxes_height - _MARGIN // 2 + n * _LANE for n, edge in enumerate(long_edges)}
    for dep, task_id in edges:
        _arrow(draw, boxes[dep], boxes[task_id], _output_of(plan, dep), small, lanes.get((dep, task_id)))
    for t in plan.tasks:
        x0, y0 = boxes[t.id][:2]
        draw.rounded_rectangle(boxes[t.id], radius=8, fill=_BOX, outline=_BORDER, width=2)
        draw.text((x0 + 10, y0 + 8), _fit(draw, f"{t.id}  {t.task}", title, _BOX_W - 20), fill=_TEXT, font=title)
        needs = ", ".join(sorted(t.args)) or "no arguments"
        draw.text((x0 + 10, y0 + 31), _fit(draw, f"needs {needs}", small, _BOX_W - 20), fill=_EDGE, font=small)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _output_of(plan: Plan, task_id: int) -> str:
    task = get_task(plan.get(task_id).task)
    return task.output if task else "output"


def _arrow(
    draw: ImageDraw.ImageDraw,
    src: tuple[int, int, int, int],
    dst: tuple[int, int, int, int],
    label: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    lane: int | None,
) -> None:
    """A labelled arrow from ``src`` to ``dst``: straight, or around the boxes through the ``lane`` at that y."""
    start = (src[2], (src[1] + src[3]) // 2)
    end = (dst[0], (dst[1] + dst[3]) // 2)
    if lane is None:
        points = [start, end]
        mid = ((start[0] + end[0]) // 2, (start[1] + end[1]) // 2 - 12)
    else:
        out_x, in_x = start[0] + _GAP_X // 2, end[0] - _GAP_X // 2
        points = [start, (out_x, start[1]), (out_x, lane), (in_x, lane), (in_x, end[1]), end]
        mid = ((out_x + in_x) // 2, lane - 11)
    draw.line(points, fill=_EDGE, width=2, joint="curve")
    draw.polygon([end, (end[0] - 10, end[1] - 5), (end[0] - 10, end[1] + 5)], fill=_EDGE)
    draw.text(mid, label, fill=_TEXT, font=font, anchor="mm")


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
