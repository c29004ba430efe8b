"""SeMask-FPN: backbone shapes and attention rule, semantic attention numerics, initialisation,
losses (hand-computed), OHEM, parameter groups, pretrained loading, every preset, odd sizes."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml

from methods.base import MethodContext
from methods.semask import (
    SemanticAttention,
    SemanticLayer,
    SeMask,
    SeMaskKnobs,
    build_semask_swin,
    ohem_weights,
    semask_loss,
    stage_attention,
)

TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}
PRESETS = Path(__file__).resolve().parents[1] / "methods" / "presets" / "semask"
FULL_EMBED_DIM = {"swin_tiny_patch4_window7_224": 96, "swin_small_patch4_window7_224": 96,
                  "swin_base_patch4_window12_384": 128, "swin_large_patch4_window12_384": 192}
DATASET_CLASSES = {"ade20k": 150, "cityscapes": 19, "cocostuff10k": 171, "demo": 6}


def tiny_method(num_classes: int = 5, knobs: SeMaskKnobs | None = None, **model) -> SeMask:
    ctx = MethodContext(num_classes=num_classes, crop_size=(64, 64), model={
        "encoder": "swin_tiny_patch4_window7_224", "decoder_channels": 16,
        "encoder_kwargs": dict(TINY), **model})
    return SeMask(knobs or SeMaskKnobs(), ctx)


def test_backbone_feature_and_prior_shapes():
    net = build_semask_swin("swin_tiny_patch4_window7_224", num_classes=5, img_size=64,
                            encoder_kwargs=TINY, attention="global")
    feats, priors = net(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4),
                                               (2, 128, 2, 2)]
    assert [tuple(p.shape) for p in priors] == [(2, 5, 16, 16), (2, 5, 8, 8), (2, 5, 4, 4),
                                                (2, 5, 2, 2)]
    assert net.strides == [4, 8, 16, 32] and net.channels == [16, 32, 64, 128]


def test_semantic_blocks_per_stage():
    """``num_sem_blocks`` is one count for every stage or one per stage (official: [1, 1, 1, 1])."""
    net = build_semask_swin("swin_tiny_patch4_window7_224", num_classes=5, img_size=64,
                            encoder_kwargs=TINY, num_sem_blocks=[1, 2, 1, 3])
    assert [len(layer.blocks) for layer in net.semantic_layers] == [1, 2, 1, 3]
    same = build_semask_swin("swin_tiny_patch4_window7_224", num_classes=5, img_size=64,
                             encoder_kwargs=TINY, num_sem_blocks=2)
    assert [len(layer.blocks) for layer in same.semantic_layers] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="one count per stage"):
        build_semask_swin("swin_tiny_patch4_window7_224", num_classes=5, img_size=64,
                          encoder_kwargs=TINY, num_sem_blocks=[1, 1])
    with pytest.raises(ValueError, match="num_sem_blocks must be >= 1 for every stage"):
        SeMaskKnobs(num_sem_blocks=[1, 0, 1, 1])
    model = tiny_method(knobs=SeMaskKnobs(num_sem_blocks=[1, 1, 2, 1])).build()
    assert [len(layer.blocks) for layer in model.backbone.semantic_layers] == [1, 1, 2, 1]


def test_official_attention_rule():
    assert stage_attention(96, 150) == ["windowed", "windowed", "global", "global"]  # Swin-T ADE
    assert stage_attention(192, 171) == ["windowed", "windowed", "global", "global"]  # Swin-L COCO
    assert stage_attention(96, 19) == ["windowed"] * 4  # Swin-T Cityscapes
    assert stage_attention(128, 150) == ["windowed"] * 4  # Swin-B: never global
    assert stage_attention(128, 150, "global") == ["global"] * 4
    with pytest.raises(ValueError, match="official"):
        stage_attention(96, 150, "local")
    # The built backbone follows the rule: window 7 (the Swin window) or 0 (= global).
    kw = {"embed_dim": 96, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    t150 = build_semask_swin("swin_tiny_patch4_window7_224", 150, 64, kw)
    t19 = build_semask_swin("swin_tiny_patch4_window7_224", 19, 64, kw)
    b150 = build_semask_swin("swin_base_patch4_window12_384", 150, 64, {**kw, "embed_dim": 128})
    assert [s.window for s in t150.semantic_layers] == [7, 7, 0, 0]
    assert [s.window for s in t19.semantic_layers] == [7, 7, 7, 7]
    assert [s.window for s in b150.semantic_layers] == [12, 12, 12, 12]


def test_semantic_attention_matches_hand_computation():
    att = SemanticAttention(dim=2, num_classes=2).eval()  # eval: no dropout
    with torch.no_grad():
        for lin in (att.mlp_cls_q, att.mlp_cls_k, att.mlp_v, att.mlp_res):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        att.mlp_cls_k.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        att.gamma.fill_(0.5)
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, N=2, C=2)
    s, out = att(x)
    # S = x, Kc = x swapped, S Kc^T = [[0, 2], [2, 0]] (no 1/sqrt(d) scaling), V = x.
    a = 1 / (1 + math.exp(-2))  # softmax([0, 2])[1]
    av = torch.tensor([[(1 - a) * 1, a * 2], [a * 1, (1 - a) * 2]])
    assert torch.allclose(s, x)
    assert torch.allclose(out[0], 0.5 * av + x[0], atol=1e-6)


def test_windowed_layer_equals_global_attention_per_padded_window():
    torch.manual_seed(0)
    win = SemanticLayer(dim=8, num_classes=3, window=4).eval()
    glob = SemanticLayer(dim=8, num_classes=3, window=0).eval()
    glob.load_state_dict(win.state_dict())
    with torch.no_grad():
        win.blocks[0].gamma.fill_(1.0)
        glob.blocks[0].gamma.fill_(1.0)
    x = torch.randn(1, 6, 6, 8)  # padded to 8x8: four 4x4 windows
    tokens, prior = win(x)
    normed = torch.nn.functional.pad(win.norm(x), (0, 0, 0, 2, 0, 2))  # zeros after the norm
    blk = win.blocks[0]
    for i in range(2):
        for j in range(2):
            w = normed[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(1, 16, 8)
            s_ref, t_ref = blk(w)
            h, ww = min(4, 6 - 4 * i), min(4, 6 - 4 * j)
            got_t = tokens[:, 4 * i:4 * i + h, 4 * j:4 * j + ww]
            got_s = prior[:, 4 * i:4 * i + h, 4 * j:4 * j + ww]
            assert torch.allclose(got_t, t_ref.reshape(1, 4, 4, 8)[:, :h, :ww], atol=1e-5)
            assert torch.allclose(got_s, s_ref.reshape(1, 4, 4, 3)[:, :h, :ww], atol=1e-5)
    # A stage that fits one window is the same as global attention.
    x4 = torch.randn(2, 4, 4, 8)
    assert torch.allclose(win(x4)[0], glob(x4)[0], atol=1e-5)
    assert tuple(tokens.shape) == (1, 6, 6, 8) and tuple(prior.shape) == (1, 6, 6, 3)


def _first_semantic_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    blk = model.backbone.semantic_layers[0].blocks[0]
    return {"gamma": blk.gamma.grad, "mlp_res": blk.mlp_res.weight.grad,
            "mlp_v": blk.mlp_v.weight.grad}


def _step(method: SeMask, model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(2, 3, 64, 64, generator=g),
             "mask": torch.randint(0, 5, (2, 64, 64), generator=g)}
    opt.zero_grad()
    method.training_step(model, batch, seed)["loss"].backward()


def test_official_init_lets_the_semantic_branch_learn():
    torch.manual_seed(0)
    method = tiny_method()
    model = method.build().train()
    blk = model.backbone.semantic_layers[0].blocks[0]
    assert blk.gamma.item() == 0.0 and blk.mlp_res.weight.abs().sum() > 0  # trunc_normal, not 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(method, model, opt, 0)
    grads = _first_semantic_grads(model)
    # Step 1: gamma = 0 gates mlp_res/mlp_v, but gamma's own gradient <dL/dout, res(AV)> != 0.
    assert grads["gamma"].abs().item() > 0
    assert torch.count_nonzero(grads["mlp_res"]) == 0 and torch.count_nonzero(grads["mlp_v"]) == 0
    opt.step()
    assert blk.gamma.item() != 0.0
    _step(method, model, opt, 1)
    grads = _first_semantic_grads(model)
    assert all(g.abs().sum() > 0 for g in grads.values()), grads


def test_zeroing_mlp_res_and_gamma_freezes_the_branch_forever():
    torch.manual_seed(0)
    method = tiny_method()
    model = method.build().train()
    with torch.no_grad():
        for layer in model.backbone.semantic_layers:
            layer.blocks[0].mlp_res.weight.zero_()
            layer.blocks[0].mlp_res.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(3):
        _step(method, model, opt, seed)
        for name, g in _first_semantic_grads(model).items():
            assert g is not None and torch.count_nonzero(g) == 0, name  # exactly zero
        opt.step()


def test_loss_matches_hand_computation():
    target = torch.tensor([[[0, 1, 255]]])  # (B=1, H=1, W=3), one ignored pixel
    seg = torch.tensor([[[2.0, 0.0, 5.0]], [[0.0, 0.0, -5.0]]]).unsqueeze(0)  # (1, K=2, 1, 3)
    prior = torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 3.0, 1.0]]]).unsqueeze(0)
    ce_seg = [math.log(1 + math.exp(-2)), math.log(2)]
    ce_prior = [math.log(1 + math.exp(1)), math.log(1 + math.exp(-3))]
    out = semask_loss(seg, prior, target, prior_weight=0.4, ignore_index=255)
    assert out["loss_seg"].item() == pytest.approx(sum(ce_seg) / 3, abs=1e-6)  # all 3 pixels
    assert out["loss_prior"].item() == pytest.approx(sum(ce_prior) / 3, abs=1e-6)
    assert out["loss"].item() == pytest.approx((sum(ce_seg) + 0.4 * sum(ce_prior)) / 3, abs=1e-6)
    valid = semask_loss(seg, prior, target, mean_over_all_pixels=False)
    assert valid["loss"].item() == pytest.approx((sum(ce_seg) + 0.4 * sum(ce_prior)) / 2,
                                                 abs=1e-6)


def test_all_pixel_mean_is_valid_mean_scaled_by_valid_fraction():
    g = torch.Generator().manual_seed(0)
    seg, prior = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target[:, :3] = 255  # 48 of 128 pixels ignored
    a = semask_loss(seg, prior, target, mean_over_all_pixels=True)
    v = semask_loss(seg, prior, target, mean_over_all_pixels=False)
    for k in ("loss", "loss_seg", "loss_prior"):
        assert a[k].item() == pytest.approx(v[k].item() * 80 / 128, rel=1e-5)


def test_ohem_keeps_exactly_min_kept_times_batch_hardest_valid_pixels():
    g = torch.Generator().manual_seed(0)
    seg, prior = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target[0, 0] = 255
    ce = torch.nn.functional.cross_entropy(seg, target, ignore_index=255, reduction="none")
    w = ohem_weights(ce, target, 255, min_kept=5)
    assert int(w.sum()) == 10 and set(w.unique().tolist()) == {0.0, 1.0}
    assert (w[target == 255] == 0).all()
    kept_min = ce[w == 1].min()
    dropped_valid = ce[(w == 0) & (target != 255)]
    assert (dropped_valid <= kept_min).all()
    out = semask_loss(seg, prior, target, ohem_min_kept=5)
    assert out["loss_seg"].item() == pytest.approx(ce[w == 1].sum().item() / 128, rel=1e-5)
    plain = semask_loss(seg, prior, target)
    assert out["loss_prior"].item() == pytest.approx(plain["loss_prior"].item())  # seg CE only
    assert int(ohem_weights(ce, target, 255, min_kept=1000).sum()) == 120  # all valid kept


def test_training_step_combines_losses_and_ohem_knob():
    torch.manual_seed(0)
    method = tiny_method(knobs=SeMaskKnobs(ohem=True, ohem_min_kept=10, prior_weight=0.7))
    model = method.build().train()
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 5, (2, 64, 64))}
    out = method.training_step(model, batch, 0)
    assert out["loss"].item() == pytest.approx(
        out["loss_seg"].item() + 0.7 * out["loss_prior"].item(), rel=1e-5)
    # 20 of 8192 pixels carry the segmentation CE: far below an unweighted mean of ~log(5).
    assert out["loss_seg"].item() < 0.05 * math.log(5)
    with pytest.raises(ValueError, match="mask size"):
        method.training_step(model, {**batch, "mask": batch["mask"][:, :32]}, 0)


def test_param_groups_follow_the_official_decay_rule():
    method = tiny_method()
    model = method.build()
    groups = method.param_groups(model, {"lr": 1e-4, "weight_decay": 0.05,
                                         "no_decay": ["conv_seg.bias"]})
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["group"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert {g["group"]: g["weight_decay"] for g in groups} == {"decay": 0.05, "no_decay": 0.0}
    assert all(g["lr"] == 1e-4 for g in groups)
    nd, d = by_group["no_decay"], by_group["decay"]
    assert len(nd) + len(d) == len(names)
    assert "backbone.norm0.weight" in nd and "backbone.semantic_layers.0.norm.weight" in nd
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in nd
    assert "decode_head.conv_seg.bias" in nd  # from base["no_decay"]
    assert "backbone.semantic_layers.0.blocks.0.gamma" in d
    assert "decode_head.scale_heads.0.convs.0.bn.weight" in d  # mmcv names head BN "bn"
    assert all(("norm" in n) or ("relative_position" in n) or n.endswith("conv_seg.bias")
               for n in nd)


def test_pretrained_loading_reports_and_rejects(tmp_path):
    kw = {**TINY, "img_size": (64, 64)}
    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=7, **kw)
    path = tmp_path / "swin.pth"
    torch.save(src.state_dict(), path)
    method = tiny_method(pretrained=str(path))
    model = method.build()
    report = model.pretrained_report
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "head.fc.weight" in report["dropped"] and "norm.weight" in report["dropped"]
    assert "semantic_layers.0.blocks.0.gamma" in report["new"] and "norm3.bias" in report["new"]
    assert not any(k.startswith(("layers.", "patch_embed.")) for k in report["new"])
    assert torch.equal(model.backbone.layers[2].blocks[0].attn.qkv.weight,
                       src.layers[2].blocks[0].attn.qkv.weight)
    state = src.state_dict()
    del state["layers.1.blocks.0.mlp.fc1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing trunk keys: layers\.1\.blocks\.0\.mlp\.fc1"):
        tiny_method(pretrained=str(path)).build()
    with pytest.raises(FileNotFoundError):
        tiny_method(pretrained=str(tmp_path / "nope.pth")).build()


def test_bad_configuration_errors_name_the_value():
    with pytest.raises(ValueError, match="attention must be one of"):
        SeMaskKnobs(attention="local")
    with pytest.raises(ValueError, match="not a timm Swin"):
        tiny_method(encoder="resnet18", encoder_kwargs={}).build()
    with pytest.raises(ValueError, match="did you mean"):
        tiny_method(encoder="swin_tiny_patch4_window7").build()


def _load_preset(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    base = data.pop("base", None)
    if not base:
        return data
    merged = yaml.safe_load((path.parent / f"{base}.yaml").read_text())
    assert "base" not in merged, f"{path.name}: only one level of inheritance"
    for section, values in data.items():
        if isinstance(values, dict):
            sub = merged.setdefault(section, {})
            for k, v in values.items():
                sub[k] = {**sub[k], **v} if isinstance(v, dict) and k in sub else v
        else:
            merged[section] = values
    return merged


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_builds_and_trains_at_tiny_width(path):
    preset = _load_preset(path)
    num_classes = DATASET_CLASSES[path.stem.split("_")[0]]
    model_cfg = preset["model"]
    crop = preset["data"]["crop_size"]
    kw = model_cfg.get("encoder_kwargs", {})
    assert list(kw.get("img_size", crop)) == crop, "img_size must be the crop size"
    knobs = SeMaskKnobs(**preset.get("knobs", {}))
    if path.stem != "demo":  # the official recipe, at full width
        assert preset["optim"]["poly_power"] == 1.0 and preset["optim"]["warmup_steps"] == 1500
        assert preset["train"] == {"steps": 80000, "eval_every": 8000, "log_every": 50}
        assert kw["drop_path_rate"] == 0.3
        full = stage_attention(FULL_EMBED_DIM[model_cfg["encoder"]], num_classes, knobs.attention)
        wants_global = path.stem.endswith(("_t", "_s", "_l")) and not path.stem.startswith("city")
        assert full == (["windowed"] * 2 + ["global"] * 2 if wants_global else ["windowed"] * 4)
    tiny = {**kw, "img_size": [64, 64], "embed_dim": 16, "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 1, 1]}
    ctx = MethodContext(num_classes=num_classes, crop_size=(64, 64), model={
        **model_cfg, "decoder_channels": 16, "encoder_kwargs": tiny})
    method = SeMask(knobs, ctx)
    model = method.build().train()
    window = kw.get("window_size") or (12 if "window12" in model_cfg["encoder"] else 7)
    assert all(s.window in (0, window) for s in model.backbone.semantic_layers)
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, num_classes, (2, 64, 64))}
    out = method.training_step(model, batch, 0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.backbone.semantic_layers[3].blocks[0].gamma.grad.abs().sum() > 0  # gamma = 0 learns
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0


def test_predict_returns_input_size_logits_for_odd_sizes():
    torch.manual_seed(0)
    method = tiny_method(num_classes=4)
    model = method.build().eval()
    with torch.no_grad():
        logits = method.predict(model, torch.randn(2, 3, 70, 90))
    assert tuple(logits.shape) == (2, 4, 70, 90) and torch.isfinite(logits).all()
    model.train()
    out = method.training_step(model, {"image": torch.randn(1, 3, 70, 90),
                                       "mask": torch.randint(0, 4, (1, 70, 90))}, 0)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize(("encoder", "crop", "millions", "windows"), [
    ("swin_tiny_patch4_window7_224", 512, 35, [7, 7, 0, 0]),
    ("swin_small_patch4_window7_224", 512, 56, [7, 7, 0, 0]),
    ("swin_base_patch4_window12_384", 512, 96, [12, 12, 12, 12]),
    ("swin_large_patch4_window12_384", 640, 211, [12, 12, 0, 0]),
])
def test_full_size_models_match_the_reported_parameter_counts(encoder, crop, millions, windows):
    # Built on the meta device (no memory): the README's ADE20K parameter counts, K = 150.
    ctx = MethodContext(num_classes=150, crop_size=(crop, crop), model={
        "encoder": encoder, "decoder_channels": 256, "encoder_kwargs": {"img_size": [crop, crop]}})
    with torch.device("meta"):
        model = SeMask(SeMaskKnobs(), ctx).build()
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.5)
    assert [s.window for s in model.backbone.semantic_layers] == windows


# The official recipes (SeMask-FPN configs; spec section 2.4 and 2.5), one row per preset:
# lr, weight decay, crop, img_scale (= test scale), ratios ("list" = the fork's discrete
# {0.5, ..., 1.75}, "uniform" = (0.5, 2.0)), cat_max_ratio, effective batch, OHEM, warm-up ratio.
_ADE = dict(lr=1e-4, wd=1e-4, crop=512, scale=[2048, 512], ratios="list", cat=1.0, batch=16,
            ohem=False, warmup=1e-6)
_CITY = dict(lr=1e-3, wd=0.05, crop=768, scale=[2048, 1024], ratios="uniform", cat=0.75, batch=8,
             ohem=False, warmup=1e-5)
_COCO = dict(_ADE, ohem=True)
OFFICIAL = {
    "ade20k_swin_t": dict(_ADE, cat=0.75),  # ade20k_tiny.py
    "ade20k_swin_s": _ADE,
    "ade20k_swin_b": _ADE,
    "ade20k_swin_l": dict(_ADE, crop=640, scale=[2560, 640], ohem=True),
    "cityscapes_swin_t": _CITY,
    "cityscapes_swin_s": _CITY,
    "cityscapes_swin_b": dict(_CITY, warmup=1e-6),
    "cityscapes_swin_l": _CITY,
    "cocostuff10k_swin_t": _COCO,
    "cocostuff10k_swin_s": _COCO,
    "cocostuff10k_swin_b": _COCO,
    "cocostuff10k_swin_l": dict(_COCO, crop=640, scale=[2560, 640]),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_matches_the_official_recipe(name):
    preset, want = _load_preset(PRESETS / f"{name}.yaml"), OFFICIAL[name]
    data, optim = preset["data"], preset["optim"]
    assert (optim["name"], optim["lr"], optim["weight_decay"]) == ("adamw", want["lr"], want["wd"])
    assert optim["warmup_ratio"] == want["warmup"] and optim["min_lr"] == 0.0
    assert data["crop_size"] == [want["crop"]] * 2
    assert data["base_scale"] == want["scale"] and preset["eval"]["test_scale"] == want["scale"]
    if want["ratios"] == "list":
        assert data["scale_choices"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    else:
        assert not data.get("scale_choices") and data["scale_range"] == [0.5, 2.0]
    assert data["cat_max_ratio"] == want["cat"] and data["batch_size"] == want["batch"]
    assert preset["knobs"]["ohem"] is want["ohem"]
    assert preset["eval"]["mode"] == "whole"  # every official config: whole-image inference
    assert preset["augment"]["hflip"] == 0.5 and preset["augment"]["photometric"] is True
    assert preset["knobs"]["loss_mean_over_all_pixels"] is True  # mmseg 0.11's CE denominator
