"""Tests of segray.models: encoders, decoders, the padded SegModel, build_model and weight loading."""

from __future__ import annotations

import hashlib
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from segray.models import (
    DECODERS,
    DeepLabV3PlusHead,
    FPNHead,
    SegModel,
    TimmEncoder,
    UNetDecoder,
    build_model,
    count_parameters,
    default_atrous_rates,
    load_encoder_weights,
)

# Small variants keep the suite fast on CPU; Swin emits NHWC maps, ViT goes through timm's
# getter-based feature wrapper, ConvNeXt/Swin through the flattening one (stages.0 -> stages_0).
SWIN = (
    "swin_tiny_patch4_window7_224",
    dict(
        img_size=64,
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        strict_img_size=False,
    ),
)
ENCODERS = [("resnet18", {}), ("convnext_atto", {}), SWIN]
K = 3


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- encoder ------------------------------------------------------------------------------------


def test_encoder_reports_channels_and_strides() -> None:
    enc = TimmEncoder("resnet18")
    assert enc.channels == [64, 64, 128, 256, 512]
    assert enc.strides == [2, 4, 8, 16, 32]
    feats = enc(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(enc.channels, enc.strides)
    ]


def test_encoder_out_indices_selects_levels() -> None:
    enc = TimmEncoder("resnet18", out_indices=(1, 2, 3, 4))
    assert enc.strides == [4, 8, 16, 32]
    assert len(enc(torch.randn(1, 3, 64, 64))) == 4


def test_nhwc_encoder_is_permuted_to_nchw() -> None:
    enc = TimmEncoder(SWIN[0], **SWIN[1]).eval()
    assert enc.nhwc
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = enc(x)
        raw = enc.body(x)
    for f, r, c, s in zip(feats, raw, enc.channels, enc.strides):
        assert tuple(f.shape) == (2, c, 64 // s, 64 // s)
        assert tuple(r.shape) == (2, 64 // s, 64 // s, c)  # what timm gives: NHWC
        torch.testing.assert_close(f, r.permute(0, 3, 1, 2))


def test_unknown_encoder_suggests_closest_name() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet81'.*'resnet18'"):
        TimmEncoder("resnet81")
    with pytest.raises(ValueError, match=r"'convnext_tiny'"):
        build_model("convnxt_tiny", num_classes=K)


# --- decoders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("encoder,kwargs", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_every_decoder_with_every_encoder_gives_input_size_logits(
    decoder: str, encoder: str, kwargs: dict
) -> None:
    model = build_model(encoder, decoder, num_classes=K, decoder_channels=32, encoder_kwargs=kwargs)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, K, 64, 64)
    # The decoder's own output sits at its declared stride before the model resizes it.
    raw = model.decoder(model.encoder(x))
    s = model.decoder.output_stride
    assert raw.shape == (2, K, 64 // s, 64 // s)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_odd_input_sizes_and_backward(decoder: str) -> None:
    model = build_model("resnet18", decoder, num_classes=K, decoder_channels=32)
    x = torch.randn(2, 3, 70, 50)
    logits = model(x)
    assert logits.shape == (2, K, 70, 50)
    target = torch.randint(0, K, (2, 70, 50))
    F.cross_entropy(logits, target).backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0


def test_swin_takes_odd_input_sizes() -> None:
    model = build_model(SWIN[0], "fpn", num_classes=K, decoder_channels=16, encoder_kwargs=SWIN[1])
    assert model(torch.randn(1, 3, 70, 50)).shape == (1, K, 70, 50)


def test_padding_is_bottom_right_and_cropped_back() -> None:
    model = build_model("resnet18", "fpn", num_classes=K, decoder_channels=16).eval()
    x = torch.randn(1, 3, 70, 50)
    padded = F.pad(x, (0, 14, 0, 26))  # to (96, 64), multiples of the stride 32
    with torch.no_grad():
        a = model(x)
        b = model(padded)[..., :70, :50]
    torch.testing.assert_close(a, b)


def test_forward_features_returns_decoder_features() -> None:
    model = build_model("resnet18", "deeplabv3plus", num_classes=K, decoder_channels=32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        torch.testing.assert_close(logits, model(x))
    assert logits.shape == (2, K, 64, 64)
    assert feats.shape == (2, 32, 16, 16)  # channels wide, at stride 4


def test_fpn_scale_heads_follow_log2_of_stride() -> None:
    head = FPNHead([64, 128, 256, 512], [4, 8, 16, 32], num_classes=K, channels=8)
    # Stride s gets max(1, log2(s / 4)) conv units and log2(s / 4) 2x upsamplings.
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in head.scale_heads]
    ups = [sum(isinstance(m, torch.nn.Upsample) for m in h.modules()) for h in head.scale_heads]
    assert convs == [1, 1, 2, 3]
    assert ups == [0, 1, 2, 3]
    assert head.output_stride == 4


def test_fpn_skips_stride_two_and_can_drop_the_neck() -> None:
    strides = [2, 4, 8, 16, 32]
    head = FPNHead([8, 16, 24, 32, 40], strides, num_classes=K, channels=8, neck=False)
    assert head.used == [1, 2, 3, 4] and head.lateral is None
    feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([8, 16, 24, 32, 40], strides)]
    assert head(feats).shape == (1, K, 16, 16)
    with pytest.raises(ValueError, match="built for 5 feature maps but got 4"):
        head(feats[1:])


