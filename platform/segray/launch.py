"""Driver side of a training run: resolve data, connect to Ray, build streams, fit a TorchTrainer.

Example:
    >>> summary = run_training(cfg)        # cfg from segray.config.resolve(...)
    >>> summary["val"]["mIoU"], summary["run"]
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from segray import report, storage
from segray.config import Config, to_yaml

if TYPE_CHECKING:
    from segray.engine import Diverged


class UsageError(ValueError):
    """A mistake in what the user asked for (exit code 2, no traceback)."""


def default_storage() -> str:
    """Run storage root: ``$SEGRAY_STORAGE`` or ``~/segray_runs``."""
    return os.environ.get("SEGRAY_STORAGE") or os.path.join(os.path.expanduser("~"), "segray_runs")


def default_name(cfg: Config) -> str:
    """A new run name: ``<method>-<preset>-<UTC timestamp>-<4 random hex digits>`` (runs started
    in the same second, e.g. by a shell loop over seeds, must not share a folder)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{cfg.method}-{cfg.preset or 'custom'}-{stamp}-{os.urandom(2).hex()}"


def data_seed(seed: int, resume_step: int) -> int:
    """The seed of a run's training streams: ``seed`` for a fresh run; mixed with the step a
    resumed run starts from, so it draws new crops and shard orders instead of replaying those
    of the run's first steps."""
    if not resume_step:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, resume_step]).generate_state(1)[0])


def resolve_data(cfg: Config) -> Any:
    """Open the configured dataset (generating the synthetic set on first use) and check its splits.

    Raises:
        UsageError: the dataset or a needed split is missing.
    """
    from segray.data import DatasetError, ensure_synthetic, open_dataset

    uri = cfg.data.uri or ensure_synthetic()
    try:
        info = open_dataset(storage.absolute(uri))
    except (FileNotFoundError, DatasetError) as e:
        raise UsageError(str(e)) from e
    needed = [cfg.data.train_split, cfg.data.val_split]
    for split in needed:
        if not info.has_split(split):
            raise UsageError(f"dataset {uri} has no split '{split}' (it has: "
                             f"{', '.join(info.split_names)}); set data.train_split / data.val_split")
    return info


