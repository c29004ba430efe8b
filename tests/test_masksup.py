"""Tests of the MaskSup method: loss, paper metric, training steps.

Its hole masks and masked images are tested in test_masksup_holes.py, its models and shipped
presets in test_masksup_models.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from methods.base import Method, MethodContext
from methods.masksup import (
    MaskSup,
    MaskSupKnobs,
    PaperMetric,
    build_model,
    masksup_loss,
    official_target_resize,
    supervised_loss,
)

LN2, LN3 = math.log(2), math.log(3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions gain nothing from a second thread, and on a busy 2-core machine the
    # thread pool's contention makes them an order of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- loss


def test_binary_loss_hand_worked() -> None:
    # Pixels: (target 1, clean 0, masked ln3), (target 0, clean 0, masked -ln3), (ignored, 0, 0).
    clean = torch.zeros(1, 1, 1, 3)
    masked = torch.tensor([[[[LN3, -LN3, 0.0]]]])
    target = torch.tensor([[[1, 0, 255]]])
    out = masksup_loss(clean, masked, target, alpha=1, beta=2, gamma=4, binary=True)
    # BCE: clean ln2 per pixel; masked -log(3/4) per pixel; both over the 2 labelled pixels.
    assert out["loss_clean"].item() == pytest.approx(LN2)
    assert out["loss_masked"].item() == pytest.approx(math.log(4 / 3))
    # MSE of sigmoids over all 3 pixels: (0.25^2 + 0.25^2 + 0) / 3.
    assert out["loss_consistency"].item() == pytest.approx(0.125 / 3)
    assert out["loss"].item() == pytest.approx(LN2 + 2 * math.log(4 / 3) + 4 * 0.125 / 3)
    hard = masksup_loss(clean, masked, target, binary=True, consistency="argmax")
    assert hard["loss_consistency"].item() == pytest.approx(1 / 3)  # only pixel 1 flips


def test_multiclass_loss_hand_worked() -> None:
    # Two pixels, three classes, target class 0 at both.
    clean = torch.tensor([[0.0, LN2], [0.0, 0.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    masked = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 5.0]]).view(1, 3, 1, 2)
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    out = masksup_loss(clean, masked, target, binary=False, consistency="softmax_mse")
    assert out["loss_clean"].item() == pytest.approx((LN3 + LN2) / 2)  # p0 = 1/3 and 1/2
    assert out["loss_masked"].item() == pytest.approx((LN3 + math.log(2 + math.exp(5))) / 2)
    # Pixel 2: softmax [1/2, 1/4, 1/4] vs [1, 1, e^5] / (2 + e^5); mean over 6 entries.
    q = torch.tensor([1.0, 1.0, math.exp(5)]) / (2 + math.exp(5))
    expected = ((torch.tensor([0.5, 0.25, 0.25]) - q) ** 2).sum().item() / 6
    assert out["loss_consistency"].item() == pytest.approx(expected)
    hard = masksup_loss(clean, masked, target, binary=False, consistency="argmax")
    assert hard["loss_consistency"].item() == pytest.approx(2.0)  # ((0-0)^2 + (0-2)^2) / 2
    # Ignored pixels leave CE; an all-ignored batch gives 0, not NaN.
    ign = masksup_loss(clean, masked, torch.tensor([[[0, 255]]]), binary=False)
    assert ign["loss_clean"].item() == pytest.approx(LN3)
    void = masksup_loss(clean, masked, torch.full((1, 1, 2), 255), binary=False)
    assert void["loss_clean"].item() == 0.0 and math.isfinite(void["loss"].item())


@pytest.mark.parametrize("binary", [True, False])
def test_consistency_gradients(binary: bool) -> None:
    c = 1 if binary else 4
    target = torch.randint(0, 2 if binary else 4, (2, 8, 8))
    grads = {}
    for form in ("softmax_mse", "argmax"):
        clean = torch.randn(2, c, 8, 8, requires_grad=True)
        masked = torch.randn(2, c, 8, 8, requires_grad=True)
        out = masksup_loss(clean, masked, target, alpha=0, beta=0, gamma=1, binary=binary,
                           consistency=form)  # fmt: skip
        out["loss"].backward()
        grads[form] = (clean.grad.abs().sum().item(), masked.grad.abs().sum().item())
    assert grads["softmax_mse"][0] > 0 and grads["softmax_mse"][1] > 0  # no stop-gradient
    assert grads["argmax"] == (0.0, 0.0)  # the official argmax form trains nothing


@pytest.mark.parametrize("stop", ["clean", "masked"])
def test_stop_gradient_detaches_one_branch_of_the_consistency(stop: str) -> None:
    target = torch.randint(0, 4, (2, 8, 8))
    clean = torch.randn(2, 4, 8, 8, requires_grad=True)
    masked = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = masksup_loss(clean, masked, target, alpha=0, beta=0, gamma=1, binary=False,
                       stop_gradient=stop)
    out["loss"].backward()
    stopped, pulled = (clean, masked) if stop == "clean" else (masked, clean)
    assert stopped.grad.abs().sum().item() == 0.0 and pulled.grad.abs().sum().item() > 0
    # The supervised terms keep their gradient through the stopped branch.
    clean.grad = masked.grad = None
    masksup_loss(clean, masked, target, gamma=1, binary=False,
                 stop_gradient=stop)["loss"].backward()
    assert stopped.grad.abs().sum().item() > 0


def test_loss_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="1 logit channel"):
        masksup_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2),
                     torch.zeros(1, 2, 2, dtype=torch.long), binary=True)  # fmt: skip
    with pytest.raises(ValueError, match="unknown consistency"):
        masksup_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2),
                     torch.zeros(1, 2, 2, dtype=torch.long), binary=False, consistency="kl")  # fmt: skip
    with pytest.raises(ValueError, match="unknown stop_gradient"):
        masksup_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2),
                     torch.zeros(1, 2, 2, dtype=torch.long), binary=False, stop_gradient="x")  # fmt: skip


# ---------------------------------------------------------------- paper metric


def test_paper_metric_binary_hand_worked() -> None:
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]], [[1, 0, 1, 0]]])
    target = torch.tensor([[[1, 0, 1, 1]], [[0, 0, 0, 0]], [[255] * 4], [[1, 255, 1, 0]]])
    m = PaperMetric(binary=True)
    m.update(pred, target)
    # IoUs: 1/4; 0 (no foreground anywhere: sklearn's zero_division gives 0); image 3 has no
    # labelled pixel and is skipped; image 4: the ignored pixel is left out -> 2/2.
    assert m.state().tolist() == pytest.approx([1.25, 3.0])
    assert m.compute() == {"paper_fg_iou_mean_per_image": pytest.approx(125 / 3)}


def test_paper_metric_multiclass_is_acc_over_two_minus_acc() -> None:
    target = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 0, 255]])
    pred = torch.tensor([[0, 1, 2, 0], [3, 0, 0, 0], [0, 0, 0, 7]])
    m = PaperMetric(binary=False)
    for p, t in zip(pred, target):  # (H, W) maps one at a time
        m.update(p.view(2, 2), t.view(2, 2))
    accs = [0.75, 0.5, 1.0]  # the ignored pixel of image 3 is left out
    expected = 100 * sum(a / (2 - a) for a in accs) / 3
    assert m.compute()["paper_micro_jaccard_mean_per_image"] == pytest.approx(expected)
    # Shards merge by adding states.
    a, b = PaperMetric(binary=False), PaperMetric(binary=False)
    a.update(pred[:2].view(2, 2, 2), target[:2].view(2, 2, 2))
    b.update(pred[2:].view(1, 2, 2), target[2:].view(1, 2, 2))
    assert a.merge(b.state()).compute() == pytest.approx(m.compute())
    assert m.state().dtype == torch.float64 and m.state().shape == (2,)
    with pytest.raises(TypeError, match="integer"):
        m.update(pred.float(), target)
    # The official NYUDv2 code counts void as class 0: image 3's void pixel, predicted 7, is wrong.
    void0 = PaperMetric(binary=False, void_to_class=0)
    for p, t in zip(pred, target):
        void0.update(p.view(2, 2), t.view(2, 2))
    accs = [0.75, 0.5, 0.75]
    expected = 100 * sum(a / (2 - a) for a in accs) / 3
    assert void0.compute()["paper_micro_jaccard_mean_per_image"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="cannot merge"):
        void0.merge(m)


def test_official_target_resize_as_opencv() -> None:
    """Ground truth resized as the official code (OpenCV) resizes it, worked by hand."""
    # Nearest (NYUDv2): OpenCV floors d * (1 / (224 / 288)) in double precision, so output row 21
    # takes source row 26 (21 x 1.2857142857142856 = 26.999...), not 27.
    rows = torch.arange(288).view(1, 288, 1).expand(1, 288, 3)
    out = official_target_resize(rows, (224, 3), binary=False)
    assert out[0, 20:23, 0].tolist() == [25, 26, 28]
    # Area (binary), 3x3 -> 2x2: each output pixel weighs source pixels (2/3, 1/3) per axis, so
    # output (0, 0) is 4/9 + 2/9 + 2/9 = 8/9 foreground -> 1; the others are 2/9 or 0 -> 0.
    m = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]]])
    assert official_target_resize(m, (2, 2), binary=True).tolist() == [[[1, 0], [0, 0]]]
    # A tie goes to background, except in an exact 2x reduction (OpenCV's fast path rounds up).
    half = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]])
    assert official_target_resize(half, (2, 2), binary=True).tolist() == [[[1, 0], [1, 0]]]
    third = torch.zeros(1, 6, 4, dtype=torch.long)
    third[0, 0:3, 0] = 1  # 3 of the 6 pixels of block (0, 0): a tie
    third[0, 0:2, 2:4] = 1  # 4 of the 6 of block (0, 1)
    assert official_target_resize(third, (2, 2), binary=True).tolist() == [[[0, 1], [0, 0]]]
    # Ignored pixels stay where the nearest resize puts them (source rows/cols 0 and 1).
    void = m.clone()
    void[0, 1, 1] = 255
    assert official_target_resize(void, (2, 2), binary=True).tolist() == [[[1, 0], [0, 255]]]
    assert official_target_resize(void[0].to(torch.uint8), (2, 2), binary=True).tolist() == [
        [1, 0], [0, 255]]  # one (H, W) map, its dtype kept
    with pytest.raises(ValueError, match="both >= 1"):
        official_target_resize(m, (0, 2), binary=False)


def test_paper_metric_scores_at_its_size() -> None:
    m = PaperMetric(binary=True, score_size=(2, 2))
    target = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]]])  # resizes to [[1, 0], [0, 0]]
    m.update(torch.tensor([[[1, 0], [0, 0]]]), target)
    m.update(torch.tensor([[[1, 1], [0, 0]]]), target)
    assert m.compute()["paper_fg_iou_mean_per_image"] == pytest.approx(75.0)  # IoU 1 and 1/2
    with pytest.raises(ValueError, match=r"at \(2, 2\)"):
        m.update(torch.zeros(1, 3, 3, dtype=torch.long), target)
    with pytest.raises(ValueError, match="cannot merge"):
        m.merge(PaperMetric(binary=True))


@pytest.mark.parametrize("size", [[32, 32], None])
def test_evaluate_scores_the_paper_metric_as_the_official_code(size: list[int] | None) -> None:
    """The paper metric gets the network's prediction for the image squashed to its size (one
    more forward pass) and the full-size target, which it resizes; without a size, the
    engine's full-size prediction."""
    from segray.augment import normalize
    from segray.config import EvalConfig
    from segray.evaluation import evaluate

    method = _method(num_classes=2, paper_metric_size=size)
    torch.manual_seed(0)
    model = method.build().eval()
    g = torch.Generator().manual_seed(1)
    rows = [{"image": torch.randint(0, 256, (40, 56, 3), generator=g, dtype=torch.uint8).numpy(),
             "mask": torch.randint(0, 2, (40, 56), generator=g).numpy()} for _ in range(3)]
    mean, std = [127.5] * 3, [127.5] * 3
    got = evaluate(method, model, rows, num_classes=2, ignore_index=255, eval_cfg=EvalConfig(),
                   mean=mean, std=std, device=torch.device("cpu")).extra.compute()

    want = PaperMetric(binary=True, score_size=tuple(size) if size else None)
    with torch.no_grad():
        for row in rows:
            x = normalize(torch.from_numpy(row["image"]).permute(2, 0, 1)[None], mean, std)
            if size:
                x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear",
                                                    align_corners=False, antialias=True)
            want.update(method.predict(model, x).argmax(1), torch.from_numpy(row["mask"])[None])
    assert got == pytest.approx(want.compute())


