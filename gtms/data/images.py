"""An image's size read from its file header, so an oversized image is refused before decoding.

A 20000 x 20000 PNG of one colour is a few hundred KB on disk and 1.2 GB once decoded to RGB
(OpenCV needs several times that while decoding). :func:`check_image_pixels` reads the width and
height from the header with Pillow (which parses the header only) and refuses an image with more
pixels than a limit, like Pillow's own decompression-bomb guard; the default limit is Pillow's
(:data:`DEFAULT_MAX_IMAGE_PIXELS`, about 9459 x 9459). Callers decide the limit (the config key
``data.max_image_pixels``); 0 means no limit.
"""

from __future__ import annotations

import io
import struct

from gtms.config import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageHeaderError", "ImageSizeError", "ImageTooLargeError",
           "check_image_pixels", "image_size"]

_HEADER_ERRORS = (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError,
                  struct.error)


class ImageSizeError(ValueError):
    """An image whose size cannot be accepted (base class)."""


class ImageHeaderError(ImageSizeError):
    """The image's width and height cannot be read from its header."""


class ImageTooLargeError(ImageSizeError):
    """The header says the image has more pixels than the limit."""

    def __init__(self, name: str, height: int, width: int, limit: int):
        super().__init__(f"{name}: {width} x {height} = {width * height:,} pixels is over the "
                         f"limit of {limit:,} pixels")
        self.name, self.height, self.width, self.limit = name, height, width, limit

    @property
    def pixels(self) -> int:
        return self.height * self.width


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of encoded image bytes, from the header alone (nothing is decoded).

    Every format Pillow knows is tried, as ``PIL.Image.open`` does, but without Pillow's own
    decompression-bomb check, so that a limit above Pillow's can be configured.
    Raises :class:`ImageHeaderError` when no format reads the header.
    """
    from PIL import Image

    Image.preinit()  # the common formats first, in Image.open's order
    Image.init()
    prefix = bytes(data[:16])
    for name in list(Image.ID):
        factory, accept = Image.OPEN[name]
        try:
            verdict = accept(prefix) if accept else True
            if not verdict or isinstance(verdict, str):
                continue
            width, height = factory(io.BytesIO(data), "").size
        except _HEADER_ERRORS:
            continue
        return int(height), int(width)
    raise ImageHeaderError(f"no image format recognised in {len(data)} bytes starting "
                           f"{prefix[:8]!r}")


def check_image_pixels(data: bytes, max_pixels: int, *, name: str) -> None:
    """Refuse an image above ``max_pixels`` before it is decoded (0: no limit, nothing read).

    Raises :class:`ImageTooLargeError` (name, size and limit in the message) or
    :class:`ImageHeaderError` when the header cannot be read; ``name`` is the file or record.
    """
    if max_pixels <= 0:
        return
    try:
        height, width = image_size(data)
    except ImageHeaderError as err:
        raise ImageHeaderError(f"{name}: {err}") from None
    if height * width > max_pixels:
        raise ImageTooLargeError(name, height, width, max_pixels)