def init_ray(num_cpus: int) -> None:
    """Attach to the cluster in ``RAY_ADDRESS``, or start a private local instance.

    Args:
        num_cpus: logical CPUs of a local instance (ignored when attaching to a cluster).
    """
    import ray
    import ray.data

    # segray prints its own progress; Ray Data's terminal bars interleave badly with worker logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    port = _free_port()
    # The dashboard serves the State API that Ray Train's placement-group cleaner polls (loopback
    # only). Naming this instance's address keeps the cleaner working when other Ray instances run
    # on the same machine.
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    os.environ["RAY_API_SERVER_ADDRESS"] = env["RAY_API_SERVER_ADDRESS"]
    # address="local": always a private instance, never a `ray start` cluster that happens to run here.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, log_to_driver=True, runtime_env={"env_vars": env})


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for a local run: one per worker plus room for Ray Data's decode tasks."""
    return max(os.cpu_count() or 1, int(cfg.workers * cfg.cpus_per_worker) + 2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MAX_PASSES = 64


def passes_per_execution(info: Any, split: str, cfg: Config) -> int:
    """Epochs one execution of a training stream covers.

    Every execution restarts Ray Data's executor and decode workers, which costs seconds; on a
    small dataset that would stall the model at every epoch. One execution therefore covers
    ``data.rows_per_execution`` rows (0 = all the rows the run will consume), up to 64 epochs.
    """
    rows = max(info.num_rows(split), 1)
    wanted = cfg.data.rows_per_execution or cfg.train.steps * cfg.data.batch_size
    return min(MAX_PASSES, max(1, -(-wanted // rows)))


def stream_datasets(cfg: Config, info: Any, skips: Any = None,
                    resume_step: int = 0) -> dict[str, Any]:
    """The run's Ray Data streams: ``train``, ``val`` and, for methods that read it, ``unlabeled``.

    Building them checks every shard of those splits (columns, unique keys) without decoding.

    Args:
        cfg: the run's config.
        info: its dataset.
        skips: where rows skipped under ``data.on_bad_sample=skip`` are counted.
        resume_step: the step a resumed run starts from (see :func:`data_seed`).

    Raises:
        UsageError: the method needs a split the dataset lacks, or a split, shard or key of the
            dataset is wrong (the message names it).
    """
    from methods import get_method
    from segray.data import BadSampleError, DatasetError, eval_dataset, train_dataset

    d = cfg.data
    common = dict(crop=tuple(d.crop_size), scale_range=tuple(d.scale_range),
                  seed=data_seed(cfg.seed, resume_step),
                  on_bad_sample=d.on_bad_sample, cat_max_ratio=d.cat_max_ratio, skip_counter=skips,
                  base_scale=tuple(d.base_scale) if d.base_scale else None,
                  resize=tuple(d.resize) if d.resize else None, resample=d.resample,
                  mask_resample=d.mask_resample,
                  scale_choices=tuple(d.scale_choices) if d.scale_choices else None)
    try:
        datasets = {"train": train_dataset(info, d.train_split, **common,
                                           passes=passes_per_execution(info, d.train_split, cfg)),
                    "val": eval_dataset(info, d.val_split)}
        if "unlabeled" in get_method(cfg.method).streams:
            if not info.has_split(d.unlabeled_split):
                raise UsageError(f"method '{cfg.method}' needs an unlabelled split "
                                 f"'{d.unlabeled_split}' but dataset {info.uri} has only "
                                 f"{', '.join(info.split_names)}")
            datasets["unlabeled"] = train_dataset(
                info, d.unlabeled_split, labeled=False, **common,
                passes=passes_per_execution(info, d.unlabeled_split, cfg))
    except FileNotFoundError as e:  # a shard the manifest lists is gone
        raise UsageError(str(e)) from e
    except (DatasetError, BadSampleError) as e:
        hint = ("; or set data.on_bad_sample=skip to skip and count such rows"
                if d.on_bad_sample == "error" else "")
        raise UsageError(f"{e}{hint}") from e
    return datasets


def build_trainer(cfg: Config, info: Any, run_root: str, callbacks: list | None = None,
                  resume_step: int = 0) -> Any:
    """Build the ``TorchTrainer`` of a run (datasets, scaling, failure and checkpoint policies).

    Raises:
        UsageError: see :func:`stream_datasets`; a bad dataset fails here, once, before any
            worker starts (not in each of Ray Train's retries).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from segray.data import SkipCounter
    from segray.engine import train_loop_per_worker

    # Rows dropped by on_bad_sample=skip are counted across all decode workers and reported.
    skips = SkipCounter() if cfg.data.on_bad_sample == "skip" else None
    datasets = stream_datasets(cfg, info, skips, resume_step)
    fs, root = storage.filesystem(run_root)
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    run_uri = storage.join(run_root, cfg.name)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg, "info": info, "run_uri": run_uri, "skips": skips,
                           # recorded in the history when a worker resumes (new crops, see data_seed)
                           "stream_seed": data_seed(cfg.seed, resume_step),
                           # a private local instance dies with the driver: nothing scrapes it
                           "flush_metrics": bool(os.environ.get("RAY_ADDRESS"))},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=root,
            storage_filesystem=fs if storage.is_s3(run_root) else None,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Pruning keeps the best validation mIoU (and Ray always keeps the latest).
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None,
                                               checkpoint_score_attribute="val/mIoU",
                                               checkpoint_score_order="max"),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k != "val"]),
    )


def run_training(cfg: Config, callbacks: list | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run and return its summary.

    A run is identified by ``storage/name``: re-running with the same name resumes from its latest
    checkpoint instead of starting over (see :func:`check_resume` for what may change).

    One process at a time works on a run: it holds the run folder's lease
    (:mod:`segray.runlock`) from before the folder is read until it returns or fails.

    Raises:
        UsageError: for bad data (also a bad row met while streaming: the run stops, see
            :mod:`segray.worker`), method or storage arguments, or a run another live process
            is working on.
        Diverged: the loss or the weights became NaN or infinite; the run stopped without
            retrying and keeps its checkpoints.
        ray.train.TrainingFailedError: when workers fail more than ``train.max_failures`` times.
    """
    if cfg.data.uri:
        cfg.data.uri = storage.absolute(cfg.data.uri)  # evaluate.py may run from another folder
    cfg.name = cfg.name or default_name(cfg)
    run_root = storage.absolute(cfg.storage or default_storage())
    cfg.storage = run_root
    run_uri = storage.join(run_root, cfg.name)
    lease = take_lease(run_uri, "a training run")
    try:
        return _run_training(cfg, run_uri, run_root, callbacks, quiet)
    finally:
        lease.release()


def take_lease(uri: str, holder: str) -> Any:
    """The lease of a run or sweep folder (:class:`segray.runlock.RunLease`), renewed until
    released; a lease whose holder is gone is taken over, with a note.

    Raises:
        UsageError: another live process holds it (named, with when its lease would expire).
    """
    from segray.runlock import RunInUse, RunLease

    try:
        lease = RunLease(uri, holder).acquire()
    except RunInUse as e:
        raise UsageError(str(e)) from None
    gone = lease.taken_over
    if gone is not None:
        print(f"[segray] note: took over {lease.lock_uri} from {gone.get('holder', '?')} on host "
              f"{gone.get('host', '?')} (pid {gone.get('pid', '?')}), which is gone",
              file=sys.stderr)
    return lease


def _run_training(cfg: Config, run_uri: str, run_root: str, callbacks: list | None,
                  quiet: bool) -> dict[str, Any]:
    changed = check_resume(cfg, run_uri)  # before anything is written or started
    info = resolve_data(cfg)
    resumed = changed is not None
    text = to_yaml(cfg)
    if not quiet:
        print(f"[segray] {'resuming' if resumed else 'starting'} run {cfg.name} -> {run_uri}")
        print(f"[segray] dataset {info.uri}: {info.num_classes} classes, "
              f"{info.num_rows(cfg.data.train_split)} train / {info.num_rows(cfg.data.val_split)} val")
        print("[segray] resolved config:\n" + text, flush=True)
    if changed:
        kept = backup_config(run_uri)
        print(f"[segray] note: resuming {cfg.name} with changed settings: {', '.join(changed)}"
              + (f" (the previous config.yaml is kept as {kept})" if kept else ""), file=sys.stderr)
    storage.makedirs(run_uri)
    storage.write_text(storage.join(run_uri, report.CONFIG_FILE), text)
    report.clear_data_error(run_uri)  # this attempt may read fixed data, or skip bad rows
    report.clear_divergence(run_uri)  # or train with a lower learning rate
    from segray.checkpoint import latest_step

    init_ray(local_cpus(cfg))
    trainer = build_trainer(cfg, info, run_root, callbacks,
                            resume_step=latest_step(run_uri) if resumed else 0)
    try:
        result = trainer.fit()
    except Exception:
        recorded = report.read_data_error(run_uri)
        if recorded is not None:
            advice = report.data_error_advice(recorded, "re-run the same command to resume")
            raise UsageError(f"{recorded}; the run stopped there and keeps its checkpoints: "
                             f"{advice}") from None
        diverged = report.read_divergence(run_uri)
        if diverged is None:
            raise
        raise diverged_error(cfg.name, diverged, latest_step(run_uri)) from None
    return result.return_value or report.read_summary(run_uri)


def diverged_error(name: str, diverged: dict[str, Any], kept: int) -> Diverged:
    """The driver's error for a run whose workers recorded a divergence: what happened, which
    checkpoint the run keeps, and how to go on from it."""
    from segray.engine import DIVERGED_FIX, Diverged

    what = str(diverged["message"]).removesuffix(f"; {DIVERGED_FIX}")
    where = (f"it keeps its checkpoints, the latest at step {kept}" if kept
             else "it has no checkpoint yet")
    return Diverged(f"run {name} diverged and stopped without retrying: {what}. "
                    f"{where.capitalize()}: {DIVERGED_FIX} (--set optim.lr=...) and re-run the "
                    "same command to resume from there", int(diverged["step"]))


# What the checkpoints of a run hold state for, so a resume must not change it: the method, any
# key under "model." or "knobs." (the network's shape; a knob may choose the architecture) and
# the optimizer's kind and parameter groups.
FIXED_ON_RESUME = ("method", "model.", "knobs.", "optim.name", "optim.amsgrad", "optim.no_decay")


def saved_config(run_uri: str) -> dict[str, Any] | None:
    """The config a run folder was started with: its ``config.yaml``, else the config in its
    newest checkpoint's ``meta.json``; ``None`` for a folder that holds no run.

    Raises:
        UsageError: the folder's ``config.yaml`` cannot be read as a config.
    """
    import yaml

    from segray.checkpoint import latest_checkpoint, load_meta
    from segray.config import yaml_load

    uri = storage.join(run_uri, report.CONFIG_FILE)
    if storage.exists(uri):
        try:
            saved = yaml_load(storage.read_text(uri)) or {}
        except (ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
            raise UsageError(f"{uri} is not a readable config ({e}); move it away to resume "
                             "from the checkpoints' own config, or pick a new --name") from None
        if not isinstance(saved, dict):
            raise UsageError(f"{uri} is not a config mapping; move it away or pick a new --name")
        return saved
    latest = latest_checkpoint(run_uri) if storage.exists(run_uri) else None
    return load_meta(latest).get("config", {}) if latest else None


def check_resume(cfg: Config, run_uri: str) -> list[str] | None:
    """Compare a run's new config with the one it was started with, before anything is written.

    Extending a run (``train.steps``, ``train.eval_every``, the learning rate...) is allowed; a
    different method, model section, knobs or optimizer kind would not fit the checkpoints.

    Args:
        cfg: the resolved config of this attempt (``name`` and ``storage`` set).
        run_uri: its run folder (local or ``s3://``).

    Returns:
        ``None`` for a new run, else the keys whose values changed (empty when none did).

    Raises:
        UsageError: naming the run folder and the keys that may not change.
    """
    from segray.config import Config, flatten, to_dict

    old = saved_config(run_uri)
    if old is None:
        return None
    before, after = flatten(old), flatten(to_dict(cfg))
    # A setting added to segray after the run started is missing from its config: at its
    # default it changes nothing (the run trained with that behaviour).
    knobs = type(cfg.knobs)() if dataclasses.is_dataclass(cfg.knobs) else None
    defaults = flatten(to_dict(Config(knobs=knobs)))
    for one, other in ((before, after), (after, before)):  # `knobs: {}` before a knob existed
        for k in [k for k, v in one.items() if v == {} and k not in other
                  and any(o.startswith(k + ".") for o in other)]:
            del one[k]
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k not in ("name", "storage")
                     and not (k not in before and k in defaults and after[k] == defaults[k]))
    fixed = [k for k in changed if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        diff = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in fixed)
        raise UsageError(
            f"run folder {run_uri} holds a run whose checkpoints do not fit this config ({diff}); "
            f"pick a new --name to start a fresh run, or re-run with the settings of "
            f"{storage.join(run_uri, report.CONFIG_FILE)} to resume it")
    from segray.checkpoint import latest_step

    last = latest_step(run_uri)
    if cfg.train.steps < last:
        raise UsageError(
            f"run folder {run_uri} has a checkpoint at step {last}: train.steps "
            f"{cfg.train.steps} may not go below it; pick a new --name for a shorter run")
    if changed and report.finished(run_uri, before.get("train.steps")) and cfg.train.steps <= last:
        raise UsageError(
            f"run {run_uri} has finished, and re-running it with changed settings "
            f"({', '.join(changed)}) would only return its summary: raise train.steps to extend "
            "it, or pick a new --name for a new run")
    if changed and last:
        from segray.optim import lr_change

        note = lr_change(old, cfg, last)
        if note:
            print(f"[segray] note: {note}", file=sys.stderr)
    return changed


def backup_config(run_uri: str) -> str | None:
    """Copy a run's ``config.yaml`` to ``config.<UTC time>.yaml`` beside it, so the settings each
    attempt ran with stay on record; returns that name (``None`` when there was no config.yaml)."""
    old = storage.join(run_uri, report.CONFIG_FILE)
    if not storage.exists(old):
        return None
    name = f"config.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.yaml"
    storage.write_text(storage.join(run_uri, name), storage.read_text(old))
    return name


def fail_usage(message: str, code: int = 2) -> None:
    """Print a usage error (no traceback) and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