def test_void_to_class_trains_void_as_that_class() -> None:
    """With void_to_class the losses see void pixels as the class: the same as a target that
    holds the class there; without it they are ignored."""
    batch = _batch(4)
    void = dict(batch, mask=batch["mask"].clone())
    void["mask"][:, :8] = 255
    as_zero = dict(batch, mask=void["mask"].masked_fill(void["mask"] == 255, 0))
    losses = {}
    for name, knobs, b in (("void0", {"void_to_class": 0}, void), ("zero", {}, as_zero),
                           ("ignored", {}, void)):
        torch.manual_seed(0)
        method = _method(**knobs)
        torch.manual_seed(1)
        model = method.build()
        losses[name] = method.training_step(model, b, step=3)["loss_clean"].item()
    assert losses["void0"] == pytest.approx(losses["zero"])
    assert losses["void0"] != pytest.approx(losses["ignored"])
    with pytest.raises(ValueError, match=r"void_to_class must be a class id in \[0, 4\)"):
        _method(void_to_class=4)


# ---------------------------------------------------------------- method


def _method(num_classes: int = 4, crop: int = 32, **knobs) -> MaskSup:
    knobs = {"arch": "unet", "width": 4, **knobs}
    return MaskSup(knobs, MethodContext(num_classes=num_classes, crop_size=(crop, crop)))


