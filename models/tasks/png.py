"""A small PNG decoder for grayscale images (standard library + numpy only).

``models/`` may not import Pillow, yet training reads Omniglot's PNGs: this decodes
non-interlaced grayscale PNGs (colour type 0) of bit depth 1, 2, 4, 8 or 16 with any of
the five row filters, and returns a ``(H, W)`` uint8 array where 0 is black and 255
white (low bit depths are scaled up as Pillow's ``convert("L")`` does; 16-bit keeps the
high byte). The service decodes uploads with Pillow; this is for the training data.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PNGError(ValueError):
    """The bytes are not a PNG this decoder handles."""


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(SIGNATURE):
        raise PNGError("not a PNG (bad signature)")
    out: list[tuple[bytes, bytes]] = []
    pos = len(SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise PNGError(f"truncated {kind!r} chunk")
        out.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            break
    return out


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the per-row filters: ``raw`` is height * (1 + stride) bytes -> (height, stride)."""
    if len(raw) < height * (1 + stride):
        raise PNGError("image data too short")
    rows = np.frombuffer(raw, dtype=np.uint8)[: height * (1 + stride)].reshape(height, 1 + stride)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for r in range(height):
        kind = int(rows[r, 0])
        line = rows[r, 1:].astype(np.int64)
        if kind == 0:  # None
            cur = line
        elif kind == 2:  # Up
            cur = (line + prev) & 0xFF
        elif kind in (1, 3, 4):  # Sub, Average, Paeth: sequential along the row
            cur_list = line.tolist()
            up = prev.tolist()
            for i in range(stride):
                left = cur_list[i - bpp] if i >= bpp else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up[i]) >> 1
                else:
                    pred = _paeth(left, up[i], up[i - bpp] if i >= bpp else 0)
                cur_list[i] = (cur_list[i] + pred) & 0xFF
            cur = np.asarray(cur_list, dtype=np.int64)
        else:
            raise PNGError(f"unknown row filter {kind}")
        out[r] = cur
        prev = cur
    return out


def decode_gray(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8 grayscale, 0 = black, 255 = white."""
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR":
        raise PNGError("missing IHDR")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    if colour != 0:
        raise PNGError(f"colour type {colour} not supported (grayscale only)")
    if depth not in (1, 2, 4, 8, 16):
        raise PNGError(f"bit depth {depth} not valid for grayscale")
    if compression != 0 or filtering != 0 or interlace != 0:
        raise PNGError("only deflate, adaptive filtering and no interlace are supported")
    try:
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    except zlib.error as exc:
        raise PNGError(f"corrupt image data: {exc}") from exc
    bits = width * depth
    stride = (bits + 7) // 8
    bpp = max(1, depth // 8)  # bytes per pixel for the filters (1 for depths below 8)
    rows = _unfilter(raw, height, stride, bpp)  # (H, stride) uint8
    if depth == 16:
        return np.ascontiguousarray(rows.reshape(height, width, 2)[:, :, 0])
    if depth == 8:
        return np.ascontiguousarray(rows[:, :width])
    levels = np.unpackbits(rows, axis=1)  # (H, stride * 8) bits, most significant first
    levels = levels[:, : width * depth].reshape(height, width, depth)
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint16)
    values = (levels.astype(np.uint16) * weights).sum(-1)  # (H, W) in 0 .. 2**depth - 1
    return (values * 255 // ((1 << depth) - 1)).astype(np.uint8)
