"""The body of a Ray Train worker: streams, the step loop, evaluation, checkpoints, report.

Every rank runs the same code; rank 0 alone writes the run folder's files. ``ray.train.report`` is a
barrier, so every rank reports at the same evaluation steps.

A bad row met while streaming (``data.on_bad_sample=error``) stops the run: the worker records it
in the run folder (``data_error.json``) and fails. Ray Train's retries would read the same bytes
again, so each retry fails at once on that record instead of rebuilding the model and streams; the
driver then reports the row as an input error (:func:`segray.launch.run_training`).

Divergence (the loss or the weights became NaN or infinite, :class:`~segray.engine.Diverged`) is
handled the same way: a retry would restore the last checkpoint and replay the same batches into
the same blow-up (with ``train.max_failures=-1``, forever), so the worker records it
(``diverged.json``) and every retry fails at once on the record.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from segray import report, storage
from segray.checkpoint import checkpoint_name, load_state
from segray.config import Config
from segray.data import BadSampleError, DatasetError, eval_rows, train_collate
from segray.engine import (
    DIVERGED_FIX,
    Diverged,
    StepRunner,
    endless,
    save_checkpoint,
    setup_worker,
    to_floats,
)
from segray.evaluation import evaluate
from segray.launch import data_seed
from segray.runtime import cpu_threads, seed_everything
from segray.telemetry import WorkerTelemetry


def run_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Train on this worker's shard; returns the run summary on rank 0 (``Result.return_value``).

    Raises:
        BadSampleError: a bad row stopped the run (now or in an earlier attempt of this fit).
        DatasetError: so did a shard that differs from its manifest.
        Diverged: training diverged (now or in an earlier attempt of this fit).
    """
    run_uri: str = loop_config["run_uri"]
    recorded = report.read_data_error(run_uri)
    if recorded is not None:  # an earlier attempt met it; the bytes have not changed since
        raise recorded
    diverged = report.read_divergence(run_uri)
    if diverged is not None:  # so would this attempt, from the same checkpoint and batches
        raise Diverged(diverged["message"], diverged["step"])
    try:
        return _train(loop_config)
    except Diverged as e:
        report.write_divergence(run_uri, e.step, str(e))
        raise
    except Exception as e:
        bad = data_error_in(e)
        if bad is not None:
            report.write_data_error(run_uri, bad)
        raise


