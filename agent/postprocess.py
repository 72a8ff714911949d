"""Image post-processing of model outputs: boxes drawn on detections, masks laid over segmentations.

Pure, blocking Pillow functions: callers run them off the event loop. Every image is opened through
``agent.images.open_image``, which refuses one with too many pixels from its header, before decoding it, and
files Pillow cannot read, with a ``ResourceError``.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .errors import ResourceError
from .images import open_image

__all__ = ["draw_boxes", "overlay_masks", "to_png"]

# Distinct, readable colours for boxes and masks (Tableau 10).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_MASK_OPACITY = 0.5


def to_png(data: bytes | Image.Image) -> bytes:
    """Re-encode an image as PNG (validating it on the way)."""
    return _png(open_image(data))


def draw_boxes(image_bytes: bytes | Image.Image, boxes: Sequence[Mapping[str, Any]]) -> bytes:
    """The image with a labelled rectangle per detection, as PNG.

    ``boxes`` use the Hugging Face object-detection format:
    ``{"label": str, "score": float, "box": {"xmin", "ymin", "xmax", "ymax"}}`` in pixels.
    """
    image = open_image(image_bytes).convert("RGB")
    draw = ImageDraw.Draw(image)
    font = _font(image)
    width = max(2, min(image.size) // 150)
    for i, det in enumerate(boxes):
        colour = _PALETTE[i % len(_PALETTE)]
        box = det["box"]
        left, top = _clamp(float(box["xmin"]), image.width), _clamp(float(box["ymin"]), image.height)
        right, bottom = _clamp(float(box["xmax"]), image.width), _clamp(float(box["ymax"]), image.height)
        if right <= left or bottom <= top:
            continue
        draw.rectangle((left, top, right, bottom), outline=colour, width=width)
        _label(draw, font, (left, top), f"{det['label']} {float(det['score']):.2f}", colour)
    return _png(image)


def overlay_masks(image_bytes: bytes, segments: Sequence[Mapping[str, Any]]) -> bytes:
    """The image with each segment's mask tinted in its own colour and labelled, as PNG.

    ``segments`` use the Hugging Face image-segmentation format: ``{"label": str, "score": float | None,
    "mask": ...}`` where the mask is a base64 PNG (the wire format) or the Pillow image huggingface_hub
    decodes it to. White mask pixels belong to the segment.
    """
    base = open_image(image_bytes).convert("RGBA")
    placed: list[tuple[str, tuple[int, int, int], tuple[int, int, int, int]]] = []
    for i, seg in enumerate(segments):
        colour = _PALETTE[i % len(_PALETTE)]
        mask = _mask(seg["mask"]).convert("L")
        if mask.size != base.size:
            mask = mask.resize(base.size, Image.Resampling.NEAREST)
        alpha = mask.point(lambda v: int(255 * _MASK_OPACITY) if v >= 128 else 0)
        tint = Image.new("RGBA", base.size, (*colour, 255))
        tint.putalpha(alpha)
        base = Image.alpha_composite(base, tint)
        bbox = alpha.getbbox()
        if bbox is not None:
            placed.append((str(seg["label"]), colour, bbox))
    image = base.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = _font(image)
    for label, colour, (left, top, right, bottom) in placed:
        _label(draw, font, ((left + right) // 2, (top + bottom) // 2), label, colour)
    return _png(image)


def _mask(mask: object) -> Image.Image:
    if isinstance(mask, Image.Image):
        return open_image(mask)
    if not isinstance(mask, str):
        raise ResourceError("a segmentation mask is neither a base64 PNG nor an image")
    try:
        return open_image(base64.b64decode(mask, validate=True))
    except binascii.Error as err:
        raise ResourceError("a segmentation mask is not valid base64") from err


def _clamp(value: float, limit: int) -> int:
    return max(0, min(limit - 1, round(value)))


def _font(image: Image.Image) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(11, min(image.size) // 30))


def _label(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    at: tuple[int, int],
    text: str,
    colour: tuple[int, int, int],
) -> None:
    """Text on a filled background of the box's colour, so it reads on any picture."""
    left, top, right, bottom = draw.textbbox(at, text, font=font)
    pad = 2
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=colour)
    draw.text(at, text, fill=(255, 255, 255), font=font)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
