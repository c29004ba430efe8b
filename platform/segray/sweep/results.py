"""The sweep's results folder: table of trials, plots, the best config as a preset, report.html.

Everything is rebuilt from durable state — each trial's Train run folder (``metrics.jsonl``, which
keeps its history across resumes, and ``config.yaml``) plus the status Tune gives each trial — so a
resumed sweep's report covers the trials finished before the interruption too. Every file is
written atomically (local or ``s3://``).

Example:
    >>> rows = trial_rows(spec, [{"name": "trial_001_ab12cd34", "status": "TERMINATED",
    ...                           "config": {"mask_ratio": 0.4}, "last": {}}])
    >>> paths = write_results(spec, rows)       # trials.csv, trials.md, best.yaml, report.html...
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from dataclasses import dataclass
from typing import Any

import yaml

from segray import report, storage
from segray.sweep.spec import METRIC, STOPPED_FILE, SweepSpec

CSV_FILE, MD_FILE, BEST_FILE, HTML_FILE = "trials.csv", "trials.md", "best.yaml", "report.html"
BEST_SO_FAR_FILE = "best_so_far.png"
ENDED = ("finished", "stopped", "diverged", "error")  # statuses a resumed sweep does not run again
STATUSES = ("pending", "running", "interrupted", "finished", "stopped", "diverged", "error")


@dataclass
class TrialRow:
    """One line of the trials table.

    Attributes:
        trial: trial name (also its Train run name).
        status: ``pending``, ``running``, ``finished``, ``stopped`` (early, by the scheduler),
            ``interrupted`` (running when the sweep was interrupted; ``--resume`` continues it),
            ``diverged`` (its loss or weights became NaN or infinite; scored 0 for the search, see
            :mod:`segray.sweep.trial`) or ``error``.
        knobs: the sampled value of every swept key.
        best_miou: highest validation mIoU over its evaluation rounds (None before the first).
        last_miou: mIoU of its latest evaluation.
        rounds: evaluation rounds done.
        steps: optimizer steps done.
        resumes: times its Train run resumed from a checkpoint.
        run: its Train run folder.
    """

    trial: str
    status: str
    knobs: dict[str, Any]
    best_miou: float | None
    last_miou: float | None
    rounds: int
    steps: int
    resumes: int
    run: str

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped"


def trial_rows(spec: SweepSpec, trials: list[dict[str, Any]]) -> list[TrialRow]:
    """Rows for the given trials, in start order.

    Args:
        spec: the sweep.
        trials: ``{"name", "status" (Tune's PENDING/RUNNING/PAUSED/TERMINATED/ERROR), "config",
            "last" (Tune's last result)}`` per trial.
    """
    rows = []
    for t in sorted(trials, key=lambda t: t["name"]):
        run = spec.run_uri(t["name"])
        history = report.read_history(run)
        evals = [h[METRIC] for h in history if h.get(METRIC) is not None]
        last = t.get("last") or {}
        if not evals and last.get(METRIC) is not None:
            evals = [last[METRIC]]
        steps = max([int(h.get("step", 0)) for h in history] + [int(last.get("step") or 0)])
        status = _status(t["status"], run, history)
        rows.append(TrialRow(
            trial=t["name"], status=status,
            knobs={k: t["config"].get(k) for k in spec.space},
            best_miou=max(evals) if evals else None, last_miou=evals[-1] if evals else None,
            rounds=len(evals), steps=steps,
            resumes=sum(1 for h in history if h.get("event") == "resumed"), run=run,
        ))
    return rows


def _status(tune_status: str, run: str, history: list[dict[str, Any]]) -> str:
    """A trial's table status from Tune's and its Train run folder.

    Finished = its Train run wrote its final report (as on resume, see trial.run_trial); stopped =
    the scheduler's stop marker is there (written the moment it decides, also for a running trial
    whose stop is under way; a stopped run's workers may log a step or an evaluation more before
    they go down, so its history alone does not say it finished). A trial Tune calls TERMINATED
    with neither was ended by an interrupted sweep: Tune stops the running trials that way when it
    catches SIGINT/SIGUSR1, and saves them as unfinished for ``--resume``.
    """
    if tune_status == "ERROR":
        return "error"
    if tune_status not in ("RUNNING", "TERMINATED"):
        return "pending"
    if storage.exists(storage.join(run, report.DIVERGED_FILE)):
        return "diverged"
    if tune_status == "TERMINATED" and storage.exists(storage.join(run, report.SUMMARY_FILE)):
        return "finished"
    if storage.exists(storage.join(run, STOPPED_FILE)):
        return "stopped"
    if tune_status == "RUNNING":
        return "running"
    started = bool(history) or storage.exists(storage.join(run, report.CONFIG_FILE))
    return "interrupted" if started else "pending"


def complete(spec: SweepSpec, rows: list[TrialRow]) -> bool:
    """Whether every trial of the sweep has started and ended (finished, stopped, diverged or
    failed)."""
    return len(rows) >= spec.samples and all(r.status in ENDED for r in rows)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the highest mIoU among those that ran to the end (else among all that did
    not diverge: re-running a diverged trial's settings would diverge again)."""
    scored = [r for r in rows if r.best_miou is not None and r.status != "diverged"]
    full = [r for r in scored if r.status == "finished"]
    pool = full or scored
    return max(pool, key=lambda r: r.best_miou) if pool else None


def counts(rows: list[TrialRow]) -> dict[str, int]:
    """Trials per status (each status, and done = finished + stopped + diverged)."""
    n = {s: sum(1 for r in rows if r.status == s) for s in STATUSES}
    n["done"] = n["finished"] + n["stopped"] + n["diverged"]
    return n


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(spec: SweepSpec, rows: list[TrialRow]) -> tuple[list[str], list[list[Any]]]:
    header = ["trial", "status", *spec.space, "best_mIoU", "last_mIoU", "eval_rounds", "steps",
              "stopped_early", "resumes", "run"]
    body = [[r.trial, r.status, *(r.knobs.get(k) for k in spec.space),
             None if r.best_miou is None else round(r.best_miou, 4),
             None if r.last_miou is None else round(r.last_miou, 4),
             r.rounds, r.steps, r.stopped_early, r.resumes, r.run] for r in rows]
    return header, body


def to_csv(spec: SweepSpec, rows: list[TrialRow]) -> str:
    header, body = _table(spec, rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in line] for line in body])
    return buf.getvalue()