def _batch(num_classes: int, b: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "mask": torch.randint(0, num_classes, (b, size, size), generator=g),
    }


def test_method_follows_protocol_and_knob_defaults() -> None:
    assert isinstance(_method(), Method)
    assert MaskSup.name == "masksup" and MaskSup.streams == ("labeled",)
    k = MaskSupKnobs()
    assert (k.alpha, k.beta, k.gamma, k.fill, k.holes) == (1.0, 1.0, 1.0, 0.0, "freeform")
    assert k.hole_ratio_range == [0.5, 0.6] and k.arch == "levit_unet_384"
    fields = {f.name for f in dataclasses.fields(MaskSupKnobs)}
    required = {"holes", "mask_ratio", "patch_size", "alpha", "beta", "gamma"}
    assert required <= set(MaskSup.search_space) <= fields


def test_training_step_two_separate_forward_passes() -> None:
    method = _method()
    model = method.build()
    out = method.training_step(model, _batch(4), step=0)
    assert {"loss", "loss_clean", "loss_masked", "loss_consistency", "hole_ratio"} <= set(out)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(bn.num_batches_tracked) == 2 for bn in bns)
    assert 0.5 <= out["hole_ratio"].item() <= 0.6
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_base_trainer_is_one_clean_pass() -> None:
    """``trainer: base`` is the official baseline: BatchNorm never sees a masked batch."""
    method = _method(trainer="base", alpha=0.5)
    model = method.build()
    batch = _batch(4)
    out = method.training_step(model, batch, step=0)
    assert set(out) == {"loss", "loss_clean"}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(bn.num_batches_tracked) == 1 for bn in bns)
    twin = copy.deepcopy(model).train()
    expected = supervised_loss(twin(batch["image"]), batch["mask"], binary=False)
    assert out["loss"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)


