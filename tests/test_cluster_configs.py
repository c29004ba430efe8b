"""Offline checks of the cluster definitions in ``cluster/``.

Nothing here reaches AWS, Kubernetes or a registry: the AWS config goes through Ray's own autoscaler
schema and config preparation, the runtime env through Ray's own validation and packaging, the
entrypoints through segray's own CLI parser, and every file through the project's rules — one Ray
release everywhere, token authentication on, nothing listening on all interfaces and no secrets.
The Prometheus and Grafana files are checked in test_cluster_dashboards.py.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS = CLUSTER / "aws.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
KUBERAY = {"RayCluster": CLUSTER / "kuberay" / "raycluster.yaml",
           "RayJob": CLUSTER / "kuberay" / "rayjob.yaml"}

GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5", "p5e")


def load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def strings(node: Any) -> list[str]:
    """Every string (key or value) in a parsed YAML/JSON tree."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def pinned_ray() -> Any:
    """The ``ray[...]`` requirement of pyproject.toml."""
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert len(reqs) == 1, f"expected one ray requirement in pyproject.toml, got {deps}"
    return reqs[0]


def version_in(image: str) -> str:
    """The x.y.z release in an image's tag, e.g. ``...:ray2.60.0-py311-gpu`` -> ``2.60.0``."""
    tag = image.rsplit(":", 1)[-1]
    found = re.findall(r"\d+\.\d+\.\d+", tag)
    assert len(found) == 1, f"image {image!r}: expected one x.y.z Ray release in its tag"
    return found[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_containers(doc: dict) -> list[dict]:
    """The Ray container (KubeRay's container index 0) of the head and of every worker group."""
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def entrypoint_args(rayjob: dict) -> tuple[list[str], Any]:
    """The RayJob's entrypoint split, and its flags parsed by segray's own job CLI parser."""
    from segray.cli import UsageParser, add_run_args

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    parser = UsageParser(prog=argv[1])
    add_run_args(parser)
    return argv, parser.parse_args(argv[2:])  # unknown flags exit with code 2


def flag(command: str, name: str) -> str | None:
    m = re.search(rf"--{name}[= ](\S+)", command)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def aws() -> dict:
    return load_yaml(AWS)


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    return {kind: load_yaml(path) for kind, path in KUBERAY.items()}


# --- AWS cluster launcher ---------------------------------------------------------------------


def test_aws_config_passes_rays_autoscaler_schema_and_validation(aws: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (ray[default]) not installed")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(aws, schema)
    # What `ray up` runs before touching AWS: defaults merged, Docker checked, then validated.
    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["available_node_types"][aws["head_node_type"]]["max_workers"] == 0
    broken = copy.deepcopy(aws)  # the schema is live: a fractional resource must be refused
    broken["available_node_types"]["ray.worker.gpu"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_aws_head_takes_no_work_and_workers_autoscale_on_spot(aws: dict) -> None:
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    head_start = " ".join(aws["head_start_ray_commands"])
    assert flag(head_start, "num-cpus") == "0"
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    gpu = [t for t in workers.values() if t["node_config"]["InstanceType"].startswith(GPU_FAMILIES)]
    cpu = [t for t in workers.values() if t not in gpu]
    assert gpu and cpu, "need an autoscaling GPU worker type and a CPU decode worker type"
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
        validate_node_label_syntax(t["labels"])
        validate_node_labels(t["labels"])
    assert all(t["labels"] == {"segray/role": "decode"} for t in cpu)
    assert aws["provider"]["cache_stopped_nodes"] is False  # spot instances cannot be stopped


def test_aws_nodes_use_token_auth_loopback_dashboard_metrics_and_spill_volume(aws: dict) -> None:
    run_options = " ".join(aws["docker"]["run_options"])
    env = dict(re.findall(r"--env (\w+)=(\S+)", run_options))
    assert env["RAY_AUTH_MODE"] == "token"
    assert int(env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 600
    # The token reaches the nodes as a file copied from the launching machine.
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(aws["head_start_ray_commands"])
    worker = " ".join(aws["worker_start_ray_commands"])
    assert flag(head, "dashboard-host") == "127.0.0.1"
    assert flag(head, "metrics-export-port") == flag(worker, "metrics-export-port") is not None
    volumes = dict(v.split(":")[::-1] for v in re.findall(r"--volume (\S+)", run_options))
    for command in (head, worker):
        assert flag(command, "object-spilling-directory") in volumes


# --- one Ray release everywhere -----------------------------------------------------------------


def test_ray_version_is_the_same_release_everywhere(aws: dict, kuberay: dict) -> None:
    import ray

    req = pinned_ray()
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith("rayproject/ray:") and base.endswith("-py311-gpu"), base
    image = aws["docker"]["image"]
    found = {"Dockerfile FROM": version_in(base), "aws.yaml image": version_in(image)}
    for kind, doc in kuberay.items():
        found[f"{kind} rayVersion"] = cluster_spec(doc)["rayVersion"]
        for c in ray_containers(doc):
            assert c["image"] == image, f"{kind}: {c['name']} runs {c['image']}, not {image}"
            found[f"{kind} {c['name']} image"] = version_in(c["image"])
    assert len(set(found.values())) == 1, f"Ray releases disagree: {found}"
    release = next(iter(found.values()))
    assert req.specifier.contains(release), f"{release} is outside pyproject's {req}"
    assert req.specifier.contains(ray.__version__), f"installed ray {ray.__version__} vs {req}"


# --- KubeRay ----------------------------------------------------------------------------------


def test_kuberay_manifests_autoscale_with_token_auth(kuberay: dict) -> None:
    for kind, doc in kuberay.items():
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
        spec = cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"]["mode"] == "token"
        head = spec["headGroupSpec"]
        groups = [head, *spec["workerGroupSpecs"]]
        for g in groups:  # KubeRay's CRD types rayStartParams as map[string]string
            assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        # Bound to the pod IP (the operator's path to the Jobs API), which must come from the pod.
        assert head["rayStartParams"]["dashboard-host"] == "$(MY_POD_IP)"
        env = {e["name"]: e for e in ray_containers(doc)[0]["env"]}
        assert env["MY_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        gpu = [g for g in spec["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        cpu = [g for g in spec["workerGroupSpecs"] if g not in gpu]
        assert gpu and cpu, f"{kind}: need a GPU worker group and a CPU decode group"
        for g in gpu:
            keys = {t["key"] for t in g["template"]["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in keys, f"{kind}: GPU group {g['groupName']} lacks a toleration"
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] == 0 <= g["replicas"] <= g["maxReplicas"]
        assert all(g["labels"] == {"segray/role": "decode"} for g in cpu)


def test_rayjob_cleans_up_and_retries(kuberay: dict) -> None:
    spec = kuberay["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 1
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env.values())
    assert int(env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 600
    # A retry is a new cluster: only a fixed run name and storage let it resume, not restart.
    argv = shlex.split(spec["entrypoint"])
    assert "--name" in argv and argv[argv.index("--storage") + 1].startswith("s3://")


def test_rayjob_entrypoint_runs_a_shipped_job_preset_and_fits_the_gpu_group(kuberay: dict) -> None:
    spec = kuberay["RayJob"]["spec"]
    argv, args = entrypoint_args(kuberay["RayJob"])
    assert argv[0] == "python" and argv[1].startswith("jobs/")
    assert (ROOT / argv[1]).is_file(), f"entrypoint script {argv[1]} does not exist"
    preset = ROOT / "methods" / "presets" / args.method / f"{args.preset}.yaml"
    assert preset.is_file(), f"entrypoint preset {preset.relative_to(ROOT)} does not exist"
    gpu_group = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    per_pod = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert args.workers * args.gpus_per_worker <= gpu_group["maxReplicas"] * per_pod


def test_rayjob_entrypoint_resolves_to_a_valid_config(kuberay: dict) -> None:
    from methods import METHODS
    from segray.cli import build_config

    _, args = entrypoint_args(kuberay["RayJob"])
    if args.method not in METHODS:
        pytest.skip(f"method '{args.method}' is not registered in methods.METHODS yet")
    cfg = build_config(args)  # preset + flags, validated (e.g. batch divisible by workers)
    assert (cfg.workers, cfg.gpus_per_worker, cfg.method) == (4, 1.0, args.method)


# --- rules over every shipped file ------------------------------------------------------------


def test_token_auth_is_on_in_every_shipped_config(aws: dict, kuberay: dict) -> None:
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    assert all(cluster_spec(d)["authOptions"]["mode"] == "token" for d in kuberay.values())
    assert re.search(r"^ENV\b[^#]*\bRAY_AUTH_MODE=token\b", DOCKERFILE.read_text(), re.M)


def test_nothing_listens_on_all_interfaces(aws: dict, kuberay: dict) -> None:
    docs = [aws, *kuberay.values(), load_yaml(CLUSTER / "runtime_env.yaml"),
            load_yaml(CLUSTER / "prometheus" / "prometheus.yml")]
    values = [s for d in docs for s in strings(d)]
    values += [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not [v for v in values if "0.0.0.0" in v or re.search(r"(?<![\w:])::(?![\w:])", v)]


def test_no_literal_secrets_in_cluster_files() -> None:
    patterns = [r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",                 # AWS access key ids
                r"(?i)aws_secret_access_key\s*[:=]",
                r"(?i)aws_session_token\s*[:=]",
                r"RAY_AUTH_TOKEN\s*[:=]\s*[\"']?[\w+/=-]{8,}",       # a token written out
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----"]
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 9
    for path in files:
        text = path.read_text()
        for pattern in patterns:
            assert not re.search(pattern, text), f"{path.relative_to(ROOT)} matches {pattern}"
    for doc in load_yaml(KUBERAY["RayCluster"]), load_yaml(KUBERAY["RayJob"]):
        for c in ray_containers(doc):
            for e in c.get("env", []):
                assert not (e["name"] == "RAY_AUTH_TOKEN" and "value" in e), "literal token"


# --- image and runtime env ----------------------------------------------------------------


def test_dockerfile_installs_the_package_from_allowed_sources_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and "*" in ignore  # allow-list: exclude all first
    sources = [s for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M)
               for s in line.split()[:-1]]
    assert {"pyproject.toml", "platform/", "methods/", "jobs/"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} missing from the repository"
        assert f"!{src}" in ignore, f"{src} is copied but excluded by Dockerfile.dockerignore"
    assert re.search(r"pip install [^\n]*\.\s", text)
    assert not re.search(r"^USER\s+(root|0)\b", text, re.M)
    assert not re.search(r"^(?:ARG|ENV)\b.*(?:SECRET|PASSWORD|ACCESS_KEY|AUTH_TOKEN)", text, re.M)
    # `python jobs/train.py` (RayJob) resolves from the image's working directory.
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    assert workdir.startswith("/home/ray/") and "jobs/" in sources


def test_runtime_env_is_valid_for_ray_and_ships_the_whole_library(tmp_path: Path,
                                                                  monkeypatch: Any) -> None:
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load_yaml(CLUSTER / "runtime_env.yaml")
    monkeypatch.chdir(ROOT)  # relative paths resolve from the repository root, as on submit
    RuntimeEnv(**env)  # Ray validates the fields and that the py_modules paths exist
    assert env["working_dir"] == "."
    assert set(env["py_modules"]) == {"platform/segray", "methods"}
    vars_ = env["env_vars"]
    assert all(isinstance(v, str) for v in vars_.values())
    assert int(vars_["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 600
    assert not [k for k in vars_ if re.search(r"AWS_|TOKEN|SECRET|PASSWORD", k)]
    # Package exactly as Ray's uploader does; `excludes` also applies inside each py_module.
    create_package(".", tmp_path / "wd.zip", include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(tmp_path / "wd.zip").namelist())
    assert "jobs/train.py" in names and not [n for n in names if n.startswith(".git/")]
    for module in env["py_modules"]:
        zip_path = tmp_path / f"{Path(module).name}.zip"
        create_package(module, zip_path, include_gitignore=True, include_parent_dir=True,
                       excludes=env["excludes"])
        shipped = set(zipfile.ZipFile(zip_path).namelist())
        expected = {f"{Path(module).name}/{p.relative_to(ROOT / module)}"
                    for p in (ROOT / module).rglob("*")
                    if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
        assert expected and expected <= shipped, f"{module}: missing {sorted(expected - shipped)}"
