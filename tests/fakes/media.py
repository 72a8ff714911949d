"""Hostile media for tests: images whose header claims more pixels than they hold, audio whose header says
another length than it holds. Small files, made in milliseconds."""

from __future__ import annotations

import struct
import subprocess
import zlib

from .hf_server import png_bytes

__all__ = ["flac_claiming", "header_bomb", "silent_flac"]


def header_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels."""
    png = bytearray(png_bytes())
    ihdr = png[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def silent_flac(seconds: float) -> bytes:
    """Silence, 8 kHz mono, compresses to almost nothing: 11 minutes take 125 KB, an hour 700 KB. Written to a
    pipe, its header does not say its length (ffmpeg cannot seek back to write it)."""
    return subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", str(seconds),
         "-c:a", "flac", "-f", "flac", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip


def flac_claiming(flac: bytes, seconds: float) -> bytes:
    """``flac`` (8 kHz) with its STREAMINFO's total sample count (36 bits) set to ``seconds``."""
    data = bytearray(flac)
    assert data[:4] == b"fLaC"
    samples = round(seconds * 8000)
    info = 8  # "fLaC" and the metadata block header
    data[info + 13] = (data[info + 13] & 0xF0) | (samples >> 32)
    data[info + 14 : info + 18] = (samples & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)
