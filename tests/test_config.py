"""Config: presets, overrides, validation reporting every error at once."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from methods import METHODS, PRESET_ROOT, get_method, list_presets, preset_path
from segray.config import (
    Config,
    ConfigError,
    deep_merge,
    load_preset,
    parse_overrides,
    resolve,
    to_dict,
    to_yaml,
)

ALL_PRESETS = [(m, p) for m in sorted(METHODS) for p in list_presets(m)]


def test_every_method_has_a_demo_preset():
    for name in METHODS:
        assert "demo" in list_presets(name), f"method {name} ships no demo preset"


def test_no_orphan_preset_folders():
    folders = {p.name for p in PRESET_ROOT.iterdir() if p.is_dir()}
    assert folders <= set(METHODS), f"preset folders without a registered method: {folders - set(METHODS)}"


@pytest.mark.parametrize(("method", "preset"), ALL_PRESETS)
def test_every_preset_loads_and_validates(method, preset):
    path = preset_path(method, preset)
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("# python jobs/train.py"), f"{path} must start with the command that runs it"
    raw = load_preset(path)
    assert "num_classes" not in yaml.safe_dump(raw), f"{path}: class count belongs to the manifest"
    cfg = resolve(raw, get_method(method).Knobs, method, source=str(path))
    assert isinstance(cfg, Config)
    # The saved form resolves back to the same config.
    again = dict(yaml.safe_load(to_yaml(cfg)))
    again.pop("method")
    assert to_dict(resolve(again, get_method(method).Knobs, method)) == to_dict(cfg)


def test_overrides_are_typed_and_nested():
    over = parse_overrides(["optim.lr=0.05", "data.crop_size=[32, 48]", "train.precision=fp32"])
    cfg = resolve(over, get_method("supervised").Knobs, "supervised")
    assert cfg.optim.lr == 0.05 and cfg.data.crop_size == [32, 48] and cfg.train.precision == "fp32"
    # an int where a float is expected is accepted and converted
    cfg = resolve(parse_overrides(["optim.lr=1"]), None, "supervised")
    assert isinstance(cfg.optim.lr, float)


def test_every_error_is_reported_at_once_with_suggestions():
    raw = parse_overrides([
        "optim.lr=fast", "optim.lrr=0.1", "train.precision=fp8", "data.crop_size=[0, 4]",
        "trian.steps=3", "knobs.label_smoothing=high",
    ])
    with pytest.raises(ConfigError) as info:
        resolve(raw, get_method("supervised").Knobs, "supervised")
    errors = info.value.errors
    text = str(info.value)
    assert len(errors) == 5, errors  # crop_size is checked only once types are right
    assert "optim.lr: expected a number, got 'fast'" in text
    assert "unknown key 'optim.lrr'; did you mean 'lr'?" in text
    assert "train.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16'" in text
    assert "unknown key 'trian'; did you mean 'train'?" in text
    assert "knobs.label_smoothing: expected a number" in text


def test_semantic_checks():
    raw = parse_overrides(["data.crop_size=[0, 4]", "workers=3", "data.batch_size=8",
                           "eval.mode=slide"])
    with pytest.raises(ConfigError) as info:
        resolve(raw, None, "supervised")
    text = str(info.value)
    assert "data.crop_size" in text and "divide evenly over 3 workers" in text
    assert "eval.mode: 'slide' needs eval.crop and eval.stride" in text
    raw = parse_overrides(["data.resize=[224, 224]", "data.base_scale=[1024, 224]"])
    with pytest.raises(ConfigError, match="data.resize and data.base_scale exclude each other"):
        resolve(raw, None, "supervised")
    with pytest.raises(ConfigError, match=r"data.resize: expected two positive integers"):
        resolve(parse_overrides(["data.resize=[224]"]), None, "supervised")
    with pytest.raises(ConfigError, match=r"data.resample.*'cv2', 'pillow'"):
        resolve(parse_overrides(["data.resample=bicubic"]), None, "supervised")
    with pytest.raises(ConfigError, match=r"data.mask_resample.*'nearest', 'cv2_nearest'"):
        resolve(parse_overrides(["data.mask_resample=area"]), None, "supervised")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["optim.lr"])


def test_one_level_of_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 5\n  log_every: 2\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain:\n  steps: 7\n")
    (tmp_path / "c.yaml").write_text("base: b\n")
    (tmp_path / "d.yaml").write_text("base: nope\n")
    merged = load_preset(tmp_path / "b.yaml")
    assert merged["train"] == {"steps": 7, "log_every": 2}
    with pytest.raises(ConfigError, match="one level"):
        load_preset(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="base preset 'nope' not found"):
        load_preset(tmp_path / "d.yaml")


def test_unknown_method_and_preset_suggest_the_closest():
    with pytest.raises(KeyError, match="did you mean 'supervised'"):
        get_method("supervisd")
    with pytest.raises(KeyError, match="did you mean 'demo'"):
        preset_path("supervised", "dmeo")


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"b": 3}})
    assert out == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


def test_config_has_no_dataset_values():
    names = {f.name for f in dataclasses.fields(Config)}
    for section in (Config().data, Config().model):
        names |= {f.name for f in dataclasses.fields(section)}
    assert not names & {"num_classes", "palette", "ignore_index"}


def test_a_methods_own_knob_validation_is_reported_as_a_config_error():
    raw = parse_overrides(["knobs.attention=foo", "knobs.prior_weight=-1"])
    with pytest.raises(ConfigError, match="attention must be one of") as info:
        resolve(raw, get_method("semask").Knobs, "semask")
    assert "prior_weight must be >= 0" in str(info.value)


def _args(*argv: str, method: str = "supervised"):
    from segray.cli import UsageParser, add_run_args

    p = UsageParser(prog="test")
    add_run_args(p, method_default=method)
    return p.parse_args(list(argv))


def test_scientific_notation_is_a_number_in_set_values_and_preset_files(tmp_path):
    from segray.cli import build_config
    from segray.config import yaml_load

    over = parse_overrides(["optim.lr=2e-4", "optim.weight_decay=1E-5", "optim.min_lr=+1.5e-7"])
    assert over["optim"] == {"lr": 2e-4, "weight_decay": 1e-5, "min_lr": 1.5e-7}
    cfg = resolve(over, None, "supervised")
    assert cfg.optim.lr == 2e-4 and cfg.optim.weight_decay == 1e-5
    # Everything else still reads as YAML 1.1 safe_load reads it.
    assert yaml_load("[10, 0x1F, 1_000, 1.5, .5, 1e, e5, abc, true, null, 2001-12-14]") == [
        10, 31, 1000, 1.5, 0.5, "1e", "e5", "abc", True, None, yaml.safe_load("2001-12-14")]
    assert isinstance(yaml_load("10"), int)
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 2e-4\n  warmup_ratio: 1e-6\n")
    assert load_preset(preset)["optim"] == {"lr": 2e-4, "warmup_ratio": 1e-6}
    cfg = build_config(_args("--preset-file", str(preset), "--set", "optim.weight_decay=3e-5"))
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (2e-4, 1e-6, 3e-5)


def test_non_finite_numbers_are_refused():
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, got inf"):
        resolve(parse_overrides(["optim.lr=.inf"]), None, "supervised")
    with pytest.raises(ConfigError, match=r"augment.hflip: expected a finite number, got nan"):
        resolve(parse_overrides(["augment.hflip=.nan"]), None, "supervised")


@pytest.mark.parametrize(("override", "expected"), [
    ("train.eval_max_images=-1",
     "train.eval_max_images: must be >= 0 (0 = the whole split), got -1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: must be >= 0 (0 = keep all), got -1"),
    ("train.max_failures=-2", "train.max_failures: must be >= -1"),
    ("train.report_images=-1", "train.report_images: must be >= 0"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer: must be >= 0"),
    ("data.prefetch_batches=-1", "data.prefetch_batches: must be >= 0"),
    ("data.rows_per_execution=-5", "data.rows_per_execution: must be >= 0"),
    ("data.cat_max_ratio=0", "data.cat_max_ratio: must be in (0, 1]"),
    ("data.cat_max_ratio=1.5", "data.cat_max_ratio: must be in (0, 1]"),
    ("data.scale_choices=[]", "data.scale_choices: expected a non-empty list of ratios > 0"),
    ("data.scale_choices=[0.5,-1]", "data.scale_choices: expected a non-empty list"),
    ("data.val_split=''", "data.val_split: must name a split"),
    ("model.decoder_channels=0", "model.decoder_channels: must be >= 1, got 0"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay: must be >= 0"),
    ("optim.momentum=1.5", "optim.momentum: must be in [0, 1]"),
    ("optim.betas=[0.9]", "optim.betas: expected two values in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "optim.betas: expected two values in [0, 1)"),
    ("optim.poly_power=-1", "optim.poly_power: must be >= 0"),
    ("optim.min_lr=-1", "optim.min_lr: must be >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0"),
    ("optim.warmup_ratio=2", "optim.warmup_ratio: must be in [0, 1]"),
    ("optim.step_gamma=0", "optim.step_gamma: must be > 0"),
    ("optim.grad_clip=-1", "optim.grad_clip: must be >= 0"),
    ("augment.hflip=1.5", "augment.hflip: must be in [0, 1]"),
    ("cpus_per_worker=-1", "cpus_per_worker: must be >= 0"),
    ("seed=-1", "seed: must be in [0, 4294967295] (NumPy's and Optuna's seed range), got -1"),
    ("seed=5000000000", "seed: must be in [0, 4294967295]"),
    ("eval.ratios=[]", None),  # no TTA: no ratios needed
    ("eval.ratios=[0.5,0]", "eval.ratios: every ratio must be > 0"),
    ("eval.tta=true eval.ratios=[]", "eval.ratios: eval.tta needs at least one ratio"),
    ("eval.crop=[64,64] eval.stride=[65,32]", "eval.stride: must be <= eval.crop"),
    ("train.precision=fp16",
     "train.precision: 'fp16' needs a CUDA device, but gpus_per_worker is 0"),
    ("train.precision=fp16 gpus_per_worker=1", None),
    ("train.precision=bf16", None),  # bf16 autocast exists on CPU
])
def test_every_numeric_and_enum_field_is_range_checked(override, expected):
    raw = parse_overrides(override.split(" "))
    if expected is None:
        resolve(raw, None, "supervised")
        return
    with pytest.raises(ConfigError) as info:
        resolve(raw, None, "supervised")
    assert expected in str(info.value), info.value


def test_errors_say_whether_a_value_came_from_the_command_line_or_the_file(tmp_path, capsys):
    from segray.cli import build_config

    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: fast\n")
    with pytest.raises(SystemExit) as info:
        build_config(_args("--preset-file", str(preset), "--set", "train.steps=many",
                           "--set", "trian.steps=3", "--batch-size", "0"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"3 problem(s) in {preset} and the command line" in err
    assert "train.steps: expected an integer, got 'many' (from --set train.steps=many)" in err
    assert "did you mean 'train'?" in err and "(from --set trian.steps=3)" in err
    assert "optim.lr: expected a number, got 'fast'\n" in err + "\n"  # from the file: no "from"
    with pytest.raises(SystemExit):
        build_config(_args("--preset-file", str(preset)))
    assert f"1 problem(s) in {preset}:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_config(_args("--batch-size", "0"))
    assert "data.batch_size: must be >= 1, got 0 (from --batch-size)" in capsys.readouterr().err


def test_errors_name_the_flag_as_the_job_spells_it(tmp_path):
    """jobs/tune.py spells ``workers`` as --workers-per-trial: the error says so."""
    from conftest import job_env, run_job

    proc = run_job("tune.py", "--workers-per-trial", "0", env=job_env(tmp_path), check=False,
                   timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert "workers: must be >= 1, got 0 (from --workers-per-trial)" in proc.stdout


def test_a_non_utf8_preset_file_is_a_config_error_naming_it(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# r\xe9glages\ntrain:\n  steps: 5\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{bad}: not UTF-8 text"):
        load_preset(bad)


def test_a_run_folders_config_yaml_starts_a_fresh_run(tmp_path, capsys):
    from segray.cli import build_config

    first = build_config(_args("--steps", "7", "--name", "old-run", "--storage", str(tmp_path)))
    saved = tmp_path / "old-run" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(to_yaml(first))
    cfg = build_config(_args("--preset-file", str(saved)))
    assert cfg.name == "" and cfg.storage == "" and cfg.train.steps == 7 and cfg.preset == "demo"
    note = capsys.readouterr().err
    assert "names a run (name: old-run" in note and "--name old-run" in note
    # An explicit --name (and --storage) picks the run: resuming it stays possible.
    cfg = build_config(_args("--preset-file", str(saved), "--name", "old-run",
                             "--storage", str(tmp_path)))
    assert cfg.name == "old-run" and cfg.storage == str(tmp_path)


def test_local_paths_are_saved_absolute(tmp_path, monkeypatch):
    from segray.cli import build_config

    monkeypatch.chdir(tmp_path)
    cfg = build_config(_args("--data", "data/synth", "--set", "model.pretrained=w/r18.pt"))
    assert cfg.data.uri == str(tmp_path / "data" / "synth")
    assert cfg.model.pretrained == str(tmp_path / "w" / "r18.pt")
    assert build_config(_args("--data", "s3://bucket/ds")).data.uri == "s3://bucket/ds"
    assert build_config(_args()).data.uri == ""  # the built-in synthetic set


def test_a_non_demo_preset_without_weights_warns(capsys):
    from segray.cli import build_config

    build_config(_args("--preset", "ade20k_deeplabv3plus_r50"))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: model.pretrained is empty: training resnet50 from random "
                   "initialisation; the paper recipe starts from pretrained weights (pass --set "
                   "model.pretrained=PATH_OR_S3_URI)"]
    build_config(_args("--preset", "ade20k_deeplabv3plus_r50", "--set", "model.pretrained=/w.pt"))
    build_config(_args())  # the demo preset learns from scratch on purpose
    # MaskSup's U-Net++ recipe trains from scratch as the official code; its LeViT one does not.
    build_config(_args("--preset", "nyudv2_unetpp", method="masksup"))
    assert capsys.readouterr().err == ""
    build_config(_args("--preset", "glas_levit_unet", method="masksup"))
    assert "training levit_unet_384 from random" in capsys.readouterr().err
