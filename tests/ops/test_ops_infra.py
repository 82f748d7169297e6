"""Cluster definitions in infra/: they parse, and they point at real gptctl entrypoints, one
image, and Ray's ports (6379 GCS, 8265 dashboard / Jobs API, 8000 Serve)."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import yaml

INFRA = Path(__file__).parents[2] / "infra"


def _dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile").read_text()


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", _dockerfile(), re.MULTILINE)
    assert match, name
    return match.group(1)


def _image() -> str:
    match = re.search(r"-t (\S+) \.", _dockerfile())
    assert match, "the Dockerfile documents its build command and tag"
    return match.group(1)


def _submit_entrypoint_parses(entrypoint: str) -> list[str]:
    """`python -m orchestrator.cli submit SPEC --address auto` is what orchestrator/cli accepts."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "orchestrator.cli"], entrypoint
    from orchestrator.cli import build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.command == "submit" and args.address == "auto"
    return argv


def test_dockerfile_prebuilds_deepspeed_ops_and_installs_gptctl():
    text = _dockerfile()
    lines = [line.strip() for line in text.splitlines()]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2 and all("nvidia/cuda:" in line for line in froms)
    assert "devel" in froms[0] and "runtime" in froms[1]
    for flag in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "DS_BUILD_UTILS=1"):
        assert flag in text, flag
    assert "--no-build-isolation" in text and "ds_report" in text
    assert re.search(r"pip install \.", text), "the checkout itself is installed"
    expose = next(line for line in lines if line.startswith("EXPOSE "))
    assert {"6379", "8265", "8000"} <= set(expose.split()[1:])
    for package in ("model", "workers", "orchestrator", "infra"):
        assert f"COPY {package} ./{package}" in text
    from infra.ray_env import PROXY_CALLBACK_ENV  # every node of an image-built cluster runs our proxy middleware

    assert all(f"{name}={value}" in text for name, value in PROXY_CALLBACK_ENV.items())
    # the ray version matches the one the tests run with
    import ray

    assert _arg("RAY_VERSION") == ray.__version__
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_aws_cluster_launcher_yaml():
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == _image()
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    workers = [node for name, node in nodes.items() if name != config["head_node_type"]]
    assert workers and re.match(r"^(g|p)\d", workers[0]["node_config"]["InstanceType"]), "a GPU worker group"
    assert workers[0]["max_workers"] >= 1
    for node in nodes.values():
        assert "instance-profile" in node["node_config"]["IamInstanceProfile"]["Arn"], "S3 through an instance profile"
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--port=6379" in head and "--dashboard-port=8265" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert ":6379" in " ".join(config["worker_start_ray_commands"])


def test_kuberay_rayjob_runs_gptctl_submit_on_a_valid_spec():
    from orchestrator.spec import parse_spec

    documents = list(yaml.safe_load_all((INFRA / "k8s" / "rayjob.yaml").read_text()))
    config_map = next(doc for doc in documents if doc["kind"] == "ConfigMap")
    job = next(doc for doc in documents if doc["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    argv = _submit_entrypoint_parses(job["spec"]["entrypoint"])
    spec_path = Path(argv[4])
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _arg("RAY_VERSION")
    head = cluster["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    assert spec_path.parent == Path(mount["mountPath"])
    assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    spec = parse_spec(yaml.safe_load(config_map["data"][spec_path.name]), source="rayjob ConfigMap")
    assert spec.kind == "pretrain" and spec.cluster.use_gpu and spec.storage_path.startswith("s3://")
    ports = {port["containerPort"] for port in head["containers"][0]["ports"]}
    assert {6379, 8265} <= ports
    images = {c["image"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert images == {_image()}
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_kuberay_rayservice_points_at_the_serve_app():
    from orchestrator.spec import parse_spec

    service = yaml.safe_load((INFRA / "k8s" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    module_name, _, attribute = app["import_path"].partition(":")
    assert module_name == "orchestrator.serve.app" and attribute
    # the args are a deploy spec's fields
    spec = parse_spec({"kind": "deploy", **app["args"]}, source="rayservice args")
    assert spec.checkpoint.startswith("s3://") and spec.gpus_per_replica >= 1
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _arg("RAY_VERSION")
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {6379, 8265, 8000} <= {port["containerPort"] for port in head["ports"]}
    assert head["image"] == _image()
    module = importlib.import_module(module_name)
    assert hasattr(module, attribute), f"{module_name}:{attribute} is the Serve config builder"
    from ray.serve import Application

    built = getattr(module, attribute)({**app["args"], "checkpoint": "/nonexistent/checkpoint"})
    assert isinstance(built, Application)


def test_infra_readme_walks_from_laptop_to_cluster():
    text = (INFRA / "README.md").read_text()
    for command in ("gptctl stack up", "gptctl submit", "--address", "ray up infra/aws/cluster.yaml",
                    "kubectl apply -f infra/k8s/rayjob.yaml", "docker build -f infra/docker/Dockerfile"):
        assert command in text, command
