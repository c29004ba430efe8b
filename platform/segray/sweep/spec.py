"""What a sweep is (saved as ``sweep.yaml`` so ``--resume`` rebuilds it) and how many trials fit.

A sweep lives in one folder, local or ``s3://``::

    <storage>/<sweep>/
        sweep.yaml                  this spec: method, base config, space, budget, scheduler
        tune/                       Ray Tune's experiment state + one folder per trial
                                    (params.json, progress.csv, TensorBoard events)
        trials/<trial>/             each trial's Ray Train run folder (checkpoints, metrics.jsonl,
                                    stopped_early.json once the scheduler stopped it)
        trials.csv trials.md best.yaml report.html miou_by_<knob>.png best_so_far.png

Example:
    >>> need = trial_need(workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0)
    >>> concurrency({"CPU": 16.0, "GPU": 4.0}, need)
    2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from segray import storage
from segray.sweep.space import Dist, space_from_dicts

SPEC_FILE = "sweep.yaml"
# Written into a trial's Train run folder the moment the scheduler stops it, so the decision
# survives a crash of the sweep driver (Tune saves its own state only every few seconds).
STOPPED_FILE = "stopped_early.json"
# The rung results ASHA has judged a trial on ({round: mIoU}), written as it judges them: a resumed
# sweep records them again instead of judging them a second time, in another order.
RUNGS_FILE = "asha_rungs.json"
METRIC = "val/mIoU"
ROUND_KEY = "eval_round"
# The trial function only builds and watches a TorchTrainer; its workers hold their own resources.
TRIAL_CPUS = 0.1
# Each trial's Ray Data decode tasks need at least one free CPU next to its Train workers, or
# its stream waits for resources that concurrent trials hold.
DATA_CPUS = 1.0


@dataclass
class SweepSpec:
    """Everything that defines a sweep; saved once, read back by ``--resume``.

    Attributes:
        name: sweep name (its folder under the storage root).
        root: the sweep folder, absolute local path or ``s3://`` URI.
        method: method name.
        base: the resolved base run config as a plain dict (``name``/``storage`` cleared).
        space: knob -> distribution.
        samples: number of trials.
        scheduler: ``asha`` (early stopping on evaluation rounds) or ``none``.
        grace_period: evaluation rounds every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps the top ``1/reduction_factor`` at each rung.
        seed: seed of the TPE sampler.
        max_concurrent: trials at once (``None`` = what the cluster holds); fixed and saved when
            the sweep starts, kept by a resume.
    """

    name: str
    root: str
    method: str
    base: dict[str, Any]
    space: dict[str, Dist]
    samples: int
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    seed: int = 0
    max_concurrent: int | None = None

    @property
    def steps(self) -> int:
        return int(self.base["train"]["steps"])

    @property
    def eval_every(self) -> int:
        return int(self.base["train"]["eval_every"]) or self.steps

    @property
    def rounds(self) -> int:
        """Evaluation rounds of one full trial (what ASHA counts)."""
        return eval_round(self.steps, self.eval_every)

    @property
    def trials_root(self) -> str:
        return storage.join(self.root, "trials")

    @property
    def tune_dir(self) -> str:
        return storage.join(self.root, "tune")

    def run_uri(self, trial: str) -> str:
        """The Ray Train run folder of a trial."""
        return storage.join(self.trials_root, trial)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "root": self.root, "method": self.method,
            "samples": self.samples, "scheduler": self.scheduler,
            "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
            "seed": self.seed, "max_concurrent": self.max_concurrent,
            "space": {k: d.to_dict() for k, d in self.space.items()},
            "base": self.base,
        }

    def save(self) -> None:
        """Write ``sweep.yaml`` into the sweep folder (atomically)."""
        storage.makedirs(self.root)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        storage.write_text(storage.join(self.root, SPEC_FILE), text)

    @classmethod
    def load(cls, root: str) -> SweepSpec:
        """Read a sweep's ``sweep.yaml``.

        Raises:
            FileNotFoundError: the folder holds no sweep.
        """
        uri = storage.join(root, SPEC_FILE)
        if not storage.exists(uri):
            raise FileNotFoundError(f"no sweep at {root} ({SPEC_FILE} is missing)")
        raw = yaml.safe_load(storage.read_text(uri))
        raw["space"] = space_from_dicts(raw["space"])
        raw["root"] = root  # the folder may have been moved or mounted elsewhere
        return cls(**raw)


_RUNNING: dict[str, SweepSpec] = {}  # the sweep this driver runs, by name


def set_running(spec: SweepSpec) -> None:
    """Make ``spec`` the one :func:`running` returns for its name (the driver calls this before
    Tune restores a sweep)."""
    _RUNNING[spec.name] = spec


def running(saved: SweepSpec) -> SweepSpec:
    """The spec this driver runs in place of ``saved``, one that Tune unpickled from the sweep's
    state with the scheduler and callbacks holding it: the folder may have moved since (a copy
    to other storage, another mount), and they must write where the sweep is now."""
    return _RUNNING.get(saved.name, saved)


def eval_round(step: int, eval_every: int) -> int:
    """Evaluation round that ends at ``step`` (the run also evaluates at its last step).

    Example:
        >>> [eval_round(s, 4) for s in (4, 8, 10)]
        [1, 2, 3]
    """
    return max(1, math.ceil(step / max(eval_every, 1)))


@dataclass(frozen=True)
class TrialNeed:
    """Resources one trial occupies: trial function + Train workers + room for data decoding."""

    cpus: float
    gpus: float


def trial_need(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> TrialNeed:
    """Resources a trial of ``workers`` Train workers takes."""
    return TrialNeed(cpus=TRIAL_CPUS + workers * cpus_per_worker + DATA_CPUS,
                     gpus=workers * gpus_per_worker)


def concurrency(cluster: dict[str, float], need: TrialNeed) -> int:
    """How many trials the cluster's resources hold at once (0 when not even one fits).

    Args:
        cluster: ``ray.cluster_resources()``.
        need: what one trial takes.
    """
    fits = [math.floor(cluster.get("CPU", 0.0) / need.cpus + 1e-9)]
    if need.gpus > 0:
        fits.append(math.floor(cluster.get("GPU", 0.0) / need.gpus + 1e-9))
    return max(0, min(fits))


def local_cpus(need: TrialNeed, trials: int, cores: int) -> int:
    """Logical CPUs of a private local Ray instance that runs ``trials`` trials at once.

    Logical CPUs are scheduling slots, not cores: a 2-core laptop still runs two small trials side
    by side, slower.
    """
    return max(cores, math.ceil(trials * need.cpus))
