"""Offline checks of the Prometheus and Grafana files in ``cluster/``: Prometheus scrapes Ray's
discovery file and the drivers' loopback ports, and the dashboard queries exactly the metric names
the platform exports (which cluster/README.md documents).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from test_cluster_configs import CLUSTER, load_yaml

# The metric names the platform exports: worker gauges (Ray prefixes `ray_`), then the sweep and
# pseudo-label drivers' gauges. cluster/README.md documents the same list.
METRICS_CONTRACT = (
    "ray_segray_train_images_per_second",
    "ray_segray_train_step_seconds",
    "ray_segray_train_data_wait_share",
    "ray_segray_train_loss",
    "ray_segray_train_learning_rate",
    "ray_segray_train_gpu_memory_gb",
    "ray_segray_train_step",
    "ray_segray_eval_miou",
    "ray_segray_eval_macc",
    "segray_sweep_trials_running",
    "segray_sweep_trials_done",
    "segray_sweep_trials_stopped",
    "segray_sweep_best_miou",
    "segray_sweep_trial_miou",
    "segray_pseudolabel_images_done",
)
DRIVER_PORT, SWEEP_PORT = 9464, 9465


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, labels, keywords dropped)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\$\{?\w+\}?", "", s)
    keywords = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        if not s[m.end():].lstrip().startswith("(") and m.group(0).lower() not in keywords:
            names.add(m.group(0))
    return names


@pytest.fixture(scope="module")
def grafana() -> dict:
    return json.loads((CLUSTER / "grafana" / "segray.json").read_text())


def test_prometheus_scrapes_ray_discovery_file_and_loopback_drivers() -> None:
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    path = CLUSTER / "prometheus" / "prometheus.yml"
    cfg = load_yaml(path)
    assert cfg["global"]["scrape_interval"] == "10s"
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert files == [os.path.join("/tmp/ray", PROMETHEUS_SERVICE_DISCOVERY_FILE)]
    targets = {t for j in jobs.values() for sc in j.get("static_configs", []) for t in sc["targets"]}
    assert targets == {f"127.0.0.1:{DRIVER_PORT}", f"127.0.0.1:{SWEEP_PORT}"}
    assert "--web.listen-address=127.0.0.1:" in path.read_text()


def test_metric_name_extraction_on_a_hand_written_query() -> None:
    expr = 'max by (method, run) (deriv(foo_total{a=~"$x", b="c d"}[2m])) / on(run) bar:ratio > 1e-3'
    assert metric_names(expr) == {"foo_total", "bar:ratio"}


def test_grafana_dashboard_queries_exactly_the_metric_contract(grafana: dict) -> None:
    assert 36 <= grafana["schemaVersion"] <= 41
    variables = {v["name"]: v for v in grafana["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    used: set[str] = set()
    for v in variables.values():
        if v["type"] == "query":
            used |= set(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", v["definition"]))
    panels = [p for p in grafana["panels"] if p["type"] != "row"]
    assert {"Throughput", "Data stall", "Step time", "Learning rate", "Peak GPU memory"} <= {
        p["title"] for p in panels}
    for p in panels:
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            names = metric_names(t["expr"])
            unknown = names - set(METRICS_CONTRACT)
            assert names and not unknown, f"panel {p['title']!r} queries {sorted(unknown)}"
            if any(n.startswith("ray_segray_") for n in names):  # WorkerId changes on restart
                assert "max by (method, run)" in t["expr"], t["expr"]
            used |= names
    assert used == set(METRICS_CONTRACT), f"not on the dashboard: {set(METRICS_CONTRACT) - used}"


def test_metric_contract_matches_the_exporter_and_the_docs() -> None:
    from segray.telemetry import EVAL_GAUGES, TRAIN_GAUGES

    exported = {"ray_" + name for name, _ in [*TRAIN_GAUGES.values(), *EVAL_GAUGES.values()]}
    assert exported == {m for m in METRICS_CONTRACT if m.startswith("ray_")}
    readme = (CLUSTER / "README.md").read_text()
    assert not [m for m in METRICS_CONTRACT if f"`{m}`" not in readme]
