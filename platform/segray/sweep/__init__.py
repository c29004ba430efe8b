"""Sweeps: Ray Tune + Optuna (TPE) over a method's knobs, ASHA early stopping, resume, reports.

Modules: :mod:`~segray.sweep.space` (search spaces, no Ray), :mod:`~segray.sweep.spec` (the saved
sweep definition and how many trials fit), :mod:`~segray.sweep.trial` (one trial: a Tune
function fitting a Ray Train run), :mod:`~segray.sweep.schedulers` (ASHA and FIFO within the
sweep's concurrency, surviving a resume), :mod:`~segray.sweep.runner` (the Tune driver),
:mod:`~segray.sweep.results` (table, plots, best preset, report.html) and
:mod:`~segray.sweep.exporter` (Prometheus gauges). ``jobs/tune.py`` is the command line.
"""

from __future__ import annotations

from segray.sweep.space import Dist, SpaceError, check_values, load_space_file, parse_space
from segray.sweep.spec import SweepSpec

__all__ = ["Dist", "SpaceError", "SweepSpec", "check_values", "load_space_file", "parse_space"]
