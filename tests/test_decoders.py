"""The fast decoders: JPEG through libjpeg-turbo, class-id masks as unfiltered PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segray.data.decode import decode_image
from segray.data.shards import decode_mask_png, encode_mask_png


def _filter_bytes(png: bytes) -> np.ndarray:
    """The row filter types of a non-interlaced 8-bit single-channel PNG."""
    import struct
    import zlib

    pos, idat, width = 8, b"", 0
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind = png[pos + 4:pos + 8]
        if kind == b"IHDR":
            (width,) = struct.unpack_from(">I", png, pos + 8)
        elif kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    return np.frombuffer(zlib.decompress(idat), np.uint8).reshape(-1, width + 1)[:, 0]


def test_mask_png_is_unfiltered_and_read_without_pillow_only_when_whole():
    from segray.data import maskpng
    from segray.data.synthetic import render_scene

    _, scene = render_scene(np.random.default_rng(0), 128, 160)
    ours = encode_mask_png(scene)
    assert not _filter_bytes(ours).any()  # every row unfiltered
    assert (maskpng.decode_unfiltered(ours) == scene).all()
    assert (np.asarray(Image.open(io.BytesIO(ours))) == scene).all()  # an ordinary PNG
    buf = io.BytesIO()
    Image.fromarray(scene).save(buf, format="PNG", compress_level=9)
    assert len(ours) < len(buf.getvalue())  # label maps compress better unfiltered
    m16 = np.array([[0, 300, 65535]], np.uint16)
    assert maskpng.decode_unfiltered(encode_mask_png(m16)).tolist() == m16.tolist()

    # Pillow filters rows of a noisy map: those files are Pillow's to decode, and come out equal.
    noisy = np.random.default_rng(1).integers(0, 6, size=(40, 50), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG")
    assert _filter_bytes(buf.getvalue()).any()
    assert maskpng.decode_unfiltered(buf.getvalue()) is None
    assert (decode_mask_png(buf.getvalue()) == noisy).all()

    # Damage is an error, in our files and Pillow's: a flipped byte in the pixel data, and a file
    # cut short (Pillow alone accepts a file missing its last 20 bytes: checksum and IEND).
    for png in (ours, buf.getvalue()):
        start = png.index(b"IDAT") + 4
        flipped = png[:start + 5] + bytes([png[start + 5] ^ 0xFF]) + png[start + 6:]
        for bad, why in ((flipped, "fails its CRC"), (png[: len(png) - 20], "cut short")):
            with pytest.raises(ValueError, match=f"cannot decode mask bytes .*{why}"):
                decode_mask_png(bad)


def _jpeg(image: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_decode_image_jpeg_goes_to_libjpeg_turbo_with_pillows_pixels(monkeypatch):
    """Colour and greyscale JPEGs take the fast decoder and come out as Pillow decodes them;
    CMYK, and JPEGs with damage libjpeg recovers from, go to Pillow; a truncated one is an error."""
    import simplejpeg

    calls = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    rgb = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)

    def pillow(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    fast = {"4:2:0": _jpeg(Image.fromarray(rgb)),
            "4:4:4": _jpeg(Image.fromarray(rgb), subsampling=0),
            "progressive": _jpeg(Image.fromarray(rgb), progressive=True),
            "greyscale": _jpeg(Image.fromarray(rgb[..., 0]))}
    for name, data in fast.items():
        calls.clear()
        out = decode_image(data)
        assert calls, f"{name}: not decoded by libjpeg-turbo"
        assert out.dtype == np.uint8 and (out == pillow(data)).all(), name

    cmyk = _jpeg(Image.fromarray(rgb).convert("CMYK"))
    calls.clear()
    assert (decode_image(cmyk) == pillow(cmyk)).all() and not calls

    good = fast["4:2:0"]
    sos = good.index(b"\xff\xda")
    extraneous = good[:sos] + b"\x00\x00" + good[sos:]  # libjpeg: "2 extraneous bytes"
    with pytest.raises(ValueError):
        real(extraneous, strict=True)
    assert (decode_image(extraneous) == pillow(extraneous)).all()  # Pillow reads it

    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(good[: len(good) // 2])  # truncated: no silent grey half

    # Pillow's decompression-bomb limit holds for the fast path too (37x53 is over twice 500).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    calls.clear()
    with pytest.raises(ValueError, match="DecompressionBomb"):
        decode_image(good)
    assert not calls
