"""MaskSup's hole masks (free-form strokes and square patches) and masked images."""

from __future__ import annotations

import pytest
import torch

from methods.masksup import mask_images, random_holes, resolve_ratio_range


def _holes(kind: str, b: int = 4, h: int = 64, w: int = 64, seed: int = 0, **kw) -> torch.Tensor:
    args = {"mask_ratio": None, "patch_size": 16, "ratio_range": (0.5, 0.6), **kw}
    g = torch.Generator().manual_seed(seed)
    return random_holes(b, h, w, kind=kind, generator=g, **args)


# ---------------------------------------------------------------- hole masks


@pytest.mark.parametrize("size", [(64, 64), (224, 224), (50, 77)])
def test_freeform_holes_binary_shape_and_ratio_in_range(size: tuple[int, int]) -> None:
    h, w = size
    holes = _holes("freeform", b=6, h=h, w=w)
    assert holes.shape == (6, 1, h, w) and holes.dtype == torch.float32
    assert set(holes.unique().tolist()) <= {0.0, 1.0}
    ratios = holes.mean(dim=(1, 2, 3))
    assert bool(((ratios >= 0.5) & (ratios <= 0.6)).all()), ratios


def test_freeform_other_ranges_and_mask_ratio_recentres() -> None:
    for rng in [(0.0, 0.1), (0.1, 0.2), (0.85, 0.95)]:
        r = _holes("freeform", b=3, ratio_range=rng).mean(dim=(1, 2, 3))
        assert bool(((r >= rng[0]) & (r <= rng[1])).all()), (rng, r)
    # mask_ratio 0.3 moves the [0.5, 0.6] range to [0.25, 0.35].
    assert resolve_ratio_range("freeform", 0.3, (0.5, 0.6)) == pytest.approx((0.25, 0.35))
    r = _holes("freeform", b=4, mask_ratio=0.3).mean(dim=(1, 2, 3))
    assert bool(((r >= 0.25) & (r <= 0.35)).all()), r
    # A single-value range is hit to the pixel: 0.25 of 4096 pixels is exactly 1024.
    r = _holes("freeform", b=2, ratio_range=(0.25, 0.25)).mean(dim=(1, 2, 3))
    assert r.tolist() == [0.25, 0.25]


def test_patch_holes_exact_count_and_square_patches() -> None:
    holes = _holes("patches", b=5, mask_ratio=0.5)  # 4 x 4 = 16 patches, 8 hidden
    assert holes.mean(dim=(1, 2, 3)).tolist() == [0.5] * 5
    blocks = holes.view(5, 4, 16, 4, 16)  # (B, gh, p, gw, p)
    assert bool((blocks == blocks[:, :, :1, :, :1]).all()), "patches must be uniform squares"
    # 50 x 70 with p = 16: a 4 x 5 grid of (partly cut) patches, round(0.3 * 20) = 6 hidden.
    odd = _holes("patches", b=3, h=50, w=70, mask_ratio=0.3)
    assert odd.shape == (3, 1, 50, 70)
    assert odd[:, 0, ::16, ::16].sum(dim=(1, 2)).tolist() == [6.0, 6.0, 6.0]
    # Without mask_ratio the middle of the range is used: round(0.55 * 16) = 9 patches.
    assert _holes("patches", b=1).sum().item() == 9 * 256
    # Samples differ from each other.
    assert not torch.equal(holes[0], holes[1])


@pytest.mark.parametrize("kind", ["freeform", "patches"])
def test_holes_deterministic_with_generator(kind: str) -> None:
    a, b, c = _holes(kind, seed=3), _holes(kind, seed=3), _holes(kind, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_holes_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown hole kind"):
        _holes("squares")
    with pytest.raises(ValueError, match="ratio_range"):
        _holes("freeform", ratio_range=(0.6, 0.5))
    with pytest.raises(ValueError, match="mask_ratio"):
        _holes("patches", mask_ratio=1.5)


def test_mask_images_hand_values() -> None:
    images = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]]).expand(1, 3, 2, 2)
    holes = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = mask_images(images, holes)
    assert out[0, 2].tolist() == [[0.0, -2.0], [3.0, 0.0]]
    out = mask_images(images, holes, fill=-1.0)
    assert out[0, 0].tolist() == [[-1.0, -2.0], [3.0, -1.0]]
    with pytest.raises(ValueError, match="holes must be"):
        mask_images(images, torch.zeros(1, 1, 3, 3))
