"""Image size from the header, and the pixel limit applied before decoding (gtms.data.images)."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from gtms.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageHeaderError,
    ImageTooLargeError,
    check_image_pixels,
    image_size,
)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR (+ IEND): what a header parser sees of a huge PNG, in 45 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_default_limit_is_pillows():
    assert DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm", ".gif"])
def test_size_from_header_for_the_formats_opencv_writes(ext):
    image = np.zeros((23, 41, 3), np.uint8)
    ok, encoded = cv2.imencode(ext, image)
    assert ok
    assert image_size(encoded.tobytes()) == (23, 41)


def test_huge_header_is_read_without_pillows_own_bomb_error():
    data = png_header_only(20000, 20000)   # 400 M pixels: over 2x Pillow's limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert image_size(data) == (20000, 20000)
    check_image_pixels(data, 400_000_000, name="big.png")   # a raised limit lets it through


def test_limit_names_file_size_and_limit():
    data = png_header_only(20000, 10000)
    with pytest.raises(ImageTooLargeError) as info:
        check_image_pixels(data, DEFAULT_MAX_IMAGE_PIXELS, name="scan.png")
    assert str(info.value) == ("scan.png: 20000 x 10000 = 200,000,000 pixels is over the limit "
                               "of 89,478,485 pixels")
    assert info.value.pixels == 200_000_000


def test_limit_is_inclusive_and_zero_disables():
    data = png_header_only(300, 200)
    check_image_pixels(data, 60_000, name="x")
    with pytest.raises(ImageTooLargeError):
        check_image_pixels(data, 59_999, name="x")
    check_image_pixels(b"not an image", 0, name="x")   # no limit: the header is not even read


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n"])
def test_unreadable_header_names_the_file(data):
    with pytest.raises(ImageHeaderError, match="^bad.bin: no image format recognised"):
        check_image_pixels(data, DEFAULT_MAX_IMAGE_PIXELS, name="bad.bin")
