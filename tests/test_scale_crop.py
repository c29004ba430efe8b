"""The CPU-side random rescale + crop/pad (MMSeg ``Resize`` + ``RandomCrop`` + ``Pad``): window
resampling against whole-image resizes, the image and label filters, ``cat_max_ratio``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segray.data.decode import random_scale_crop, resize_nearest


def test_resize_nearest_hand_worked():
    m = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    assert resize_nearest(m, (4, 6)).tolist() == [
        [1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6]]
    assert resize_nearest(m, (1, 3)).tolist() == [[4, 5, 6]]  # centre row 1.0 -> row 1


def test_random_scale_crop_pads_small_images():
    image = np.full((3, 4, 3), 200, np.uint8)
    mask = np.array([[0, 1, 1, 2]] * 3, dtype=np.uint8)
    out_img, out_mask = random_scale_crop(image, mask, crop=(6, 8), scale_range=(2.0, 2.0),
                                          rng=np.random.default_rng(0))
    # Scaled 2x to 6x8 exactly: fills the crop, mask is the nearest upsampling.
    assert out_mask.tolist() == [[0, 0, 1, 1, 1, 1, 2, 2]] * 6
    out_img, out_mask = random_scale_crop(image, mask, crop=(5, 6), scale_range=(1.0, 1.0),
                                          rng=np.random.default_rng(0))
    assert out_img.shape == (5, 6, 3) and out_mask.shape == (5, 6)
    assert (out_img[:3, :4] == 200).all() and (out_img[3:] == 0).all() and (out_img[:, 4:] == 0).all()
    assert (out_mask[:3, :4] == mask).all()
    assert (out_mask[3:] == 255).all() and (out_mask[:, 4:] == 255).all()
    *_, valid = random_scale_crop(image, mask, crop=(5, 6), scale_range=(1.0, 1.0),
                                  rng=np.random.default_rng(0), with_valid=True)
    assert valid == (3, 4)  # the image part, top-left; the rest is padding
    _, unl = random_scale_crop(image, None, crop=(4, 4), rng=np.random.default_rng(0))
    assert unl.dtype == np.uint8 and (unl == 255).all()


def test_random_scale_crop_fixed_size_and_label_set():
    rng = np.random.default_rng(1)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(5, 60, size=2))
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 3, 255], np.uint8), size=(h, w))
        out_img, out_mask = random_scale_crop(image, mask, crop=(32, 24), rng=rng)
        assert out_img.shape == (32, 24, 3) and out_img.dtype == np.uint8
        assert out_mask.shape == (32, 24) and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask).tolist()) <= {0, 3, 255}
    with pytest.raises(ValueError, match="mask is 2x2 but image is 3x3"):
        random_scale_crop(np.zeros((3, 3, 3), np.uint8), np.zeros((2, 2), np.uint8), (2, 2))
    with pytest.raises(ValueError, match="scale_range"):
        random_scale_crop(np.zeros((3, 3, 3), np.uint8), None, (2, 2), scale_range=(2.0, 1.0))


def _cv2_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2 ``INTER_LINEAR`` (mmcv's image resize), written out: 2x2 taps at
    ``(dst + 0.5) * scale - 0.5``, coordinates clamped at the borders."""
    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        lo = np.floor(f).astype(int)
        frac = f - lo
        frac[lo < 0], lo[lo < 0] = 0.0, 0
        frac[lo >= n_in - 1], lo[lo >= n_in - 1] = 0.0, n_in - 1
        return lo, np.minimum(lo + 1, n_in - 1), frac

    (y0, y1, fy), (x0, x1, fx) = taps(size[0], image.shape[0]), taps(size[1], image.shape[1])
    src, fx = image.astype(np.float64), fx[None, :, None]
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def _whole_resize(image: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    if resample == "cv2":
        return _cv2_linear(image, size)
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)).astype(float)


