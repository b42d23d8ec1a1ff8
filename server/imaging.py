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

from server.exceptions import NotAnImage, TooLarge, UnreadableImage

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Decodes ``data``; raises ``TooLarge``, ``NotAnImage`` or ``UnreadableImage`` with a readable message."""
    if not data:
        raise NotAnImage("the image is empty")
    if len(data) > max_bytes:
        raise TooLarge(f"the image has {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            if image.format not in FORMATS:
                raise NotAnImage(f"unsupported image format {image.format}; use {FORMATS}")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise NotAnImage("the body is not an image PIL can read") from e
        raise TooLarge(f"decompression bomb refused: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"the image is truncated or corrupt: {e}") from e
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def content_hash(data: bytes) -> str:
    """Key of the backbone feature cache: the sha256 of the image bytes."""
    return hashlib.sha256(data).hexdigest()
