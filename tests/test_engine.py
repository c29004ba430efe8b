"""The engine's step logic in plain PyTorch (no Ray): augmentation, method step, optimizer, hooks,
gradient averaging, learning-rate schedules."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods import get_method
from segray.config import OptimConfig, parse_overrides, resolve
from segray.data import DatasetError
from segray.data.synthetic import render_scene
from segray.engine import StepRunner, average_gradients, build_method, endless, to_floats
from segray.optim import lr_factor
from segray.runtime import resolve_runtime


class _Info:
    num_classes = 6
    ignore_index = 255
    classes = [f"c{i}" for i in range(6)]


def _batch(seed: int, n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, masks = zip(*(render_scene(rng, size, size) for _ in range(n)))
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    mask = torch.from_numpy(np.stack(masks).astype(np.int64))  # (B, H, W)
    return {"image": image, "mask": mask, "image_labels": torch.zeros(n, 6)}


def _config(method: str, *extra: str):
    raw = parse_overrides(["model.encoder=resnet18", "model.decoder_channels=32", "train.steps=40",
                           "optim.lr=0.003", "optim.warmup_steps=0", "augment.photometric=false",
                           *extra])
    return resolve(raw, get_method(method).Knobs, method)


def test_supervised_step_learns_one_batch():
    torch.manual_seed(0)
    cfg = _config("supervised")
    method = build_method(cfg, _Info)
    runner = StepRunner(method, method.build(), cfg, resolve_runtime(torch.device("cpu")), 255)
    batch = _batch(0)
    losses = [float(runner.step(batch)["loss"]) for _ in range(25)]
    assert runner.step_count == 25
    assert losses[-1] < 0.5 * losses[0], losses
    state = runner.state_dict()
    assert state["step"] == 25 and "model" in state and "optimizer" in state


def test_prepare_widens_narrow_masks_on_the_device():
    # The stream delivers uint8 masks (see TrainCollate); losses index with int64.
    cfg = _config("supervised", "augment.hflip=1.0")
    method = build_method(cfg, _Info)
    runner = StepRunner(method, method.build(), cfg, resolve_runtime(torch.device("cpu")), 255)
    raw = _batch(3)
    raw["mask"][:, :, :5] = 255
    narrow = dict(raw, mask=raw["mask"].to(torch.uint8))
    batch = runner.prepare(narrow)
    assert batch["mask"].dtype == torch.int64
    assert torch.equal(batch["mask"], raw["mask"].flip(-1))  # flipped with its image, same ids


def test_teacher_student_method_uses_unlabeled_stream_and_ema_hook():
    torch.manual_seed(0)
    cfg = _config("ema_method:EMATeacher", "knobs.threshold=0.0")
    method = build_method(cfg, _Info)
    model = method.build()
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    runner = StepRunner(method, model, cfg, resolve_runtime(torch.device("cpu")), 255)
    batch = _batch(1)
    batch["unlabeled_image"] = _batch(2)["image"]
    logs = runner.step(batch)
    logs = to_floats(runner.step(batch), 2)
    assert {"loss", "loss_sup", "loss_unsup", "pseudo_kept"} <= set(logs)
    assert logs["pseudo_kept"] == 1.0  # threshold 0 keeps every pixel
    assert int(model.ema_updates) == 2
    moved = any(not torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))
    assert moved, "the EMA hook never updated the teacher"
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_missing_loss_entry_is_a_clear_error():
    cfg = _config("supervised")
    method = build_method(cfg, _Info)
    method.training_step = lambda model, batch, step: {"total": torch.tensor(1.0)}
    runner = StepRunner(method, method.build(), cfg, resolve_runtime(torch.device("cpu")), 255)
    with pytest.raises(KeyError, match="must return a 'loss' entry"):
        runner.step(_batch(0, n=2))


def test_resume_applies_the_new_optimizer_settings_to_the_saved_state():
    """A resume may change lr and weight decay (check_resume allows it): the new values apply,
    at the schedule's factor for the restored step, on the restored Adam moments."""
    torch.manual_seed(0)
    cfg = _config("supervised", "optim.weight_decay=0.01")
    method = build_method(cfg, _Info)
    runner = StepRunner(method, method.build(), cfg, resolve_runtime(torch.device("cpu")), 255)
    for i in range(3):
        runner.step(_batch(i, n=2))
    state = runner.state_dict()

    cfg2 = _config("supervised", "optim.lr=0.03", "optim.weight_decay=0.05")
    method2 = build_method(cfg2, _Info)
    resumed = StepRunner(method2, method2.build(), cfg2, resolve_runtime(torch.device("cpu")), 255)
    resumed.load_state_dict(state)
    factor = lr_factor(3, 40, cfg2.optim)
    decayed = resumed.optimizer.param_groups[0]
    assert decayed["lr"] == pytest.approx(0.03 * factor) and decayed["weight_decay"] == 0.05
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(0.03 * factor)
    assert resumed.step_count == 3
    saved = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], saved)
    resumed.step(_batch(9, n=2))  # the schedule goes on from there with the new base lr
    assert decayed["lr"] == pytest.approx(0.03 * lr_factor(4, 40, cfg2.optim))


