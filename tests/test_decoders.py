"""The fast decoders: JPEG through libjpeg-turbo, class-id masks as unfiltered PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segray.data.decode import BadSampleError, decode_image
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
    CMYK is checked by it as strictly, then decoded by Pillow; stray bytes between header
    segments (no pixel changed) are read; a truncated JPEG is an error."""
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
    assert (decode_image(cmyk) == pillow(cmyk)).all() and calls  # Pillow's CMYK -> RGB

    good = fast["4:2:0"]
    sos = good.index(b"\xff\xda")
    extraneous = good[:sos] + b"\x00\x00" + good[sos:]  # libjpeg: "2 extraneous bytes"
    with pytest.raises(ValueError):
        real(extraneous, strict=True)
    assert (decode_image(extraneous) == pillow(extraneous)).all()  # no pixel depends on them

    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(good[: len(good) // 2])  # truncated: no silent grey half

    # Pillow's decompression-bomb limit holds for the fast path too (37x53 is over twice 500).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    calls.clear()
    with pytest.raises(ValueError, match="DecompressionBomb"):
        decode_image(good)
    assert not calls


def _gradient(h: int = 240, w: int = 320) -> np.ndarray:
    """A noisy colour gradient: enough entropy-coded data for damage to land in the scan."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([yy % 256, xx % 256, (xx + yy) // 2 % 256], -1)
    noise = np.random.default_rng(0).integers(0, 40, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def test_decode_image_refuses_jpeg_damage_that_libjpeg_would_paper_over():
    """libjpeg "recovers" from a cut or damaged scan by making up the rest (Pillow then returns
    grey or smeared rows without a word): every libjpeg warning is an error here, for every
    colour space. Stray bytes in the header, bytes after the end marker and 16-bit quantisation
    tables change no pixel and decode as Pillow decodes them."""
    from segray.data.decode import validate_sample

    rgb = _gradient()

    def pillow(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    variants = {"baseline": _jpeg(Image.fromarray(rgb)),
                "progressive": _jpeg(Image.fromarray(rgb), progressive=True),
                "greyscale": _jpeg(Image.fromarray(rgb[..., 0])),
                "cmyk": _jpeg(Image.fromarray(rgb).convert("CMYK"))}
    for name, good in variants.items():
        sos = good.index(b"\xff\xda")
        scan = len(good) - sos
        cut_with_eoi = good[: sos + scan // 3] + b"\xff\xd9"  # a third of the scan, then "end"
        if name != "progressive":  # (progressive: Pillow itself refuses this cut)
            assert pillow(cut_with_eoi).shape[:2] == rgb.shape[:2], name  # Pillow papers over it
            with pytest.raises(ValueError, match=r"cannot decode image bytes \(damaged JPEG data: "
                                                 r"libjpeg warns 'Corrupt JPEG data: premature "
                                                 r"end of data segment'"):
                decode_image(cut_with_eoi)
        with pytest.raises(ValueError, match="Premature end of JPEG file"):
            decode_image(good[: sos + scan // 2])
        # Legitimate files: stray header bytes (also a 0xFF 0x00 pair), trailing bytes past the
        # end marker.
        for extra in (good[:sos] + b"\x00\x00" + good[sos:],
                      good[:sos] + b"\xff\x00\x07" + good[sos:],
                      good + b"trailing bytes after EOI"):
            assert (decode_image(extra) == pillow(good)).all(), name
    good = variants["baseline"]
    # Stray bytes inside the scan (before the end marker): damaged entropy data, not a header.
    in_scan = good[:-2] + b"\x00\x00\x00" + good[-2:]
    pillow(in_scan)
    with pytest.raises(ValueError, match="extraneous bytes before marker 0xd9"):
        decode_image(in_scan)
    # The same stray bytes in the header *and* a cut scan: the header is cleaned, the cut found.
    sos = good.index(b"\xff\xda")
    both = good[:sos] + b"\x00\x00" + good[sos:sos + (len(good) - sos) // 3] + b"\xff\xd9"
    with pytest.raises(ValueError, match="premature end of data segment"):
        decode_image(both)
    q16 = _jpeg(Image.fromarray(rgb), qtables=[list(range(300, 364))] * 2)  # 16-bit tables
    assert (decode_image(q16) == pillow(q16)).all()
    # Metadata libjpeg warns about (JFIF revision 2.01) changes no pixel; behind it, a cut scan
    # is still found.
    jfif = good.index(b"JFIF\x00")
    revised = good[:jfif + 5] + b"\x02" + good[jfif + 6:]
    assert (decode_image(revised) == pillow(good)).all()
    with pytest.raises(ValueError, match="premature end of data segment"):
        decode_image(revised[: sos + (len(good) - sos) // 3] + b"\xff\xd9")
    # Through the row check: a clear error naming shard and key.
    cut = good[: sos + (len(good) - sos) // 3] + b"\xff\xd9"
    with pytest.raises(BadSampleError, match=r"bad sample 'k1' in shard s3://b/d/train-00002"
                                             r"\.parquet: image: cannot decode image bytes "
                                             r"\(damaged JPEG"):
        validate_sample(cut, None, num_classes=2, shard="s3://b/d/train-00002.parquet", key="k1")


def test_decode_image_checks_png_chunks():
    """A PNG image whose pixel data decodes but whose checksum is damaged, or that ends before
    its IEND chunk, is an error (Pillow accepts both), as it is for masks."""
    buf = io.BytesIO()
    Image.fromarray(_gradient(60, 80)).save(buf, format="PNG")
    png = buf.getvalue()
    crc = png.index(b"IEND") - 5  # the last byte of the IDAT chunk's CRC
    damaged = png[:crc] + bytes([png[crc] ^ 1]) + png[crc + 1:]
    for bad, why in ((damaged, "fails its CRC"), (png[:-12], "before its IEND chunk")):
        assert np.asarray(Image.open(io.BytesIO(bad)).convert("RGB")).shape == (60, 80, 3)
        with pytest.raises(ValueError, match=f"cannot decode image bytes .*{why}"):
            decode_image(bad)
    assert decode_image(png).shape == (60, 80, 3)
    with pytest.raises(ValueError, match="cannot decode image bytes"):
        decode_image(png[: len(png) // 2])  # cut in the pixel data: Pillow refused it already
