"""Request image bytes -> uint8 RGB tensor, within byte and pixel limits, through the one decoder
:mod:`models.imaging` (EXIF orientation applied); its errors become the API's."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from models.imaging import ImageDecodeError, decode
from models.transform import ImageMeta, ImageTransform
from server.exceptions import NotAnImage, TooLarge, UnreadableImage

ERRORS = {"not_an_image": NotAnImage, "too_large": TooLarge, "unreadable": UnreadableImage}


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Decodes ``data``; raises ``TooLarge``, ``NotAnImage`` or ``UnreadableImage`` with a readable message."""
    with _api_errors(data, max_bytes):
        return decode(data, max_pixels)


def load_image(
    data: bytes, transform: ImageTransform, max_bytes: int, max_pixels: int
) -> tuple[torch.Tensor, ImageMeta]:
    """``data`` decoded (at a reduced scale where it can be) and resized for the canvas: uint8 ``[3, h, w]``
    and its meta (:meth:`ImageTransform.load`); raises as :func:`decode_image`."""
    with _api_errors(data, max_bytes):
        return transform.load(data, max_pixels)


@contextmanager
def _api_errors(data: bytes, max_bytes: int) -> Iterator[None]:
    """Refuses more than ``max_bytes``; the decoder's errors become the API's."""
    if len(data) > max_bytes:
        raise TooLarge(f"the image has {len(data)} bytes; the limit is {max_bytes}")
    try:
        yield
    except ImageDecodeError as e:
        raise ERRORS[e.kind](str(e)) from e


def content_hash(data: bytes) -> str:
    """Key of the backbone feature cache: the sha256 of the image bytes."""
    return hashlib.sha256(data).hexdigest()