def data_error_in(error: BaseException) -> BadSampleError | DatasetError | None:
    """The bad row (:class:`BadSampleError`) or bad shard (:class:`DatasetError`) behind
    ``error``, if any: input errors that a retry would only meet again.

    Ray re-raises a decode task's error as ``RayTaskError(BadSampleError)``, whose ``cause`` is
    the original (with its shard, key and reason); other code may chain it as ``__cause__``.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, BadSampleError | DatasetError):
            return cause
        if type(error) in (BadSampleError, DatasetError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _train(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    cfg: Config = loop_config["config"]
    info = loop_config["info"]
    run_uri: str = loop_config["run_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cpu_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    method, runner = setup_worker(cfg, info, device, world)
    if rank == 0:
        report.write_weights_provenance(run_uri, runner.model)

    history: list[dict[str, Any]] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            state = load_state(folder)
        runner.load_state_dict(state)
        history = [h for h in state.get("history", []) if h.get("step", 0) <= runner.step_count]
        history.append({"step": runner.step_count, "event": "resumed", "rank": rank,
                        "stream_seed": loop_config.get("stream_seed")})
        if rank == 0:
            _say(f"[segray] resumed from {checkpoint_name(runner.step_count)}")
    seed_everything(cfg.seed + 1009 * rank + runner.step_count)

    per_worker = cfg.data.batch_size // world
    streams = _streams(method, cfg, per_worker, device, loop_config.get("skips"),
                       data_seed(cfg.seed, runner.step_count))
    telemetry = WorkerTelemetry(cfg.method, cfg.name)
    total = cfg.train.steps
    eval_every = cfg.train.eval_every or total
    window = {"t0": time.perf_counter(), "wait": 0.0, "images": 0, "steps": 0}
    summary = None
    reported_final = False
    last_epoch = None

    while runner.step_count < total:
        t_wait = time.perf_counter()
        raw, epoch = _next_batch(streams)
        window["wait"] += time.perf_counter() - t_wait
        if last_epoch is not None and epoch != last_epoch:
            _epoch_end(method, runner, last_epoch)
        last_epoch = epoch
        logs = runner.step(raw)
        window["images"] += per_worker * world
        window["steps"] += 1
        step = runner.step_count
        if step % cfg.train.log_every == 0 or step == total:
            entry = _log_entry(step, to_floats(logs, step), window, device)
            history.append(entry)
            telemetry.train(entry)
            if rank == 0:
                _say(_progress_line(entry, total))
                if not storage.is_s3(run_uri):
                    report.write_history(run_uri, history)
            window.update(t0=time.perf_counter(), wait=0.0, images=0, steps=0)
        if step % eval_every == 0 or step == total:
            summary = _eval_and_report(loop_config, method, runner, history, telemetry)
            reported_final = step == total
            # Throughput is measured between evaluations: the window restarts after one.
            window.update(t0=time.perf_counter(), wait=0.0, images=0, steps=0)
    if not reported_final:  # resumed from the final checkpoint: no step ran
        # Every rank decides before any can write the summary (rank 0 writes it only after the
        # evaluation's all-reduce, which waits for them all).
        if report.finished(run_uri, total):
            summary = report.read_summary(run_uri) if rank == 0 else None
        else:  # the run died after storing the final checkpoint, before its summary: evaluate
            # and finish the report; the checkpoint is stored already, never saved again.
            summary = _eval_and_report(loop_config, method, runner, history, telemetry,
                                       save=False)
    if loop_config.get("flush_metrics"):
        telemetry.flush()  # Train kills workers on return; let the last values reach Prometheus
    return summary


def _eval_and_report(loop_config: dict[str, Any], method: Any, runner: StepRunner,
                     history: list[dict], telemetry: WorkerTelemetry,
                     save: bool = True) -> dict[str, Any] | None:
    """Evaluate, checkpoint (unless ``save`` is false: the step's checkpoint is stored already)
    and report at the current step; at the last step also the run's summary."""
    cfg, info, run_uri = loop_config["config"], loop_config["info"], loop_config["run_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    step = runner.step_count
    final = step >= cfg.train.steps
    result = _evaluate(method, runner, cfg, info, rank, world, keep=final)
    metrics = result.summary()
    if loop_config.get("skips") is not None:
        metrics["data/bad_samples_skipped"] = loop_config["skips"].total
    entry = {"step": step, **{k: v for k, v in metrics.items() if k != "val/IoU"}}
    history[:] = [h for h in history if not (h.get("step") == step and "val/mIoU" in h)]
    history.append(entry)
    telemetry.evaluation(entry)
    return _report(cfg, info, run_uri, runner, history, metrics, result, rank, final, save)


def _say(line: str) -> None:
    # Ray Train patches print() and, with Ray's wrapped stdout, emits each line twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _streams(method: Any, cfg: Config, per_worker: int, device: torch.device,
             skips: Any, seed: int) -> dict[str, Any]:
    def iterator(name: str):
        shard = ray.train.get_dataset_shard(name)
        return endless(lambda: shard.iter_torch_batches(
            batch_size=per_worker, collate_fn=train_collate, drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches, device=device,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=seed + ray.train.get_context().get_world_rank()), name,
            skips, (ray.train.get_context().get_world_size(), per_worker))

    streams = {"labeled": iterator("train")}
    if "unlabeled" in method.streams:
        streams["unlabeled"] = iterator("unlabeled")
    return streams


def _next_batch(streams: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    epoch, raw = next(streams["labeled"])
    raw = dict(raw)
    if "unlabeled" in streams:
        _, unl = next(streams["unlabeled"])
        raw["unlabeled_image"] = unl["image"]
    return raw, epoch


def _epoch_end(method: Any, runner: StepRunner, epoch: int) -> None:
    hook = getattr(method, "on_epoch_end", None)
    if callable(hook):
        hook(runner.model, epoch)


def _log_entry(step: int, logs: dict[str, float], window: dict, device: torch.device) -> dict:
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    entry = {"step": step, **{f"train/{k}": v for k, v in logs.items()}}
    entry["train/images_per_s"] = window["images"] / elapsed
    entry["train/step_time_s"] = elapsed / max(window["steps"], 1)
    entry["train/data_wait_share"] = window["wait"] / elapsed
    entry["time"] = time.time()
    if device.type == "cuda":
        entry["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return entry


def _progress_line(entry: dict, total: int) -> str:
    step = entry["step"]
    width = 20
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    return (f"[segray] [{bar}] step {step}/{total} loss {entry['train/loss']:.4f} "
            f"lr {entry['train/lr']:.2e} {entry['train/images_per_s']:.1f} img/s "
            f"data-wait {100 * entry['train/data_wait_share']:.0f}%")


def eval_share(max_images: int, rank: int, world: int) -> int | None:
    """This rank's part of ``train.eval_max_images`` (0 = the whole split: None).

    The parts add up to the cap exactly: the first ``max_images % world`` ranks take one more,
    and a rank whose part is 0 evaluates nothing (it still joins the all-reduce).
    """
    if not max_images:
        return None
    return max_images // world + (rank < max_images % world)


def _evaluate(method: Any, runner: StepRunner, cfg: Config, info: Any, rank: int, world: int,
              keep: bool) -> Any:
    rows = eval_rows(ray.train.get_dataset_shard("val"), rank=rank, world=world)
    result = evaluate(
        method, runner.model, rows, num_classes=info.num_classes, ignore_index=info.ignore_index,
        eval_cfg=cfg.eval, mean=cfg.augment.mean, std=cfg.augment.std,
        device=runner.runtime.device, autocast=runner.runtime.autocast,
        keep=cfg.train.report_images if keep and rank == 0 else 0,
        max_images=eval_share(cfg.train.eval_max_images, rank, world),
    )
    return result.all_reduce()


def _report(cfg: Config, info: Any, run_uri: str, runner: StepRunner, history: list[dict],
            metrics: dict[str, Any], result: Any, rank: int, final: bool,
            save: bool) -> dict[str, Any] | None:
    """Report the step's metrics (and checkpoint) to Ray Train; on rank 0 also the history and,
    at the end, the summary, written once the final checkpoint is stored.

    Raises:
        Diverged: the weights hold NaN or infinite values; nothing is saved, so the run's
            latest checkpoint stays one to resume from.
    """
    step = runner.step_count
    bad = runner.nonfinite_tensors()
    if bad:
        raise Diverged(
            f"the model's weights became NaN or infinite by step {step} ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); step {step} is not checkpointed, so the run "
            f"resumes from its last good checkpoint; {DIVERGED_FIX}", step)
    if rank == 0:
        _say(f"[segray] eval @ step {step}: mIoU {metrics['val/mIoU']:.2f} "
             f"(majority-class baseline {metrics['val/majority_mIoU']:.2f})")
        report.write_history(run_uri, history)
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    folder = save_checkpoint(runner, cfg, history) if rank == 0 and save else None
    try:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        # Returns once the checkpoint is stored (Ray copies it synchronously).
        ray.train.report({"step": step, **scalars}, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_name(step))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if rank == 0 and final:
        return report.finalize(cfg, info, run_uri, history, metrics, result,
                               checkpoint=storage.join(run_uri, checkpoint_name(step)))
    return None


__all__ = ["run_worker"]