def test_cb_trainer_drops_the_consistency_term() -> None:
    batch = _batch(4)
    full = _method(holes="patches", mask_ratio=0.5, patch_size=8)
    model = full.build()
    twin = copy.deepcopy(model)
    a = full.training_step(model, batch, step=3)
    b = _method(holes="patches", mask_ratio=0.5, patch_size=8,
                trainer="cb").training_step(twin, batch, step=3)
    assert a["loss_consistency"].item() == b["loss_consistency"].item() > 0  # still logged
    assert b["loss"].item() == pytest.approx((b["loss_clean"] + b["loss_masked"]).item())
    assert a["loss"].item() == pytest.approx(b["loss"].item() + a["loss_consistency"].item())


def test_mask_prob_masks_a_share_of_the_samples() -> None:
    method = _method(holes="patches", mask_ratio=0.5, patch_size=8, mask_prob=0.5)
    model = method.build()
    ratios = [method.training_step(model, _batch(4, b=8), step=s)["hole_ratio"].item()
              for s in range(40)]
    # Each sample hides half its pixels when chosen: the batch ratio is 0.5 * (chosen / 8).
    assert all(r * 16 == round(r * 16) for r in ratios)
    assert 0.2 < sum(ratios) / len(ratios) < 0.3
    assert _method(holes="patches", mask_ratio=0.5, patch_size=8, mask_prob=0.0).training_step(
        model, _batch(4, b=8), step=0)["hole_ratio"].item() == 0.0