def to_markdown(spec: SweepSpec, rows: list[TrialRow]) -> str:
    header, body = _table(spec, rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def plot_file(key: str) -> str:
    """File name of the mIoU-by-knob plot of ``key`` (dots and odd characters become ``_``)."""
    return f"miou_by_{re.sub(r'[^A-Za-z0-9_-]+', '_', key)}.png"


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    return plt, fig, ax


def _png(plt: Any, fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def plot_knob(spec: SweepSpec, rows: list[TrialRow], key: str) -> bytes:
    """PNG: each trial's best mIoU against its value of ``key``; stopped trials hollow."""
    plt, fig, ax = _figure()
    dist = spec.space[key]
    scored = [r for r in rows if r.best_miou is not None and r.knobs.get(key) is not None]
    if dist.type == "choice":
        labels = [_fmt(v) for v in dist.values or ()]
        pos = {repr(v): i for i, v in enumerate(dist.values or ())}
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)

        def x_of(r: TrialRow) -> float:
            return pos.get(repr(r.knobs[key]), 0)
    else:
        def x_of(r: TrialRow) -> float:
            return float(r.knobs[key])
        if dist.is_log:
            ax.set_xscale("log")
    for status, style in (("finished", dict(color="tab:blue")),
                          ("stopped", dict(facecolors="none", edgecolors="tab:red")),
                          ("running", dict(color="tab:grey")),
                          ("interrupted", dict(facecolors="none", edgecolors="tab:grey")),
                          ("diverged", dict(marker="x", color="tab:purple")),
                          ("error", dict(color="black"))):
        pts = [(x_of(r), r.best_miou) for r in scored if r.status == status]
        if pts:
            ax.scatter(*zip(*pts), s=40, label=status if status != "stopped" else
                       "stopped early", **style)
    best = best_row(rows)
    if best is not None and best in scored:
        ax.scatter([x_of(best)], [best.best_miou], marker="*", s=220, color="gold",
                   edgecolors="black", zorder=3, label="best")
    ax.set_xlabel(key)
    ax.set_ylabel("best validation mIoU (%)")
    ax.set_title(f"mIoU by {key}")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _png(plt, fig)


def _legend(ax: Any) -> None:
    # Below the axes, so it never hides a trial.
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8,
                  frameon=False)


