"""Tests for segray.inference: MMSegmentation's window grid, count-map averaging, TTA passes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segray.inference import (
    resize_keep_ratio,
    segment,
    slide_inference,
    slide_windows,
    tta_scales,
    whole_inference,
)


@pytest.fixture
def conv() -> torch.nn.Conv2d:
    """A fixed 1x1 conv: translation-, flip- and (bilinear) resize-equivariant."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 5, 1).eval()


class Recorder:
    """Wraps a predict_fn and keeps every input it was called with."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.fn(x)


def test_cityscapes_grid_769_513():
    windows = slide_windows(1024, 2048, (769, 769), (513, 513))
    assert len(windows) == 8
    assert sorted({(y0, y1) for y0, y1, _, _ in windows}) == [(0, 769), (255, 1024)]
    xs = sorted({(x0, x1) for _, _, x0, x1 in windows})
    assert xs == [(0, 769), (513, 1282), (1026, 1795), (1279, 2048)]


def test_ade_grid_512_341():
    assert slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]


def test_crop_larger_than_image_is_one_window():
    assert slide_windows(30, 40, 64, 32) == [(0, 30, 0, 40)]
    assert slide_windows(30, 100, (64, 48), (32, 32)) == [
        (0, 30, 0, 48),
        (0, 30, 32, 80),
        (0, 30, 52, 100),
    ]


def test_slide_averages_logits_with_count_map():
    # Logit = column index inside the window; windows [0,3) and [2,5) overlap on column 2.
    def local_x(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ramp = torch.arange(w, dtype=torch.float32).expand(b, 1, h, w)
        return torch.cat([ramp, torch.zeros_like(ramp)], dim=1)

    out = slide_inference(local_x, torch.zeros(1, 3, 1, 5), (1, 3), (1, 2), num_classes=2)
    assert out[0, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 2.0]


@pytest.mark.parametrize("window_batch,pad_to", [(1, None), (3, 8)])
def test_slide_equals_whole_for_translation_equivariant_fn(conv, window_batch, pad_to):
    image = torch.randn(2, 3, 40, 52)
    whole = whole_inference(conv, image)
    slide = slide_inference(conv, image, 24, 16, 5, pad_to=pad_to, window_batch=window_batch)
    assert slide.shape == (2, 5, 40, 52)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_whole_pads_to_multiple_and_crops_back(conv):
    rec = Recorder(conv)
    image = torch.randn(1, 3, 33, 47)
    out = whole_inference(rec, image, pad_to=32, num_classes=5)
    assert tuple(rec.inputs[0].shape[-2:]) == (64, 64)
    assert rec.inputs[0][..., 33:, :].abs().sum() == 0  # bottom padding is zeros
    torch.testing.assert_close(out, conv(image))


def test_low_resolution_logits_are_upsampled_to_input():
    def half_res(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x[:, :2], 2)

    assert whole_inference(half_res, torch.randn(1, 3, 16, 20)).shape == (1, 2, 16, 20)


def test_resize_keep_ratio_mmcv_rule():
    assert resize_keep_ratio(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert resize_keep_ratio(1024, 2048, (2048, 512)) == (512, 1024)
    assert resize_keep_ratio(512, 683, (2048, 512)) == (512, 683)
    # factor = 512/375; 500 * factor = 682.67 rounds half-up to 683.
    assert resize_keep_ratio(375, 500, (512, 2048)) == (512, 683)


def test_tta_scales_mmseg_0x():
    # MMSeg 0.x test_tta.py on a 288x512 image.
    assert tta_scales(288, 512, [0.5, 1.0, 2.0], (512, 512)) == [
        (256, 256),
        (512, 512),
        (1024, 1024),
    ]
    assert tta_scales(288, 512, [0.5, 1.0, 2.0], None) == [(256, 144), (512, 288), (1024, 576)]


def test_tta_passes_scales_and_flip_pattern(conv):
    rec = Recorder(conv)
    image = torch.randn(1, 3, 18, 32)
    segment(rec, image, num_classes=5, tta=True, ratios=(0.5, 1.0, 2.0), test_scale=(32, 32))
    sizes = [tuple(x.shape[-2:]) for x in rec.inputs]
    assert sizes == [(9, 16), (9, 16), (18, 32), (18, 32), (36, 64), (36, 64)]
    for plain, flipped in zip(rec.inputs[::2], rec.inputs[1::2]):  # pattern F, T, F, T, F, T
        torch.testing.assert_close(flipped, plain.flip(-1))
    torch.testing.assert_close(rec.inputs[2], image)


def test_single_pass_at_test_scale(conv):
    rec = Recorder(conv)
    probs = segment(rec, torch.randn(2, 3, 20, 40), num_classes=5, test_scale=(20, 10))
    assert [tuple(x.shape[-2:]) for x in rec.inputs] == [(10, 20)]
    assert probs.shape == (2, 5, 20, 40)


def test_flip_tta_equals_plain_for_flip_equivariant_fn(conv):
    image = torch.randn(2, 3, 24, 30)
    plain = segment(conv, image, num_classes=5)
    torch.testing.assert_close(plain, conv(image).softmax(1))
    flip_tta = segment(conv, image, num_classes=5, tta=True, ratios=(1.0,))
    torch.testing.assert_close(flip_tta, plain)
    # Resizing a spatially constant image is exact, so every scale agrees too.
    flat = torch.randn(1, 3, 1, 1).expand(1, 3, 24, 30).contiguous()
    multi = segment(conv, flat, num_classes=5, mode="slide", crop=16, stride=8, tta=True)
    torch.testing.assert_close(multi, segment(conv, flat, num_classes=5))


def test_flipped_pass_is_unflipped_before_averaging():
    # Logits depend on position only: the flipped pass must come back mirrored.
    def ramp(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        col = torch.arange(w, dtype=torch.float32).expand(b, 1, h, w)
        return torch.cat([col, torch.zeros_like(col)], dim=1)

    probs = segment(ramp, torch.zeros(1, 3, 2, 4), num_classes=2, tta=True, ratios=(1.0,))
    sig = [1 / (1 + math.exp(-x)) for x in range(4)]
    expected = [(sig[i] + sig[3 - i]) / 2 for i in range(4)]
    torch.testing.assert_close(probs[0, 0, 0], torch.tensor(expected))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"mode": "slide", "crop": 16, "stride": 10}, {"tta": True, "ratios": (0.75, 1.25)}],
)
def test_output_is_probabilities_at_original_size(conv, kwargs):
    probs = segment(conv, torch.randn(2, 3, 21, 27), num_classes=5, pad_to=8, **kwargs)
    assert probs.shape == (2, 5, 21, 27) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 21, 27))


def test_bad_arguments_raise(conv):
    image = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="whole, slide"):
        segment(conv, image, num_classes=5, mode="sliding")
    with pytest.raises(ValueError, match="needs crop and stride"):
        segment(conv, image, num_classes=5, mode="slide")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        segment(conv, image[0], num_classes=5)
    with pytest.raises(ValueError, match="num_classes is 4"):
        segment(conv, image, num_classes=4)
    with pytest.raises(ValueError, match="pad_to"):
        whole_inference(conv, image, pad_to=0)
    with pytest.raises(ValueError, match="crop"):
        slide_windows(16, 16, (0, 8), 4)
    with pytest.raises(ValueError, match="ratios"):
        tta_scales(16, 16, [], None)
