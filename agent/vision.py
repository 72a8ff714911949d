"""Pictures for a vision-capable controller LLM: the conversation's images, downscaled, as prompt parts.

With ``LLM_VISION`` on (or ``auto`` and a server that took the probe image), the planner and the responder
send images beside their text, so the LLM can look at what the user attached instead of only reading its
name. Each image is named in the text next to it (``img-1.png``), so plans still refer to files by name.
Bounded whatever the conversation holds: at most ``MAX_PROMPT_IMAGES`` a call, each at most
``PROMPT_IMAGE_SIDE`` pixels on its longest side (JPEG), made in a child process that is killed after
``DOWNSCALE_SECONDS`` (an 89-megapixel upload decodes in about a second; a hostile one must not hold a core).
An image that cannot be read or made small in time is left out, and the LLM still has its name.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .errors import ResourceError
from .postprocess import open_image
from .resources import Resource
from .workers import WorkerCrashedError, loop_worker

__all__ = [
    "DOWNSCALE_SECONDS",
    "IMAGE_PROMPT_TOKENS",
    "MAX_PROMPT_IMAGES",
    "PROMPT_IMAGE_SIDE",
    "PromptImage",
    "downscale",
    "prompt_images",
]

log = logging.getLogger(__name__)

MAX_PROMPT_IMAGES = 4
"""Most images sent with one LLM call (the newest first): each costs hundreds of prompt tokens."""
PROMPT_IMAGE_SIDE = 768
"""Longest side, in pixels, of an image sent to the LLM (GPT-4o reads 768 px tiles; Qwen-VL and LLaVA less)."""
DOWNSCALE_SECONDS = 20.0
IMAGE_PROMPT_TOKENS = 800
"""What one image part takes of the LLM's context, at most, roughly: GPT-4o counts 765 tokens for 768×576 at
high detail, Qwen2-VL 540, LLaVA 576. Prompts keep this much room per image."""
_JPEG_QUALITY = 85


@dataclass(frozen=True)
class PromptImage:
    """One image as the LLM gets it: the name the prompt uses for it, and a small JPEG."""

    name: str
    jpeg: bytes
    width: int
    height: int

    @property
    def data_url(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")


def downscale(data: bytes, side: int = PROMPT_IMAGE_SIDE) -> tuple[bytes, int, int]:
    """In the worker: the image as a JPEG at most ``side`` pixels on its longest side, and its size."""
    image = open_image(data).convert("RGB")
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=_JPEG_QUALITY)
    return out.getvalue(), image.width, image.height


async def prompt_images(
    resources: Iterable[Resource],
    read: Callable[[Resource], Awaitable[bytes]],
    *,
    made: dict[str, PromptImage] | None = None,
) -> tuple[PromptImage, ...]:
    """The first ``MAX_PROMPT_IMAGES`` images of ``resources``, downscaled; ``made`` keeps the ones already
    made in this run (the responder sends the planner's again)."""
    made = {} if made is None else made
    out: list[PromptImage] = []
    for resource in resources:
        if len(out) == MAX_PROMPT_IMAGES:
            break
        if resource.kind != "image":
            continue
        image = made.get(resource.name)
        if image is None:
            image = await _made_small(resource, read)
            if image is None:
                continue
            made[resource.name] = image
        out.append(image)
    return tuple(out)


async def _made_small(resource: Resource, read: Callable[[Resource], Awaitable[bytes]]) -> PromptImage | None:
    data = await read(resource)
    worker = await loop_worker("images")
    try:
        async with asyncio.timeout(DOWNSCALE_SECONDS):
            jpeg, width, height = await worker.run(downscale, data, PROMPT_IMAGE_SIDE)
    except TimeoutError:
        log.warning("%s: not sent to the LLM (downscaling took over %g s)", resource.name, DOWNSCALE_SECONDS)
        return None
    except (ResourceError, WorkerCrashedError) as err:
        log.warning("%s: not sent to the LLM (%s)", resource.name, err)
        return None
    return PromptImage(resource.name, jpeg, width, height)
