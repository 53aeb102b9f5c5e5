"""Deployment files: they parse, have what the README promises, and run commands our CLI accepts.

No Docker engine or cluster runs here, so the files are checked as data; the commands inside them are parsed
by the same parser the CLI tests exercise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from sft_optuna.cli import build_parser


def _env_example() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {k: v for k, v in pairs}


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolate(yaml.safe_load((REPO / "docker-compose.yml").read_text()), _env_example())


def _assert_cli_accepts(command: list[str]) -> None:
    assert command[0] == "sft-optuna"
    build_parser().parse_args(command[1:])  # exits (SystemExit) on anything our CLI would refuse


def test_compose_has_the_services_volumes_and_gpu_reservations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "proxy", "create", "worker-gpu0", "dashboard"} <= set(services)
    assert {"pgdata", "data", "checkpoints"} <= set(compose["volumes"])
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["proxy"]
    assert services["proxy"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["create"]["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert "ports" not in services["proxy"], "the proxy has no authentication: never published on the host"
    assert services["proxy"]["environment"]["SFT_OPTUNA_STORAGE"].startswith("postgresql+psycopg://")
    gpus = set()
    for name, svc in services.items():
        if name.startswith("worker-gpu"):
            (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
            assert device["capabilities"] == ["gpu"]
            gpus.add(tuple(device["device_ids"]))
            assert svc["restart"] == "on-failure"
            assert svc["depends_on"]["create"]["condition"] == "service_completed_successfully"
            assert any(v.startswith("checkpoints:") for v in svc["volumes"])
            assert svc["environment"]["SFT_OPTUNA_STORAGE"] == "grpc://proxy:13000", "workers go through the proxy"
    assert len(gpus) == 4, "each worker service pins a different GPU"


def test_compose_commands_are_ones_the_cli_accepts(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name != "postgres":
            _assert_cli_accepts(svc["command"])
    assert compose["services"]["create"]["command"][-1] == "/app/studies/cifar10-resnet18-tpe.yaml"
    assert (REPO / "studies" / "cifar10-resnet18-tpe.yaml").is_file()


def test_dashboard_is_read_only_local_and_uses_a_read_only_role(compose: dict[str, Any]) -> None:
    dash = compose["services"]["dashboard"]
    assert "--read-only" in dash["command"]
    assert all(p.startswith("127.0.0.1:") for p in dash["ports"])
    env = _env_example()
    assert dash["environment"]["SFT_OPTUNA_STORAGE"].startswith(f"postgresql+psycopg://{env['DASHBOARD_DB_USER']}:")
    init = (REPO / "deploy" / "postgres" / "init-readonly.sh").read_text()
    assert "GRANT SELECT" in init and "ALTER DEFAULT PRIVILEGES" in init and "INSERT" not in init


def test_secrets_stay_out_of_git() -> None:
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert (REPO / ".env.example").is_file()


def test_docker_compose_config_validates_when_the_client_has_compose(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client here (the YAML checks above still ran)")
    env = tmp_path / ".env"
    env.write_text((REPO / ".env.example").read_text())
    proc = subprocess.run(
        [docker, "compose", "--env-file", str(env), "-f", str(REPO / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_kubernetes_job_goes_through_the_proxy_deployment_which_alone_has_the_secret() -> None:
    (job,) = yaml.safe_load_all((REPO / "deploy" / "k8s" / "job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["parallelism"] >= 2
    pod = job["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    _assert_cli_accepts(worker["command"])
    for container in [worker, *pod["initContainers"]]:
        _assert_cli_accepts(container["command"])
        (storage_env,) = [e for e in container["env"] if e["name"] == "SFT_OPTUNA_STORAGE"]
        assert storage_env["value"] == "grpc://sft-optuna-proxy:13000"
    deployment, service = yaml.safe_load_all((REPO / "deploy" / "k8s" / "proxy.yaml").read_text())
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    (proxy,) = deployment["spec"]["template"]["spec"]["containers"]
    _assert_cli_accepts(proxy["command"])
    assert proxy["command"][:2] == ["sft-optuna", "proxy"]
    (storage_env,) = [e for e in proxy["env"] if e["name"] == "SFT_OPTUNA_STORAGE"]
    assert storage_env["valueFrom"]["secretKeyRef"]["name"] == "sft-optuna-storage"
    assert service["metadata"]["name"] == "sft-optuna-proxy" and service["spec"]["ports"][0]["port"] == 13000
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    secret = yaml.safe_load((REPO / "deploy" / "k8s" / "secret.example.yaml").read_text())
    assert secret["kind"] == "Secret" and "url" in secret["stringData"]


def test_slurm_script_is_valid_bash_an_array_of_gpu_tasks_and_forwards_sigterm() -> None:
    script = REPO / "deploy" / "slurm" / "sft-optuna-workers.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH --signal=B:TERM@" in text
    assert "trap 'kill -TERM" in text
    line = next(line for line in text.splitlines() if line.startswith("sft-optuna worker"))
    command = [w.strip('"') for w in line.rstrip(" &").split()]
    _assert_cli_accepts([w if not w.startswith("$") else "x" for w in command])