@pytest.mark.parametrize(("resample", "tolerance"), [("cv2", 1.0), ("pillow", 2.0)])
def test_random_scale_crop_matches_whole_image_resize_then_crop(resample, tolerance):
    """Resampling only the window gives the pixels of MMSeg's resize-everything-then-crop: masks
    exactly; images within fixed-point rounding of the filter's whole-image resize, at ratios
    that shrink and enlarge (cv2: 2x2 taps written out in NumPy; Pillow: its own resize, whose
    sums depend on the region it is given).

    Many windows lie inside their image, so too narrow a margin around the window (taps clamped
    at its edge instead of the image's) or a window off by a pixel shows beyond rounding."""
    rng = np.random.default_rng(7)
    for i in range(150):
        h, w = (int(v) for v in rng.integers(8, 120, size=2))
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 5, size=(h, w), dtype=np.uint8)
        crop = (int(rng.integers(4, 48)), int(rng.integers(4, 48)))
        out_img, out_mask = random_scale_crop(image, mask, crop, (0.4, 2.5), resample=resample,
                                              rng=np.random.default_rng(i))

        ref = np.random.default_rng(i)  # the same draws, the reference way
        factor = ref.uniform(0.4, 2.5)
        size = (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5)))
        big, big_mask = _whole_resize(image, size, resample), resize_nearest(mask, size)
        y0 = int(ref.integers(0, max(size[0] - crop[0], 0) + 1))
        x0 = int(ref.integers(0, max(size[1] - crop[1], 0) + 1))
        want = big[y0:y0 + crop[0], x0:x0 + crop[1]]
        want_mask = big_mask[y0:y0 + crop[0], x0:x0 + crop[1]]
        ch, cw = want_mask.shape
        assert (out_mask[:ch, :cw] == want_mask).all(), (h, w, crop, factor)
        assert (out_mask[ch:] == 255).all() and (out_mask[:, cw:] == 255).all()
        diff = np.abs(out_img[:ch, :cw] - want)
        assert diff.max() <= tolerance + 1e-9, (h, w, crop, factor, diff.max())
        assert (out_img[ch:] == 0).all() and (out_img[:, cw:] == 0).all()


def test_random_scale_crop_filters_differ_only_when_shrinking():
    """The two filters agree within a grey level when enlarging; when shrinking, Pillow's
    antialiased filter smooths a fine pattern that cv2's 2x2 taps alias, so the two recipes
    really train on different pixels (and a swapped filter would show here)."""
    rng = np.random.default_rng(3)
    for i in range(20):
        h, w = (int(v) for v in rng.integers(8, 60, size=2))
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        crop = (2 * h + 3, 2 * w + 3)  # all of the rescaled image fits
        cv, _ = random_scale_crop(image, None, crop, (1.0, 2.0), np.random.default_rng(i))
        pil, _ = random_scale_crop(image, None, crop, (1.0, 2.0), np.random.default_rng(i),
                                   resample="pillow")
        assert np.abs(cv.astype(int) - pil.astype(int)).max() <= 1
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel columns: the finest detail there is
    cv, _ = random_scale_crop(stripes, None, (32, 32), (0.5, 0.5), np.random.default_rng(0))
    pil, _ = random_scale_crop(stripes, None, (32, 32), (0.5, 0.5), np.random.default_rng(0),
                               resample="pillow")
    inner = (slice(None), slice(1, -1))  # Pillow's filter is cut at the border columns
    assert np.abs(pil[inner].astype(int) - 127.5).max() <= 1  # averaged to grey
    assert np.abs(cv.astype(int) - 127.5).max() <= 1  # 2x: cv2's taps straddle both columns
    cv, _ = random_scale_crop(stripes, None, (24, 24), (0.375, 0.375), np.random.default_rng(0))
    pil, _ = random_scale_crop(stripes, None, (24, 24), (0.375, 0.375), np.random.default_rng(0),
                               resample="pillow")
    assert cv.std() > 3 * pil.std()  # cv2 aliases the stripes into a coarser pattern
    with pytest.raises(ValueError, match="resample must be one of"):
        random_scale_crop(stripes, None, (8, 8), resample="bicubic")


