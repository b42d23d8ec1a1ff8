"""Request image bytes -> uint8 ``[3, H, W]`` RGB tensor, within byte and pixel limits, through the
one decoder :func:`models.imaging.decode` (EXIF orientation applied); its errors become the API's."""

from __future__ import annotations

import hashlib

import torch

from models.imaging import ImageDecodeError, decode
from server.exceptions import NotAnImage, TooLarge, UnreadableImage

ERRORS = {"not_an_image": NotAnImage, "too_large": TooLarge, "unreadable": UnreadableImage}


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Decodes ``data``; raises ``TooLarge``, ``NotAnImage`` or ``UnreadableImage`` with a readable message."""
    if len(data) > max_bytes:
        raise TooLarge(f"the image has {len(data)} bytes; the limit is {max_bytes}")
    try:
        return decode(data, max_pixels)
    except ImageDecodeError as e:
        raise ERRORS[e.kind](str(e)) from e


def content_hash(data: bytes) -> str:
    """Key of the backbone feature cache: the sha256 of the image bytes."""
    return hashlib.sha256(data).hexdigest()
