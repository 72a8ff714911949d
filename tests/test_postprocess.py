"""Boxes and masks drawn on real images; unreadable and oversized images refused."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from agent.errors import ResourceError
from agent.postprocess import draw_boxes, open_image, overlay_masks, to_png
from tests.fakes.hf_server import png_bytes

GREY = (128, 128, 128)


def _grey(size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), GREY).save(out, format="PNG")
    return out.getvalue()


def _pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def _mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def _b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_draw_boxes_outlines_each_detection_and_leaves_the_rest() -> None:
    boxes = [{"label": "cat", "score": 0.9, "box": {"xmin": 10, "ymin": 30, "xmax": 50, "ymax": 60}}]
    out = _pixels(draw_boxes(_grey(), boxes))
    assert out.size == (64, 64)
    assert out.getpixel((30, 60)) != GREY  # bottom edge of the rectangle
    assert out.getpixel((50, 45)) != GREY  # right edge
    assert out.getpixel((30, 45)) == GREY  # inside, untouched
    assert out.getpixel((60, 5)) == GREY  # far away, untouched


def test_draw_boxes_clamps_boxes_outside_the_image_and_skips_empty_ones() -> None:
    boxes = [
        {"label": "big", "score": 0.5, "box": {"xmin": -20, "ymin": -20, "xmax": 500, "ymax": 500}},
        {"label": "empty", "score": 0.5, "box": {"xmin": 40, "ymin": 40, "xmax": 40, "ymax": 40}},
    ]
    out = _pixels(draw_boxes(_grey(), boxes))
    assert out.getpixel((63, 32)) != GREY  # the clamped right edge is drawn
    assert out.getpixel((40, 40)) == GREY


def test_overlay_masks_tints_the_masked_pixels_from_a_base64_png() -> None:
    segments = [{"label": "square", "score": 0.97, "mask": _b64(_mask(64, (0, 0, 20, 64)))}]
    out = _pixels(overlay_masks(_grey(), segments))
    assert out.getpixel((5, 60)) != GREY
    assert out.getpixel((50, 60)) == GREY


def test_overlay_masks_accepts_pillow_masks_of_another_size() -> None:
    # A 32x32 mask covering its left half lands on the left half of the 64x64 image.
    segments = [{"label": "left", "score": None, "mask": _mask(32, (0, 0, 16, 32))}]
    out = _pixels(overlay_masks(_grey(), segments))
    assert out.getpixel((2, 62)) != GREY
    assert out.getpixel((62, 62)) == GREY


def test_colours_differ_between_segments() -> None:
    segments = [
        {"label": "a", "score": 0.5, "mask": _b64(_mask(64, (0, 0, 20, 64)))},
        {"label": "b", "score": 0.5, "mask": _b64(_mask(64, (44, 0, 64, 64)))},
    ]
    out = _pixels(overlay_masks(_grey(), segments))
    assert out.getpixel((2, 62)) != out.getpixel((62, 62))


def test_a_mask_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ResourceError, match="base64"):
        overlay_masks(_grey(), [{"label": "x", "score": 1.0, "mask": "not base64!"}])


@pytest.mark.parametrize("data", [b"", b"<html>not an image</html>", png_bytes()[:60]])
def test_unreadable_images_are_refused(data: bytes) -> None:
    with pytest.raises(ResourceError):
        to_png(data)


def test_a_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels: over twice the limit
    with pytest.raises(ResourceError, match="too large"):
        draw_boxes(_grey(), [])


def test_an_image_between_the_limit_and_twice_it_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow only warns in this range; we refuse it all the same.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ResourceError, match="too large"):
        open_image(_grey())


def test_to_png_re_encodes_other_formats() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, format="JPEG")
    assert Image.open(io.BytesIO(to_png(out.getvalue()))).format == "PNG"