def test_nonfinite_weights_are_named():
    cfg = _config("supervised")
    method = build_method(cfg, _Info)
    runner = StepRunner(method, method.build(), cfg, resolve_runtime(torch.device("cpu")), 255)
    assert runner.nonfinite_tensors() == []
    name, param = next(iter(runner.model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    assert runner.nonfinite_tensors() == [name]


def test_endless_restarts_epochs_and_rejects_empty_streams():
    it = endless(lambda: iter([1, 2]), "train")
    assert [next(it) for _ in range(5)] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]
    with pytest.raises(DatasetError, match=r"'train' stream yielded no batch .*\(2 x 8\)") as e:
        next(endless(lambda: iter([]), "train", batch=(2, 8)))
    assert e.value.fix == "lower data.batch_size"

    class Skipped:  # what endless reads of a SkipCounter (an actor behind it)
        total = 3

        def records(self):
            return [{"shard": "s3://b/d/train-00000.parquet", "key": "a", "row": 0,
                     "reason": "image: cannot decode"}]

    with pytest.raises(DatasetError, match=r"3 bad rows were skipped .* key 'a' in shard "
                                           r"s3://b/d/train-00000.parquet: image: cannot") as e:
        next(endless(lambda: iter([]), "train", Skipped()))
    # The fix survives the pickling Ray does to a worker's exception.
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is DatasetError and str(again) == str(e.value)
    assert again.fix == "fix or remove the bad rows (re-create the dataset)"


def test_poly_schedule_with_warmup_matches_mmcv():
    cfg = OptimConfig(lr=0.01, schedule="poly", poly_power=1.0, warmup_steps=10, warmup_ratio=1e-6)
    assert lr_factor(0, 100, cfg) == pytest.approx(1e-6)
    # mmcv: poly lr × (1 - (1 - t/w)(1 - ratio))
    assert lr_factor(5, 100, cfg) == pytest.approx((1 - 5 / 100) * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)
    cfg = OptimConfig(lr=0.01, schedule="poly", poly_power=0.9, min_lr=1e-4)
    assert lr_factor(100, 100, cfg) == pytest.approx(1e-4 / 0.01)
    cfg = OptimConfig(lr=0.01, schedule="step", step_size=60, step_gamma=0.1)
    assert [lr_factor(s, 1000, cfg) for s in (0, 59, 60, 120)] == pytest.approx([1, 1, 0.1, 0.01])


def _grad_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = torch.nn.Linear(3, 2)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(rank + 1) * (i + 1))
    average_gradients(model, 2, bucket_mb=1e-6)  # tiny buckets: one tensor per all_reduce
    out[rank] = [p.grad.clone() for p in model.parameters()]
    dist.destroy_process_group()


def test_average_gradients_across_two_gloo_workers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_grad_worker, args=(port, out), nprocs=2, join=True)
    for rank in (0, 1):
        for i, g in enumerate(out[rank]):
            assert torch.allclose(g, torch.full_like(g, 1.5 * (i + 1)))


def test_non_finite_loss_is_a_clear_error():
    with pytest.raises(FloatingPointError, match="loss became nan at step 7; lower optim.lr"):
        to_floats({"loss": torch.tensor(float("nan")), "lr": 0.1}, 7)


def test_the_engine_never_names_a_method():
    """The shared loop, data plane and Tune wiring know no method: no import, no string, no name."""
    import ast
    from pathlib import Path

    from methods import METHODS

    names = set(METHODS) | {cls.__name__.lower() for cls in METHODS.values()}
    root = Path(__file__).resolve().parents[1] / "platform" / "segray"
    offenders = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            words = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                words = [node.value.lower()]
            elif isinstance(node, ast.Name | ast.alias):
                words = [(getattr(node, "id", None) or node.name).lower()]
            elif isinstance(node, ast.ImportFrom):
                words = [(node.module or "").lower()]
            if any(w.startswith(f"methods.{n}") or w == n for w in words for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders


def test_eval_cap_is_shared_exactly_over_workers():
    from segray.worker import eval_share

    assert eval_share(0, 0, 4) is None  # no cap: every worker evaluates its whole share
    for n in (1, 3, 10, 16):
        for world in (1, 2, 4, 8):
            parts = [eval_share(n, rank, world) for rank in range(world)]
            assert sum(parts) == n and max(parts) - min(parts) <= 1, (n, world, parts)
    assert eval_share(3, 3, 4) == 0  # a cap below the worker count leaves a worker nothing