def test_random_scale_crop_resize_ignores_the_aspect():
    """``resize`` squashes every image to one size (mmseg keep_ratio=False), then the ratio
    scales that size: MaskSup's 224x224 recipe is ``resize=(224, 224)`` at ratio 1."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, size=(30, 52, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, size=(30, 52), dtype=np.uint8)
    out, out_mask = random_scale_crop(image, mask, (16, 16), (1.0, 1.0), rng, resize=(16, 16))
    assert np.abs(out - _cv2_linear(image, (16, 16))).max() <= 1 + 1e-9  # the default filter
    pil, _ = random_scale_crop(image, mask, (16, 16), (1.0, 1.0), np.random.default_rng(0),
                               resize=(16, 16), resample="pillow")
    want = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR)).astype(int)
    assert np.abs(pil.astype(int) - want).max() <= 1  # MaskSup's: torchvision on PIL images
    assert (out_mask == resize_nearest(mask, (16, 16))).all()  # all of it: no crop, no pad
    out, out_mask = random_scale_crop(image, mask, (20, 20), (0.5, 0.5), rng, resize=(16, 24))
    assert (out_mask[:8, :12] == resize_nearest(mask, (8, 12))).all()  # (16, 24) x 0.5, padded
    assert (out_mask[8:] == 255).all() and (out_mask[:, 12:] == 255).all()
    with pytest.raises(ValueError, match="resize and base_scale exclude each other"):
        random_scale_crop(image, mask, (8, 8), resize=(8, 8), base_scale=(64, 32))


@pytest.mark.parametrize("shape", [(288, 384), (522, 775), (480, 640), (100, 90)])
def test_mask_resample_as_opencv_resizes_labels(shape):
    """``cv2_nearest`` / ``cv2_area`` are OpenCV's INTER_NEAREST / INTER_AREA of the labels (MaskSup's
    loaders), whole or in a random window; the default takes pixel centres and differs."""
    import cv2
    import torch

    from methods.masksup.metrics import official_target_resize

    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    binary = ((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 3) ** 2 < (shape[0] / 3) ** 2)
    binary = binary.astype(np.uint8)
    classes = rng.integers(0, 40, size=shape, dtype=np.uint8)
    size = (224, 224)
    _, nearest = random_scale_crop(image, classes, size, (1.0, 1.0), rng, resize=size,
                                   mask_resample="cv2_nearest")
    want = cv2.resize(classes, size[::-1], interpolation=cv2.INTER_NEAREST)
    assert (nearest == want).all()
    assert (nearest == official_target_resize(torch.from_numpy(classes), size,
                                              binary=False).numpy()).all()
    assert not (want == resize_nearest(classes, size)).all()  # the default differs
    _, area = random_scale_crop(image, binary, size, (1.0, 1.0), rng, resize=size,
                                mask_resample="cv2_area")
    assert (area == cv2.resize(binary, size[::-1], interpolation=cv2.INTER_AREA)).all()
    # A window of a rescale: the same pixels as resizing whole, then cropping (the window's
    # offset is found by search, not taken from the implementation).
    texture = ((xx // 3 + (yy // 5) * 7 + (xx * yy) % 11) % 3 == 0).astype(np.uint8)
    for mode, flag in (("cv2_area", cv2.INTER_AREA), ("cv2_nearest", cv2.INTER_NEAREST)):
        _, window, (vh, vw) = random_scale_crop(image, texture, (64, 64), (0.7, 0.7),
                                                np.random.default_rng(3), mask_resample=mode,
                                                with_valid=True)
        scaled = (int(shape[0] * 0.7 + 0.5), int(shape[1] * 0.7 + 0.5))
        whole = cv2.resize(texture, scaled[::-1], interpolation=flag)
        views = np.lib.stride_tricks.sliding_window_view(whole, (vh, vw))
        assert (views == window[:vh, :vw]).all(axis=(2, 3)).any(), mode
        assert (window[vh:] == 255).all() and (window[:, vw:] == 255).all()
    with pytest.raises(ValueError, match="needs a binary"):
        random_scale_crop(image, classes, (32, 32), (0.5, 0.5), rng, mask_resample="cv2_area")
    with pytest.raises(ValueError, match="mask_resample must be one of"):
        random_scale_crop(image, classes, (32, 32), mask_resample="area")


def test_cat_max_ratio_prefers_mixed_crops():
    image = np.zeros((100, 100, 3), np.uint8)
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 50:] = 1

    def balanced(ratio: float) -> int:
        """How many of 30 seeded crops have no class above 75 % of the pixels."""
        count = 0
        for seed in range(30):
            _, m = random_scale_crop(image, mask, (20, 20), (1.0, 1.0),
                                     np.random.default_rng(seed), cat_max_ratio=ratio)
            count += np.bincount(m.ravel()).max() / m.size < 0.75
        return count

    # One window is balanced with probability 9/81; ten tries give 1 - (72/81)**10 = 0.69.
    assert balanced(1.0) <= 8 and balanced(0.75) >= 15