def plot_best_so_far(rows: list[TrialRow]) -> bytes:
    """PNG: each trial's best mIoU in start order, and the best so far as a step line."""
    plt, fig, ax = _figure()
    from matplotlib.ticker import MaxNLocator

    pts = [(i + 1, r.best_miou, r.stopped_early) for i, r in enumerate(rows)
           if r.best_miou is not None]
    if pts:
        xs, ys, stopped = zip(*pts)
        for early, style in ((False, dict(color="tab:blue", label="trial")),
                             (True, dict(facecolors="none", edgecolors="tab:red",
                                         label="stopped early"))):
            sel = [(x, y) for x, y, s in pts if s == early]
            if sel:
                ax.scatter(*zip(*sel), s=40, **style)
        running = [max(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, running, where="post", color="black", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax)
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel("validation mIoU (%)")
    ax.set_title("best mIoU so far")
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def best_preset(spec: SweepSpec, best: TrialRow) -> str | None:
    """The best trial's resolved config as a preset YAML for ``jobs/train.py --preset-file``.

    The run's own name and storage are dropped, so re-running it starts a fresh run instead of
    resuming the trial.
    """
    uri = storage.join(best.run, report.CONFIG_FILE)
    if not storage.exists(uri):
        return None
    cfg = yaml.safe_load(storage.read_text(uri))
    for key in ("name", "storage"):
        cfg.pop(key, None)
    cfg["method"] = spec.method
    cfg["preset"] = f"{spec.name}-best"
    knobs = ", ".join(f"{k}={_fmt(v)}" for k, v in best.knobs.items())
    head = (f"# python jobs/train.py --method {spec.method} --preset-file best.yaml\n"
            f"# Best trial of sweep {spec.name}: {best.trial}, best validation mIoU "
            f"{best.best_miou:.2f} (at its last evaluation, step {best.steps}: "
            f"{best.last_miou:.2f}; a re-run reproduces the last).\n# Swept: {knobs}\n")
    return head + yaml.safe_dump(cfg, sort_keys=False)


def to_html(spec: SweepSpec, rows: list[TrialRow], plots: dict[str, bytes]) -> str:
    """A self-contained report: summary, the trials table and every plot inline (base64 PNG)."""
    header, body = _table(spec, rows)
    best = best_row(rows)
    n = counts(rows)
    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in header)
    table = [f"<tr>{cells}</tr>"]
    for r, line in zip(rows, body):
        mark = ' class="best"' if best is not None and r.trial == best.trial else ""
        table.append(f"<tr{mark}>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in line) + "</tr>")
    images = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{esc(name)}</figcaption></figure>'
        for name, png in plots.items())
    if best is not None:
        knobs = ", ".join(f"{k} = {_fmt(v)}" for k, v in best.knobs.items())
        where = storage.join(spec.root, BEST_FILE)
        fetch = f"aws s3 cp {where} {BEST_FILE} && " if storage.is_s3(where) else ""
        path = BEST_FILE if fetch else where
        verdict = (f"<p>Best trial <b>{esc(best.trial)}</b>: validation mIoU "
                   f"<b>{best.best_miou:.2f}</b> ({esc(knobs)}). Re-run it with "
                   f"<code>{esc(fetch)}python jobs/train.py --method {esc(spec.method)} "
                   f"--preset-file {esc(path)}</code>.</p>")
    else:
        verdict = "<p>No trial has been evaluated yet.</p>"
    scheduler = (f"ASHA (grace period {spec.grace_period}, reduction factor "
                 f"{spec.reduction_factor:g}, {spec.rounds} evaluation rounds)"
                 if spec.scheduler == "asha" else "none (every trial runs to the end)")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sweep {esc(spec.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}tr.best{{background:#fff3b0}}
figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>Sweep {esc(spec.name)} — {esc(spec.method)}</h1>
<p>{len(rows)} of {spec.samples} trials started: {n['finished']} finished, {n['stopped']} stopped
early, {n['running']} running, {n['interrupted']} interrupted, {n['diverged']} diverged,
{n['error']} failed. Search: Optuna TPE (seed {spec.seed}) maximising
{METRIC}; scheduler: {esc(scheduler)}. Folder: <code>{esc(spec.root)}</code>.</p>
{verdict}
<table>{''.join(table)}</table>
{images}
</body></html>
"""


def write_results(spec: SweepSpec, rows: list[TrialRow]) -> dict[str, str]:
    """Write every results file into the sweep folder and return ``{file: uri}``."""
    out: dict[str, str] = {}

    def put(name: str, data: bytes | str) -> None:
        uri = storage.join(spec.root, name)
        if isinstance(data, str):
            storage.write_text(uri, data)
        else:
            storage.write_bytes(uri, data)
        out[name] = uri

    put(CSV_FILE, to_csv(spec, rows))
    put(MD_FILE, to_markdown(spec, rows))
    plots = {plot_file(key): plot_knob(spec, rows, key) for key in spec.space}
    plots[BEST_SO_FAR_FILE] = plot_best_so_far(rows)
    for name, png in plots.items():
        put(name, png)
    best = best_row(rows)
    text = best_preset(spec, best) if best is not None else None
    if text is not None:
        put(BEST_FILE, text)
    put(HTML_FILE, to_html(spec, rows, plots))
    return out