def test_fpn_neck_top_down_sum_reaches_finest_level() -> None:
    head = FPNHead([4, 4], [4, 8], num_classes=K, channels=4).eval()
    feats = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4)]
    base = head._neck(feats)[0]
    feats[1] = torch.randn(1, 4, 4, 4)
    # Only the coarse input changed: the fine output changes through the top-down path.
    assert not torch.allclose(head._neck(feats)[0], base)


def test_aspp_rates_scale_with_output_stride() -> None:
    assert default_atrous_rates(16) == (6, 12, 18)
    assert default_atrous_rates(8) == (12, 24, 36)
    assert default_atrous_rates(32) == (3, 6, 9)
    with pytest.raises(ValueError, match="output stride 4"):
        default_atrous_rates(4)
    model = build_model(
        "resnet18",
        "deeplabv3plus",
        num_classes=K,
        decoder_channels=16,
        encoder_kwargs={"output_stride": 16},
    )
    assert model.encoder.strides[-1] == 16
    assert model.decoder.atrous_rates == (6, 12, 18)
    dilations = [b[0].dilation[0] for b in model.decoder.aspp.branches]
    assert dilations == [1, 6, 12, 18]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, K, 64, 64)


def test_deeplab_low_level_projection_and_batch_of_one() -> None:
    head = DeepLabV3PlusHead([64, 64, 128, 256, 512], [2, 4, 8, 16, 32], num_classes=K, channels=16)
    assert head.low_index == 1 and head.output_stride == 4
    assert head.low_proj[0].out_channels == 48
    # One image per batch in training mode must work (image pooling without BatchNorm).
    model = SegModel(TimmEncoder("resnet18"), head).train()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, K, 64, 64)


def test_unet_widths_halve_towards_full_resolution() -> None:
    dec = UNetDecoder([64, 64, 128, 256, 512], [2, 4, 8, 16, 32], num_classes=K, channels=64)
    widths = [b.convs[-1][0].out_channels for b in dec.blocks]
    assert widths == [64, 32, 16, 16]
    assert dec.output_stride == 2 and dec.out_channels == 16


def test_classifier_starts_near_uniform() -> None:
    model = build_model("resnet18", "fpn", num_classes=5, decoder_channels=16)
    conv = model.decoder.classifier.conv
    assert torch.count_nonzero(conv.bias) == 0
    assert abs(conv.weight.std().item() - 0.01) < 0.004


def test_unknown_decoder_names_closest_and_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown decoder 'fnp'; did you mean 'fpn'\?.*unet"):
        build_model("resnet18", "fnp", num_classes=K)


def test_decoder_rejects_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        UNetDecoder([8, 16], [4], num_classes=K)


def test_count_parameters() -> None:
    model = build_model("resnet18", "unet", num_classes=K, decoder_channels=16)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model.decoder)
    # 11,176,512 = resnet18 without its 1000-class fc (11,689,512 - 513,000).
    assert count_parameters(model.encoder) == 11_176_512


