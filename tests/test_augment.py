"""Tests for segray.augment: mask consistency of every transform, hand-worked photometric values,
normalisation, CutMix geometry and seeded determinism (64x64, batch 4-16, CPU; CUDA when present)."""

from __future__ import annotations

import pytest
import torch

from segray.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    StrongWeakAugment,
    TrainAugment,
    apply_cutmix,
    denormalize,
    normalize,
    photometric_distortion,
    sample_cutmix,
    sample_photometric_params,
)

LABELS = (0, 1, 2, 3, 255)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    ),
]
# Mean 0 / std 1 turns normalisation into a float cast, so outputs compare to inputs exactly.
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
STRONG_OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutmix_p=0.0)


def make_batch(b: int = 4, h: int = 64, w: int = 64, seed: int = 0, device: str = "cpu"):
    """Random images and masks drawn from LABELS, left-right asymmetric in every sample."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    ids = torch.randint(0, len(LABELS), (b, h, w), generator=g)
    mask = torch.tensor(LABELS)[ids]
    mask[:, :, : w // 4] = 1  # a block on the left only, so a flip is always visible
    return image.to(device), mask.to(device)


def assert_mask_ok(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype
    assert out.shape == ref.shape
    assert out.device == ref.device
    assert set(out.unique().tolist()) <= set(LABELS)


def flip_state(out: torch.Tensor, ref: torch.Tensor) -> list[bool]:
    """Per sample: False if unchanged, True if flipped horizontally; fails for anything else."""
    states = []
    for o, r in zip(out, ref):
        same, flipped = torch.equal(o, r), torch.equal(o, r.flip(-1))
        assert same != flipped, "sample is neither the input nor its mirror image"
        states.append(flipped)
    return states


# --- normalisation ------------------------------------------------------------------------------


def test_normalize_hand_value_and_roundtrip():
    img = torch.tensor([124, 116, 104], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    x = normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    expected = [(124 - 123.675) / 58.395, (116 - 116.28) / 57.12, (104 - 103.53) / 57.375]
    assert x.dtype == torch.float32
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-6)

    image, _ = make_batch()
    back = denormalize(normalize(image, IMAGENET_MEAN, IMAGENET_STD), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(back, image.float(), atol=1e-4)
    assert torch.equal(
        EvalTransform(IMAGENET_MEAN, IMAGENET_STD)(image),
        normalize(image, IMAGENET_MEAN, IMAGENET_STD),
    )


def test_normalize_rejects_bad_stats_and_shapes():
    image, _ = make_batch(b=1)
    with pytest.raises(ValueError, match="3 values"):
        normalize(image, (1.0, 2.0), IMAGENET_STD)
    with pytest.raises(ValueError, match="positive"):
        normalize(image, IMAGENET_MEAN, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize(image[:, :1], IMAGENET_MEAN, IMAGENET_STD)


# --- photometric core: hand-worked values -------------------------------------------------------


def _photo(pixel, brightness=0.0, contrast=1.0, saturation=1.0, hue=0.0, contrast_first=False):
    image = torch.tensor(pixel, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = photometric_distortion(
        image,
        torch.tensor([brightness]),
        torch.tensor([contrast]),
        torch.tensor([saturation]),
        torch.tensor([hue]),
        torch.tensor([contrast_first]),
    )
    return out[0, :, 0, 0].tolist()


def test_photometric_brightness_and_contrast_hand_values():
    assert _photo((100, 100, 100), brightness=10) == [110, 110, 110]
    assert _photo((100, 50, 20), brightness=-30) == [70, 20, 0]  # clamped at 0
    assert _photo((100, 50, 20), contrast=1.5) == [150, 75, 30]  # a plain factor, not a blend
    assert _photo((200, 100, 50), contrast=1.5) == [255, 150, 75]  # clamped at 255
    assert _photo((100, 100, 100), brightness=10, contrast=1.5) == [165, 165, 165]


def test_photometric_saturation_hue_and_order_hand_values():
    # Saturation 0 leaves the HSV value (the max channel) on every channel.
    assert _photo((200, 100, 50), saturation=0.0) == pytest.approx([200, 200, 200], abs=1e-3)
    # Hue is in OpenCV units: 60 of 180 is a third of a turn, red -> green; -60 gives blue.
    assert _photo((255, 0, 0), hue=60) == pytest.approx([0, 255, 0], abs=1e-3)
    assert _photo((255, 0, 0), hue=-60) == pytest.approx([0, 0, 255], abs=1e-3)
    # Order matters once clamping bites. Contrast first: (255, 150, 75) -> v 255, s 180/255 halved
    # -> min 165, hue 25 deg -> g = 165 + 90 * 25/60. Contrast last: s 0.75 -> 0.375, min 125,
    # hue 20 deg -> g 150, then x1.5 with clamp.
    first = _photo((200, 100, 50), contrast=1.5, saturation=0.5, contrast_first=True)
    last = _photo((200, 100, 50), contrast=1.5, saturation=0.5, contrast_first=False)
    assert first == pytest.approx([255, 202.5, 165], abs=1e-3)
    assert last == pytest.approx([255, 225, 187.5], abs=1e-3)


def test_photometric_identity_params_leave_image_unchanged():
    image, _ = make_batch()
    x = image.float()
    b = x.shape[0]
    out = photometric_distortion(
        x, torch.zeros(b), torch.ones(b), torch.ones(b), torch.zeros(b), torch.zeros(b).bool()
    )
    assert torch.equal(out, x)


def test_sample_photometric_params_ranges_and_rates():
    n = 4000
    p = sample_photometric_params(n, torch.Generator().manual_seed(0))
    b, c, s, h = p["brightness"], p["contrast"], p["saturation"], p["hue"]
    assert b.abs().max() <= 32 and c.min() >= 0.5 and c.max() <= 1.5
    assert s.min() >= 0.5 and s.max() <= 1.5
    assert torch.equal(h, h.round()) and h.min() >= -18 and h.max() <= 17
    for applied in (b != 0, c != 1, s != 1, p["contrast_first"]):
        assert 0.45 < applied.float().mean() < 0.55
    # Integer hue draws hit 0 about 1 in 36 times even when applied.
    assert 0.45 * (35 / 36) < (h != 0).float().mean() < 0.55


# --- TrainAugment -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hflip,photometric", [(0.5, False), (0.0, True), (0.5, True)])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.uint8])
def test_train_augment_mask_consistency(device, hflip, photometric, mask_dtype):
    image, mask = make_batch(device=device)
    mask = mask.to(mask_dtype)
    aug = TrainAugment(IMAGENET_MEAN, IMAGENET_STD, hflip, photometric, generator=1).to(device)
    x, m = aug(image, mask)
    assert_mask_ok(m, mask)
    assert x.dtype == torch.float32 and x.shape == image.shape and x.device == image.device
    raw = denormalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert raw.min() >= -1e-3 and raw.max() <= 255 + 1e-3


def test_train_augment_flips_image_and_mask_together():
    image, mask = make_batch(b=16)
    aug = TrainAugment(**IDENTITY, hflip=0.5, photometric=False, generator=3)
    x, m = aug(image, mask)
    image_flipped = flip_state(x, image.float())
    assert flip_state(m, mask) == image_flipped
    assert any(image_flipped) and not all(image_flipped)

    for p, expected in ((1.0, True), (0.0, False)):
        x, m = TrainAugment(**IDENTITY, hflip=p, photometric=False)(image, mask)
        assert flip_state(x, image.float()) == [expected] * 16
        assert flip_state(m, mask) == [expected] * 16


def test_train_augment_photometric_leaves_mask_untouched():
    image, mask = make_batch(b=8)
    x, m = TrainAugment(**IDENTITY, hflip=0.0, photometric=True, generator=0)(image, mask)
    assert torch.equal(m, mask)
    assert x.min() >= 0 and x.max() <= 255
    changed = [not torch.equal(xi, ii) for xi, ii in zip(x, image.float())]
    assert any(changed)  # with 8 images at p 0.5 per op, some image is distorted


def test_train_augment_seeded_determinism_keeps_global_rng():
    image, mask = make_batch()
    state = torch.get_rng_state()
    x1, m1 = TrainAugment(IMAGENET_MEAN, IMAGENET_STD, generator=7)(image, mask)
    x2, m2 = TrainAugment(IMAGENET_MEAN, IMAGENET_STD, generator=torch.Generator().manual_seed(7))(
        image, mask
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    x3, _ = TrainAugment(IMAGENET_MEAN, IMAGENET_STD, generator=8)(image, mask)
    assert not torch.equal(x1, x3)


def _padded_batch(device: str = "cpu"):
    """Crops padded at the bottom/right as the data plane pads them (image 0, mask 255)."""
    image, mask = make_batch(b=4, h=16, w=16, device=device)
    valid = torch.tensor([[16, 16], [10, 12], [16, 7], [5, 16]], dtype=torch.int16, device=device)
    for i, (vh, vw) in enumerate(valid.tolist()):
        image[i, :, vh:], image[i, :, :, vw:] = 0, 0
        mask[i, vh:], mask[i, :, vw:] = 255, 255
    return image, mask, valid


@pytest.mark.parametrize("device", DEVICES)
def test_train_augment_pads_after_normalising_as_mmseg(device):
    """MMSeg's order is crop, flip, photometric, normalise, pad: padded pixels are exactly 0
    (the mean colour) whatever the photometric ops drew, and a flipped crop is flipped within its
    width, so its padding stays at the right."""
    image, mask, valid = _padded_batch(device)
    for photometric in (False, True):
        aug = TrainAugment(IMAGENET_MEAN, IMAGENET_STD, hflip=1.0, photometric=photometric,
                           generator=5).to(device)
        x, m = aug(image, mask, valid)
        plain = normalize(image.float(), IMAGENET_MEAN, IMAGENET_STD)
        for i, (vh, vw) in enumerate(valid.tolist()):
            assert (x[i, :, vh:] == 0).all() and (x[i, :, :, vw:] == 0).all()
            assert (m[i, vh:] == 255).all() and (m[i, :, vw:] == 255).all()
            assert torch.equal(m[i, :vh, :vw], mask[i, :vh, :vw].flip(-1))
            if not photometric:
                assert torch.allclose(x[i, :, :vh, :vw], plain[i, :, :vh, :vw].flip(-1))
    # Not flipped: nothing moves, only the padding becomes 0.
    x, m = TrainAugment(**IDENTITY, hflip=0.0, photometric=False)(image, mask, valid)
    assert torch.equal(m, mask) and torch.equal(x, image.float())  # padding was 0 already
    with pytest.raises(ValueError, match=r"valid must be integer \(B, 2\)"):
        aug(image, mask, valid[:2])
    with pytest.raises(ValueError, match="valid sizes must lie in 1..16 x 1..16"):
        aug(image, mask, valid * 2)


def test_train_augment_rejects_bad_inputs():
    image, mask = make_batch(b=2)
    aug = TrainAugment(IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(TypeError, match="uint8"):
        aug(image.float(), mask)
    with pytest.raises(TypeError, match="integer"):
        aug(image, mask.float())
    with pytest.raises(ValueError, match="to match image"):
        aug(image, mask[:, :32])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TrainAugment(IMAGENET_MEAN, IMAGENET_STD, hflip=1.5)
    with pytest.raises(TypeError, match="generator"):
        TrainAugment(IMAGENET_MEAN, IMAGENET_STD, generator="seed")


# --- CutMix -------------------------------------------------------------------------------------


def test_apply_cutmix_hand_example_and_errors():
    m = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]], [[2, 2], [2, 2]]])  # (3, 2, 2)
    box = torch.zeros(3, 2, 2, dtype=torch.bool)
    box[0, 0, 0] = True
    box[1, :, 1] = True
    out = apply_cutmix(m, torch.tensor([2, 0, 1]), box)
    assert out.tolist() == [[[2, 0], [0, 0]], [[1, 0], [1, 0]], [[2, 2], [2, 2]]]
    img = m.unsqueeze(1).expand(3, 3, 2, 2).float()  # (3, 3, 2, 2): the box covers all channels
    assert torch.equal(apply_cutmix(img, torch.tensor([2, 0, 1]), box)[:, 1], out.float())
    with pytest.raises(ValueError, match="match the box"):
        apply_cutmix(m[:2], torch.tensor([1, 0]), box)
    with pytest.raises(ValueError, match="bool"):
        apply_cutmix(m, torch.tensor([2, 0, 1]), box.long())


def test_sample_cutmix_boxes_are_rectangles_within_area():
    index, box = sample_cutmix(64, 64, 64, p=1.0, generator=torch.Generator().manual_seed(0))
    assert sorted(index.tolist()) == list(range(64))
    for bx in box:
        ys, xs = bx.nonzero(as_tuple=True)
        assert ys.numel() > 0
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert ys.numel() == h * w  # a full rectangle
        assert ys.numel() <= 0.4 * 64 * 64
        assert 0.3 * 0.8 <= h / w <= (1 / 0.3) / 0.8  # aspect drawn in [0.3, 1/0.3], floor slack
    _, none = sample_cutmix(8, 64, 64, p=0.0)
    assert not none.any()


def test_cutmix_never_pairs_an_image_with_itself():
    """A box filled from the image itself would mix nothing (S4MC's batch-of-one bug)."""
    for b in (2, 3, 4, 8):
        for seed in range(50):
            index, _ = sample_cutmix(b, 8, 8, p=1.0, generator=torch.Generator().manual_seed(seed))
            assert sorted(index.tolist()) == list(range(b))
            assert (index != torch.arange(b)).all(), (b, seed, index)
    pairs = {tuple(sample_cutmix(4, 8, 8, generator=torch.Generator().manual_seed(s))[0].tolist())
             for s in range(50)}
    assert len(pairs) == 6  # every one-cycle pairing of 4 images: (4 - 1)! = 6
    index, box = sample_cutmix(1, 8, 8, p=1.0)
    assert index.tolist() == [0] and not box.any()  # no partner, no box


# --- StrongWeakAugment --------------------------------------------------------------------------

STRONG_OPS = {
    "jitter": dict(STRONG_OFF, jitter_p=1.0),
    "grayscale": dict(STRONG_OFF, grayscale_p=1.0),
    "blur": dict(STRONG_OFF, blur_p=1.0),
    "cutmix": dict(STRONG_OFF, cutmix_p=1.0),
    "all_default": {},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(STRONG_OPS))
def test_strong_weak_mask_consistency(device, op):
    image, mask = make_batch(device=device)
    aug = StrongWeakAugment(**IDENTITY, **STRONG_OPS[op], generator=2).to(device)
    out = aug(image, mask)
    for key in ("mask", "mask_strong"):
        assert_mask_ok(out[key], mask)
    assert out["weak"].shape == out["strong"].shape == image.shape
    assert out["strong"].min() >= 0 and out["strong"].max() <= 255
    assert out["cutmix_index"].dtype == torch.long and out["cutmix_box"].dtype == torch.bool
    assert out["cutmix_box"].shape == mask.shape and out["cutmix_index"].device == image.device
    # weak/mask are the flip of the input, together; the strong mask is the CutMix of that.
    assert flip_state(out["mask"], mask) == flip_state(out["weak"], image.float())
    mixed = apply_cutmix(out["mask"], out["cutmix_index"], out["cutmix_box"])
    assert torch.equal(out["mask_strong"], mixed)

    strong, weak = out["strong"], out["weak"]
    if op == "grayscale":
        assert torch.allclose(strong[:, 0], strong[:, 1], atol=1e-3)
        assert torch.allclose(strong[:, 1], strong[:, 2], atol=1e-3)
    if op == "blur":  # random noise loses high-frequency energy under any blur
        assert strong.diff(dim=-1).abs().mean() < weak.diff(dim=-1).abs().mean()
    if op == "jitter":
        assert not torch.allclose(strong, weak)
    if op == "cutmix":
        assert out["cutmix_box"].flatten(1).any(1).all()
        assert torch.equal(strong, apply_cutmix(weak, out["cutmix_index"], out["cutmix_box"]))
        assert not torch.equal(out["mask_strong"], out["mask"])


def test_strong_weak_views_share_the_flip_and_weak_is_flip_only():
    image, mask = make_batch(b=16)
    out = StrongWeakAugment(**IDENTITY, **STRONG_OFF, generator=5)(image, mask)
    flipped = flip_state(out["weak"], image.float())
    assert any(flipped) and not all(flipped)
    assert torch.allclose(out["strong"], out["weak"], atol=1e-4)
    assert not out["cutmix_box"].any()
    assert "mask" not in StrongWeakAugment(**IDENTITY)(image)


def test_strong_weak_seeded_determinism():
    image, mask = make_batch()
    a = StrongWeakAugment(IMAGENET_MEAN, IMAGENET_STD, generator=11)(image, mask)
    b = StrongWeakAugment(IMAGENET_MEAN, IMAGENET_STD, generator=11)(image, mask)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = StrongWeakAugment(IMAGENET_MEAN, IMAGENET_STD, generator=12)(image, mask)
    assert not torch.equal(a["strong"], c["strong"])


def test_strong_weak_rejects_bad_probability():
    with pytest.raises(ValueError, match="cutmix_p"):
        StrongWeakAugment(IMAGENET_MEAN, IMAGENET_STD, cutmix_p=2.0)
