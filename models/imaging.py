"""The one image decoder: bytes -> uint8 ``[3, H, W]`` RGB, upright (EXIF orientation applied).

Training, ``server-predict``, ``server-val`` and the server all decode through :func:`decode`, so a
phone photo taken upright is upright everywhere. The pixel count is read from the header before
any pixel is decoded, so a decompression bomb is refused without being expanded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """An image that cannot be decoded. ``kind``: ``not_an_image``, ``too_large`` or ``unreadable``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode(data: bytes, max_pixels: int | None = None) -> torch.Tensor:
    """Decodes encoded image bytes into uint8 ``[3, H, W]`` RGB with EXIF orientation applied.

    Raises:
        ImageDecodeError: empty or not an image, more than ``max_pixels`` pixels, truncated or corrupt.
    """
    if not data:
        raise ImageDecodeError("not_an_image", "the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            if image.format not in FORMATS:
                raise ImageDecodeError("not_an_image", f"unsupported image format {image.format}; use {FORMATS}")
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not_an_image", "the data is not an image PIL can read") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_large", f"decompression bomb refused: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("unreadable", f"the image is truncated or corrupt: {e}") from e
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """:func:`decode` of a file."""
    return decode(Path(path).read_bytes(), max_pixels)


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image as :func:`decode` returns it, from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ORIENTATION, 1)
    return (height, width) if orientation in TRANSPOSED else (width, height)
