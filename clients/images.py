"""Images as the client accepts them: a path, encoded bytes, a PIL image or an RGB array."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

Image = Any  # str | Path | bytes | PIL.Image.Image | numpy.ndarray; Pillow and NumPy stay optional


def image_bytes(image: Image) -> bytes:
    """Encoded image bytes to send.

    Args:
        image: a file path; already-encoded bytes (JPEG, PNG, WebP...); a PIL image; or a numpy
            ``uint8`` array, ``(H, W, 3)`` RGB or ``(H, W)`` grey (OpenCV's BGR arrays: pass
            ``array[..., ::-1]``). PIL images and arrays are sent as PNG, losslessly.

    Raises:
        TypeError: anything else, or an array that is not ``uint8`` ``(H, W[, 3])``.
        ImportError: an array was given and Pillow is not installed.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        return _png(image)
    if hasattr(image, "__array_interface__"):  # a numpy array (or anything exposing one)
        return _png(_from_array(image))
    raise TypeError(f"an image must be a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")


def _from_array(array: Any) -> Any:
    try:
        from PIL import Image as PILImage
    except ImportError:
        raise ImportError("sending numpy arrays needs Pillow: pip install 'sidecar-client[images]'") from None
    shape, dtype = tuple(array.shape), str(array.dtype)
    if dtype != "uint8" or not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
        raise TypeError(f"an image array must be uint8 (H, W, 3) RGB or (H, W) grey, not {dtype} {shape}")
    return PILImage.fromarray(array)


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
