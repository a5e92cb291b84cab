"""Uploaded images: base64 PNG or JPEG in, a grayscale array out, or a domain error.

Only the header is read before the size check, so a decompression bomb (a small file
that claims a huge canvas) is refused before any pixel is decoded. Transparent pixels
are composited onto white (the paper of a drawing) before the grayscale conversion.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput, TooLarge

FORMATS = ("PNG", "JPEG")


def decode(text: str, *, field: str, max_pixels: int) -> np.ndarray:
    """A base64 PNG/JPEG (optionally a ``data:image/...;base64,`` URL) -> (H, W) uint8."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(field, "not base64 (send a base64-encoded PNG or JPEG)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:  # an OSError: before the one below
            raise InvalidInput(field, "not a PNG or JPEG image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise TooLarge(f"{field}: the image exceeds the limit of {max_pixels} pixels") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error):
            # the headers themselves: a JPEG cut inside its first segment (OSError), a PNG
            # text or colour-profile chunk that inflates past Pillow's limit (ValueError)
            raise InvalidInput(field, "the image is truncated or corrupt") from None
        width, height = image.size
        if width * height > max_pixels:
            raise TooLarge(
                f"{field}: {width}x{height} image exceeds the limit of {max_pixels} pixels"
            )
        try:
            return _grayscale(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning):
            raise InvalidInput(field, "the image is truncated or corrupt") from None


def _grayscale(image: Image.Image) -> np.ndarray:
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)  # (H, W), 0 black .. 255 white
