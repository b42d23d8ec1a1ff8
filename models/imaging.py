"""The one image decoder: bytes -> uint8 ``[3, H, W]`` RGB, upright (EXIF orientation applied).

Training, ``server-predict``, ``server-val`` and the server all decode through :func:`decode`, so a
phone photo taken upright is upright everywhere; where the image goes straight to the canvas,
through :func:`decode_reduced`, which decodes a large JPEG at a reduced scale. The pixel count is
read from the header before any pixel is decoded, so a decompression bomb is refused without
being expanded.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO", "AVIF")  # AVIF where this Pillow reads it
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis")  # ISO-BMFF major brands of HEVC HEIF
HEIF_REFUSED = (
    "the data is HEIF/HEIC (an iPhone's default photo format), which is not read here; send JPEG or PNG "
    "(on an iPhone: Settings > Camera > Formats > Most Compatible)"
)
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
ORIENTATION = 0x0112
REDUCED_MARGIN = 2  # a reduced decode keeps at least this many pixels per pixel of the resized image


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
    return _pixels(_open(data, max_pixels))


def decode_reduced(data: bytes, longest: int, max_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`decode` for an image about to be resized so that its longest side is ``longest`` px.

    A JPEG decodes at the smallest of its DCT scales (1/8, 1/4, 1/2) that keeps both sides at
    least twice as large as that resize will make them: libjpeg then skips most of the inverse
    DCT, so a 12 MP phone photo decodes many times faster (``bench.serve_load``'s 12 MP row), and
    the antialiased resize from twice the size gives within a few levels the pixels of a full
    decode (``tests/models/test_imaging.py``).
    Other formats, and JPEGs smaller than four times the target, decode in full.

    Returns:
        the image, uint8 ``[3, h, w]`` RGB (a channels-last view, see :func:`_pixels`), upright, at
        full or reduced scale; and the upright ``(H, W)`` of the full image, which boxes map back to.

    Raises:
        ImageDecodeError: as :func:`decode`.
    """
    image = _open(data, max_pixels)
    width, height = image.size
    with _decode_errors():
        if image.format in ("JPEG", "MPO"):
            scale = REDUCED_MARGIN * longest / max(width, height)
            image.draft(None, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
    drafted = image.size
    pixels = _pixels(image, contiguous=False)
    # The full image's size turned as the decoded pixels were: whoever applied the orientation (EXIF
    # transposition here, or Pillow's TIFF reader, which reports TIFF sizes upright already).
    turned = tuple(pixels.shape[1:]) != (drafted[1], drafted[0])
    return pixels, ((width, height) if turned else (height, width))


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image's header, checked for its format and pixel count; no pixel is decoded yet."""
    if not data:
        raise ImageDecodeError("not_an_image", "the image is empty")
    if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
        raise ImageDecodeError("not_an_image", HEIF_REFUSED)
    with _decode_errors(max_pixels):
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                "too_large", f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels"
            )
        if image.format not in FORMATS:
            raise ImageDecodeError("not_an_image", f"unsupported image format {image.format}; use {FORMATS}")
    return image


def _pixels(image: Image.Image, contiguous: bool = True) -> torch.Tensor:
    """Decodes the pixels of an opened image: uint8 ``[3, H, W]`` RGB, EXIF orientation applied.

    With ``contiguous=False`` the tensor is a ``[3, H, W]`` view of the decoded ``[H, W, 3]`` pixels
    (channels-last strides), one copy fewer: torchvision's antialiased uint8 resize works in that
    layout, so it is faster on it and gives the same bytes (``tests/models/test_imaging.py``).
    """
    with _decode_errors():
        image.load()
    ImageOps.exif_transpose(image, in_place=True)
    chw = torch.from_numpy(_rgb_array(image)).permute(2, 0, 1)
    return chw.contiguous() if contiguous else chw


def _rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB of a loaded image, a copy. 16-bit greyscale (modes ``I;16*``, and ``I``, in
    which Pillow opens some 16-bit files) maps ``0..65535`` onto ``0..255``: Pillow's own conversion clips
    at 255, which turns an industrial camera's 16-bit frame almost white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB")).copy()


@contextmanager
def _decode_errors(max_pixels: int | None = None) -> Iterator[None]:
    """PIL's exceptions (and its decompression-bomb warning) -> :class:`ImageDecodeError`. Pillow refuses
    a bomb while it reads the header, before :func:`_open` compares the size with ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        readable = ", ".join(f for f in FORMATS if f in Image.registered_extensions().values())
        raise ImageDecodeError("not_an_image", f"the data is not an image read here; send {readable}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        limit = "" if max_pixels is None else f"; the limit is {max_pixels} pixels"
        raise ImageDecodeError("too_large", f"the image has too many pixels{limit} (Pillow: {e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("unreadable", f"the image is truncated or corrupt: {e}") from e


def read_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """:func:`decode` of a file."""
    return decode(Path(path).read_bytes(), max_pixels)


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image as :func:`decode` returns it, from the header only."""
    with Image.open(path) as image:
        return _upright(image)


def _upright(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied, from the header only."""
    width, height = image.size
    if image.getexif().get(ORIENTATION, 1) not in TRANSPOSED:
        return width, height
    if image.format == "TIFF" and (width, height) != (image.tag_v2.get(256), image.tag_v2.get(257)):
        return width, height  # Pillow's TIFF reader reported it upright already (Pillow 13 does)
    return height, width
