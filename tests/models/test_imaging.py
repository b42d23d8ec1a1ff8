"""The one decoder's reduced path: a large JPEG decodes at a DCT scale, and lands on the same canvas
(within JPEG's own resampling error) with the same box mapping as a full decode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from models.imaging import ImageDecodeError, decode, decode_reduced, upright_size
from models.transform import ImageTransform, PreprocessSpec
from tuners.data.synth import photo


def encoded(size: tuple[int, int], fmt: str = "JPEG", orientation: int = 1) -> bytes:
    """scikit-image's astronaut at ``size`` (width, height), encoded; EXIF orientation when not 1."""
    picture = Image.open(photo("astronaut.png")).convert("RGB").resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    picture.save(buffer, format=fmt, exif=exif, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_a_large_jpeg_decodes_at_a_dct_scale_onto_the_same_canvas() -> None:
    data = encoded((1600, 1200))
    transform = ImageTransform(PreprocessSpec(size=320))
    reduced, size = decode_reduced(data, 320)
    assert size == (1200, 1600) and tuple(reduced.shape) == (3, 600, 800)  # 1/2: the smallest scale >= 2 x (320 x 240)
    fast, fast_meta = transform.load(data)
    full, full_meta = transform.resize(decode(data))
    assert fast_meta == full_meta and fast.shape == full.shape == (3, 240, 320)
    diff = (fast.float() - full.float()).abs()
    assert diff.mean() < 0.5 and diff.max() < 12  # uint8 levels, libjpeg scaled IDCT vs full (measured 0.28, 6)


def test_an_exif_rotated_jpeg_reduces_and_maps_back_to_its_upright_size() -> None:
    data = encoded((1600, 1200), orientation=6)  # stored landscape, viewed portrait
    reduced, size = decode_reduced(data, 320)
    assert size == (1600, 1200) and tuple(reduced.shape) == (3, 800, 600)
    resized, meta = ImageTransform(PreprocessSpec(size=320)).load(data)
    assert meta.original_size == (1600, 1200) and tuple(resized.shape) == (3, 320, 240)
    assert resized.shape == ImageTransform(PreprocessSpec(size=320)).resize(decode(data))[0].shape


@pytest.mark.parametrize(("size", "fmt"), [((1600, 1200), "PNG"), ((1200, 900), "JPEG")])
def test_other_formats_and_small_jpegs_decode_in_full(size: tuple[int, int], fmt: str) -> None:
    data = encoded(size, fmt)
    reduced, full_size = decode_reduced(data, 320)
    assert full_size == (size[1], size[0]) and torch.equal(reduced, decode(data))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("size", "orientation"), [((512, 512), 1), ((640, 480), 6), ((37, 1200), 3), ((1200, 900), 8)]
)
def test_the_channels_last_decode_resizes_to_the_same_bytes(
    size: tuple[int, int], orientation: int, threads: int
) -> None:
    """The request path resizes a channels-last view of the decoded pixels; the bytes are those of a
    contiguous image, so tasks see what they were trained on, whatever the thread count."""
    data, previous = encoded(size, orientation=orientation), torch.get_num_threads()
    reduced, full_size = decode_reduced(data, 640)  # no DCT scaling: the same pixels as decode
    assert not reduced.is_contiguous() and torch.equal(reduced, decode(data)) and decode(data).is_contiguous()
    transform = ImageTransform(PreprocessSpec(size=320))
    torch.set_num_threads(threads)
    try:
        assert torch.equal(transform.resize(reduced, full_size)[0], transform.resize(reduced.contiguous())[0])
    finally:
        torch.set_num_threads(previous)


def test_the_reduced_path_refuses_what_decode_refuses() -> None:
    with pytest.raises(ImageDecodeError) as e:
        decode_reduced(encoded((1600, 1200)), 320, max_pixels=1_000_000)
    assert e.value.kind == "too_large"
    with pytest.raises(ImageDecodeError) as e:
        decode_reduced(encoded((1600, 1200))[:5000], 320)
    assert e.value.kind == "unreadable"
    with pytest.raises(ImageDecodeError) as e:
        decode_reduced(b"not an image", 320)
    assert e.value.kind == "not_an_image"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8_000, 10_000, 60_000])  # under, between and over Pillow's two bomb limits
def test_a_huge_header_is_refused_with_the_limit_asked_for(side: int) -> None:
    for read in (lambda data: decode(data, 10_000_000), lambda data: decode_reduced(data, 320, 10_000_000)):
        with pytest.raises(ImageDecodeError, match="the limit is 10000000 pixels") as e:
            read(png_header(side, side))
        assert e.value.kind == "too_large"


def test_the_canvas_is_the_normalised_image_padded_with_zeros() -> None:
    spec = PreprocessSpec(size=320)
    resized = torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8)
    canvas = ImageTransform(spec).canvas(resized)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    assert torch.equal(canvas[:, :240], (resized.float() / 255.0 - mean) / std)  # bit for bit
    assert canvas.shape == (3, 320, 320) and not canvas[:, 240:].any()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_every_lossless_format_turns_pixels_and_size_alike(fmt: str, orientation: int, tmp_path) -> None:
    """Pillow's TIFF reader applies the orientation itself and reports the upright size at open; the
    size boxes map back to must still be the decoded pixels' (it was turned twice for TIFF)."""
    reference = decode(encoded((120, 80), "PNG", orientation))
    data = encoded((120, 80), fmt, orientation)
    (tmp_path / f"a.{fmt.lower()}").write_bytes(data)
    reduced, size = decode_reduced(data, 320)
    assert size == tuple(reduced.shape[1:]) == tuple(reference.shape[1:])
    assert upright_size(tmp_path / f"a.{fmt.lower()}") == (size[1], size[0])
    if fmt != "WEBP":  # lossy by default
        assert torch.equal(reduced, reference)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_maps_its_range_onto_8_bits(fmt: str) -> None:
    """Pillow's own conversion of 16-bit greyscale clips at 255: a mid-grey frame came out white."""
    values = np.array([[0, 257, 32767, 32768], [40000, 65279, 65534, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format=fmt)
    decoded = decode(buffer.getvalue())
    expected = torch.tensor([[0, 1, 127, 128], [156, 254, 255, 255]], dtype=torch.uint8)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    assert decoded.shape == (3, 2, 4) and all(torch.equal(channel, expected) for channel in decoded)


def test_a_refused_image_says_what_is_read_and_names_heic() -> None:
    """An iPhone's default HEIC photo is not read; the answer says so and how to send JPEG instead."""
    with pytest.raises(ImageDecodeError, match="send JPEG, PNG, WEBP") as unknown:
        decode(b"hello, not an image")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an ISO-BMFF header, brand heic
    with pytest.raises(ImageDecodeError, match="HEIF/HEIC .* Most Compatible") as iphone:
        decode(heic)
    assert unknown.value.kind == iphone.value.kind == "not_an_image"


@pytest.mark.skipif("AVIF" not in Image.registered_extensions().values(), reason="this Pillow reads no AVIF")
def test_avif_decodes_where_pillow_reads_it() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 30, 10)).save(buffer, format="AVIF")
    decoded = decode(buffer.getvalue())
    assert decoded.shape == (3, 40, 60) and abs(int(decoded[0, 20, 30]) - 200) < 8
