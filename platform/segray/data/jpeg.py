"""Strict JPEG decoding through libjpeg-turbo (``simplejpeg``).

libjpeg "recovers" from damaged data: a scan cut short, a bad Huffman code or bytes where a marker
should be are only warnings to it, and it makes up the pixels it cannot read (grey rows, or rows
smeared from the last good one). Pillow decodes through libjpeg that way without a word, so a
JPEG cut to a third with an end marker appended decodes with its bottom two thirds made up. Here
every such warning is an error.

What changes no pixel is let through: stray bytes between the header's segments (some writers
leave them) and metadata libjpeg warns about (an unknown JFIF revision, say). A copy of the file
holding only what the decoder needs (tables, frame, scans: the same bytes, less the application
segments, comments and stray bytes) must then decode without any warning. Bytes after the end
marker are never read, by libjpeg or here.

Example:
    >>> decode(open("photo.jpg", "rb").read()).shape                 # doctest: +SKIP
    (480, 640, 3)
    >>> decode(cut_jpeg)                                              # doctest: +SKIP
    Traceback (most recent call last):
    ValueError: cannot decode image bytes (damaged JPEG data: libjpeg warns 'Corrupt JPEG data: ...
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

SOI = b"\xff\xd8\xff"
TURBO_COLORSPACES = ("YCbCr", "Gray")  # what libjpeg-turbo turns into RGB as Pillow does
_SOS, _EOI, _COM = 0xDA, 0xD9, 0xFE
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length
_APP = range(0xE0, 0xF0)


def decode(data: bytes) -> np.ndarray | None:
    """Decode JPEG bytes strictly to uint8 (H, W, 3) RGB, or say that Pillow should decode them.

    A colour or greyscale JPEG comes back decoded by libjpeg-turbo (the same pixels as Pillow's).
    A JPEG of another colour space (CMYK, YCCK, RGB), or one that passed only once its
    metadata was left out, is checked as strictly and then left to Pillow (None), as is a
    JPEG libjpeg-turbo's API cannot read at all (an unusual sampling layout, or damage libjpeg
    itself refuses: Pillow then refuses too, with its own message).

    Raises:
        ValueError: libjpeg warns about the data (it would make up pixels), naming its warning;
            or the image is past Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``;
            up to twice it Pillow only warns, as it always did).
    """
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data, strict=False)
    except (ValueError, KeyError):  # KeyError: a sampling layout it has no name for
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and h * w > limit:
        _pillow_size_check(data)
    fast = colorspace in TURBO_COLORSPACES
    target = "CMYK" if colorspace in ("CMYK", "YCCK") else "RGB"
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=target, strict=True)
        return pixels if fast else None  # other colour spaces: Pillow's conversion to RGB
    except ValueError as e:
        warning = str(e)
    bare = decoder_segments(data)
    if bare is not None:
        try:
            simplejpeg.decode_jpeg(bare, colorspace=target, strict=True)
            return None  # only the metadata or stray bytes were in the way: Pillow reads it
        except ValueError as e:
            warning = str(e)
    try:  # simplejpeg fails on a header warning even when lenient, hence `bare` first
        simplejpeg.decode_jpeg(bare or data, colorspace=target, strict=False)
    except ValueError:
        return None  # an error, not a warning: libjpeg-turbo cannot read it at all
    raise ValueError(f"cannot decode image bytes (damaged JPEG data: libjpeg warns {warning!r} "
                     "and would make up the pixels it cannot read; replace the file with an "
                     "intact copy)")


def decoder_segments(data: bytes) -> bytes | None:
    """``data`` less the application segments, comments and stray bytes before its first scan,
    or None when it has none of them (or its header cannot be walked).

    Bytes are skipped as libjpeg's ``next_marker`` skips them (anything up to an ``0xFF`` that
    starts a marker), so the result holds every table, the frame and the scans, byte for byte.
    Stray bytes after the first scan begins are kept: those are damaged entropy-coded data.

    Example:
        >>> decoder_segments(b"\\xff\\xd8" b"\\x00\\x00" b"\\xff\\xfe\\x00\\x03!" b"\\xff\\xda\\x00")
        b'\\xff\\xd8\\xff\\xda\\x00'
    """
    out, pos, dropped = bytearray(data[:2]), 2, False
    while pos < len(data):
        start = pos
        while pos < len(data) and data[pos] != 0xFF:
            pos += 1
        while pos + 1 < len(data) and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 1 >= len(data):
            return None
        marker = data[pos + 1]
        dropped |= pos > start
        if marker == 0x00:  # 0xFF 0x00 starts no marker: skipped too
            dropped, pos = True, pos + 2
            continue
        if marker == _SOS:
            return bytes(out + data[pos:]) if dropped else None
        if marker == _EOI:
            return None
        if marker in _STANDALONE:
            out += data[pos:pos + 2]
            pos += 2
            continue
        if pos + 4 > len(data):
            return None
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _APP or marker == _COM:
            dropped = True
        else:
            out += data[pos:end]
        pos = end
    return None


def _pillow_size_check(data: bytes) -> None:
    """Pillow's decompression-bomb check of the header (a warning, or past twice the limit an
    error), without decoding the image."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image bytes ({type(e).__name__}: {e})") from e
