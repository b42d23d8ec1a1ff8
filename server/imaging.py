"""Image bytes -> uint8 ``[3, H, W]`` RGB tensor, within byte and pixel limits.

The pixel count is read from the header before any pixel is decoded, so a decompression bomb is
refused without being expanded. EXIF orientation is applied, as phone photos need.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import ServerError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Decodes ``data``; raises :class:`ServerError` 413, 415 or 422 with a readable message."""
    if not data:
        raise ServerError(415, "not_an_image", "the image is empty")
    if len(data) > max_bytes:
        raise ServerError(413, "too_large", f"the image has {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ServerError(
                    413, "too_large", f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            if image.format not in FORMATS:
                raise ServerError(415, "not_an_image", f"unsupported image format {image.format}; use {FORMATS}")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise ServerError(415, "not_an_image", "the body is not an image PIL can read") from e
        raise ServerError(413, "too_large", f"decompression bomb refused: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ServerError(422, "unreadable_image", f"the image is truncated or corrupt: {e}") from e
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def content_hash(data: bytes) -> str:
    """Key of the backbone feature cache: the sha256 of the image bytes."""
    return hashlib.sha256(data).hexdigest()