def test_training_step_is_reproducible_per_step() -> None:
    method = _method(holes="patches", mask_ratio=0.5, patch_size=8)
    model = method.build()
    twin = copy.deepcopy(model)
    batch = _batch(4)
    a = method.training_step(model, batch, step=7)
    b = _method(holes="patches", mask_ratio=0.5, patch_size=8).training_step(twin, batch, step=7)
    c = method.training_step(model, batch, step=8)
    assert a["loss"].item() == b["loss"].item()
    assert a["loss_masked"].item() != c["loss_masked"].item()


def test_binary_auto_predict_two_channels() -> None:
    method = _method(num_classes=2, predict_size=[32, 32])
    model = method.build().eval()
    assert method.binary and model.final.out_channels == 1
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        logits = method.predict(model, images)
    assert logits.shape == (2, 2, 48, 40)
    assert bool((logits[:, 0] == 0).all())
    assert torch.equal(logits.argmax(1), (torch.sigmoid(logits[:, 1]) > 0.5).long())
    assert method.make_eval_metric().name == "paper_fg_iou_mean_per_image"
    assert _method(num_classes=2, binary=False).num_outputs == 2
    assert _method().make_eval_metric().name == "paper_micro_jaccard_mean_per_image"


def test_method_validation_errors() -> None:
    with pytest.raises(KeyError, match="unknown masksup knobs"):
        _method(mask_ratoi=0.5)
    with pytest.raises(ValueError) as err:
        _method(holes="squares", consistency="kl", binary=True)
    assert "holes" in str(err.value) and "consistency" in str(err.value)
    assert "binary" in str(err.value)
    with pytest.raises(ValueError) as err:
        _method(trainer="ts", stop_gradient="both", mask_prob=1.5)
    assert all(k in str(err.value) for k in ("trainer", "stop_gradient", "mask_prob"))
    with pytest.raises(ValueError, match="224x224"):
        _method(arch="levit_unet_384")
    with pytest.raises(ValueError, match="from scratch"):
        build_model("unetpp", 3, pretrained="/tmp/weights.pth")


def test_short_training_learns() -> None:
    torch.manual_seed(0)
    method = _method(num_classes=2, crop=16, holes="patches", mask_ratio=0.25, patch_size=4)
    model = method.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    image = torch.randn(4, 3, 16, 16)
    mask = (image[:, 0] > 0).long()  # the label is readable from the first channel
    losses = []
    for step in range(30):
        out = method.training_step(model, {"image": image, "mask": mask}, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss_clean"].item())
    assert losses[-1] < 0.5 * losses[0]