# --- weights ------------------------------------------------------------------------------------

WEIGHT_CASES = [
    ("resnet18", {}, ["fc.weight", "fc.bias"]),
    ("convnext_atto", {}, ["head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"]),
    ("efficientnet_b0", {}, ["conv_head.weight", "bn2.weight", "classifier.weight"]),
    (*SWIN, ["norm.weight", "head.fc.weight"]),
    ("vit_tiny_patch16_224", dict(img_size=64, depth=3), ["head.weight"]),
]


@pytest.mark.parametrize("name,kwargs,head_keys", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_classifier_weights_load_into_encoder(tmp_path, name, kwargs, head_keys) -> None:
    classifier = timm.create_model(name, pretrained=False, **kwargs).eval()
    path = tmp_path / "weights.pth"
    torch.save(classifier.state_dict(), path)
    enc = TimmEncoder(name, **kwargs).eval()
    report = load_encoder_weights(enc, str(path))

    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.loaded == len(enc.state_dict())
    assert report.missing == []
    assert set(head_keys) <= set(report.unexpected)
    assert not any(k.startswith(("layer", "stages", "blocks")) for k in report.unexpected)
    assert str(report.loaded) in report.summary() and head_keys[0] in report.summary()
    # Independent check: the encoder now computes what the classifier's own trunk computes.
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = enc(x)
        theirs = classifier.forward_intermediates(x, indices=len(ours), intermediates_only=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_wrapped_and_prefixed_state_dicts(tmp_path) -> None:
    source = timm.create_model("resnet18", pretrained=False)
    wrapped = {
        "state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()},
        "epoch": 3,
    }
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    enc = TimmEncoder("resnet18")
    report = load_encoder_weights(enc, str(path))
    assert report.prefix == "backbone."
    torch.testing.assert_close(enc.body.conv1.weight, source.conv1.weight)


def test_segmodel_checkpoint_reloads_encoder(tmp_path) -> None:
    model = build_model("convnext_atto", "fpn", num_classes=K, decoder_channels=16)
    path = tmp_path / "seg.pth"
    torch.save({"model": model.state_dict()}, path)
    other = build_model(
        "convnext_atto", "fpn", num_classes=K, decoder_channels=16, pretrained=str(path)
    )
    assert other.pretrained_report.prefix == "encoder."
    assert all(k.startswith("decoder.") for k in other.pretrained_report.unexpected)
    for (k, a), b in zip(model.encoder.state_dict().items(), other.encoder.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_key_is_an_error_naming_it(tmp_path) -> None:
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    del state["layer2.0.conv1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    enc = TimmEncoder("resnet18")
    with pytest.raises(ValueError, match=r"missing from the file: body\.layer2\.0\.conv1\.weight"):
        load_encoder_weights(enc, str(path))
    report = load_encoder_weights(enc, str(path), allow_missing=("*layer2.0.conv1.*",))
    assert report.missing == ["body.layer2.0.conv1.weight"]


def test_shape_mismatch_is_an_error_naming_key_and_shapes(tmp_path) -> None:
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    msg = r"layer1\.0\.conv1\.weight.*\(64, 64, 5, 5\) vs encoder \(64, 64, 3, 3\)"
    with pytest.raises(ValueError, match=msg):
        load_encoder_weights(TimmEncoder("resnet18"), str(path))


def test_safetensors_and_bad_files(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "w.safetensors"
    safetensors.save_file(source.state_dict(), str(path))
    enc = TimmEncoder("resnet18")
    report = load_encoder_weights(enc, str(path))
    assert report.loaded == len(enc.state_dict())
    torch.testing.assert_close(enc.body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    torch.testing.assert_close(enc.body.conv1.weight, source.conv1.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_encoder_weights(enc, str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_encoder_weights(enc, str(tmp_path / "junk.pth"))


def test_initial_loss_is_close_to_log_k() -> None:
    model = build_model("resnet18", "fpn", num_classes=8, decoder_channels=16).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    loss = F.cross_entropy(logits, torch.randint(0, 8, (2, 64, 64)))
    assert abs(loss.item() - math.log(8)) < 0.2
