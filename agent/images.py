"""Images, opened one way in the whole project: the size is read from the header and checked before a single
pixel is decoded.

Pillow decodes a whole image into memory, about 4 bytes a pixel whatever the file size: an 89-megapixel PNG
of 367 KB takes 358 MB. So every image is opened by ``open_image``, which refuses one of more than
``max_pixels`` from its header; the size check is explicit (Pillow's own ``DecompressionBombWarning`` cannot
be made an error safely: ``warnings.catch_warnings`` is not thread-safe). ``shrink`` is what user images go
through once, in a worker process (``agent.uploads``): decoded (which proves they are whole), and brought down
to the longest side models need, so no model decodes the original again.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ResourceError

__all__ = ["MAX_PIXELS", "MIME", "Shrunk", "TooLargeError", "is_image", "megapixels", "open_image", "shrink"]

# Per image. A 48-50 MP phone photo passes; decoding one (the worst case) takes ~200 MB.
MAX_PIXELS = 50_000_000
# The formats accepted from users, and kept as they are when small enough.
MIME = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
# Formats written back when an image is downscaled: JPEG stays JPEG, WebP stays WebP, the rest become PNG.
_SAVE_AS = {"JPEG": "JPEG", "WEBP": "WEBP"}
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


class TooLargeError(ResourceError):
    """The header says the image has more pixels than allowed (nothing was decoded)."""

    def __init__(self, limit: int, size: tuple[int, int] | None) -> None:
        self.limit, self.size = limit, size
        shown = (
            f"{size[0]}×{size[1]} pixels ({megapixels(size[0] * size[1])})"
            if size is not None
            else f"over {megapixels(2 * (Image.MAX_IMAGE_PIXELS or 0))}"  # Pillow refused it unread
        )
        super().__init__(f"the image is too large: {shown}; the limit is {megapixels(limit)}")

    def __reduce__(self) -> tuple[type[TooLargeError], tuple[int, tuple[int, int] | None]]:
        return type(self), (self.limit, self.size)  # it crosses from the worker process


@dataclass(frozen=True)
class Shrunk:
    """An image checked by decoding it: ``data`` is the original bytes unless it had to be downscaled."""

    data: bytes
    mime: str
    width: int
    height: int
    pixels: int  # of the original, as its header said
    downscaled: bool


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def is_image(data: bytes) -> bool:
    """Whether ``data`` starts like one of the accepted image formats (cheap; proves nothing more)."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def open_image(
    data: bytes | Image.Image, *, max_pixels: int = MAX_PIXELS, reduce_to: int | None = None
) -> Image.Image:
    """A fully decoded image from encoded bytes (or a lazily opened Pillow image), or ``ResourceError``.

    The pixel count is checked from the header first: a refused image costs nothing to refuse. With
    ``reduce_to``, a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale whose sides stay at least that
    large (its decoder can; the caller resizes anyway), taking a fraction of the memory and time.
    """
    image = data if isinstance(data, Image.Image) else _open_lazily(data, max_pixels)
    _check_size(image, max_pixels)
    if reduce_to is not None:
        image.draft(image.mode, (reduce_to, reduce_to))
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise ResourceError("the image is corrupt or cut short") from err
    return image


def shrink(data: bytes, max_side: int, max_pixels: int) -> Shrunk | None:
    """Decode ``data`` once (within ``max_pixels``) and downscale it so its longest side is at most
    ``max_side``; None if it is not an image of an accepted format. Meant for a worker process: the decoded
    original (up to ``4 * max_pixels`` bytes) lives only there.

    A downscaled image keeps its format (JPEG, WebP; others become PNG) and is turned upright from its EXIF
    orientation, which the re-encoded file no longer carries.
    """
    try:
        image = _open_lazily(data, max_pixels)
    except TooLargeError:
        raise
    except ResourceError:
        return None
    fmt = image.format or ""
    if fmt not in MIME:
        return None
    width, height = image.size
    _check_size(image, max_pixels)
    if max(width, height) <= max_side:
        open_image(image, max_pixels=max_pixels)
        return Shrunk(data, MIME[fmt], width, height, width * height, downscaled=False)
    scale = max_side / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    # A JPEG decodes at 1/2, 1/4 or 1/8 scale with both sides still at least the target's: a 20 MP photo
    # at 1/2 (a quarter of the memory and time). No effect on other formats.
    image.draft(image.mode, target)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "I;16", "F"):
        image = image.convert("RGBA")
    try:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    except (OSError, ValueError, SyntaxError) as err:
        raise ResourceError("the image is corrupt or cut short") from err
    image = ImageOps.exif_transpose(image)
    save_as = _SAVE_AS.get(fmt, "PNG")
    out = io.BytesIO()
    if save_as == "JPEG":
        if image.mode not in ("L", "RGB", "CMYK"):
            image = image.convert("RGB")
        image.save(out, format="JPEG", quality=90, icc_profile=image.info.get("icc_profile"))
    elif save_as == "WEBP":
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA")
        image.save(out, format="WEBP", quality=90)
    else:
        if image.mode in ("CMYK", "F"):
            image = image.convert("RGB")
        image.save(out, format="PNG")
    return Shrunk(out.getvalue(), MIME[save_as], image.width, image.height, width * height, downscaled=True)


def _open_lazily(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # over twice Pillow's own limit: refused before our check
        raise TooLargeError(max_pixels, None) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ResourceError(
            "the file is not an image that can be read (corrupt or unsupported format)"
        ) from err


def _check_size(image: Image.Image, max_pixels: int) -> None:
    if image.width * image.height > max_pixels:
        raise TooLargeError(max_pixels, image.size)
