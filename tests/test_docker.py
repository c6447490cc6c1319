"""docker/: what can be checked without a Docker engine."""

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
PYPROJECT = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]


def test_compose_runs_the_airflow_stack_on_postgres_with_the_provider():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "init", "api-server", "scheduler", "dag-processor", "triggerer"} <= set(services)
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        s = services[name]
        assert s["build"]["dockerfile"] == "docker/airflow.Dockerfile"
        assert s["environment"]["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-LocalExecutor}"
        assert s["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
        assert s["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["command"] == ["db", "migrate"]
    assert "apache/airflow:3.3.2" in (DOCKER / "airflow.Dockerfile").read_text()
    assert "rubberband-agent" in (DOCKER / "agent.Dockerfile").read_text()


def test_compose_mounts_the_repos_dags_and_plugins_where_airflows_compose_does():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        s = services[name]
        mounts = dict(reversed(v.split(":")[:2]) for v in s["volumes"])
        assert mounts["/opt/airflow/dags"] == "../dags" and mounts["/opt/airflow/plugins"] == "../plugins"
        assert s["environment"]["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/dags"
        assert s["environment"]["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/opt/airflow/plugins"
    assert (DOCKER / "../plugins/rubberband_plugin.py").is_file()


def _pip_installs(dockerfile: str) -> tuple[set[str], list[str]]:
    """What a Dockerfile's ``pip install`` lines install: the package's extras, and every other requirement."""
    text = (DOCKER / dockerfile).read_text()
    [dest] = re.findall(r"^COPY (?:--\S+ )*\. (\S+)$", text, re.MULTILINE)  # where the repository is copied
    extras: set[str] = set()
    others = []
    for line in re.findall(r"^RUN .*pip install (.*)$", text, re.MULTILINE):
        for arg in shlex.split(line):
            if arg.startswith(dest):
                extras |= set(re.findall(r"\[(.*)\]", arg)[0].split(",")) if "[" in arg else set()
            elif not arg.startswith("-"):
                others.append(arg)
    return extras, others


def _requirements(extras: set[str]) -> list[str]:
    """The package's requirements with these extras."""
    return PYPROJECT["dependencies"] + [r for e in extras for r in PYPROJECT["optional-dependencies"][e]]


def test_the_agent_image_installs_no_airflow_and_the_airflow_image_the_airflow_extra():
    extras, others = _pip_installs("agent.Dockerfile")
    assert extras == {"torch"}
    assert not [r for r in _requirements(extras) + others if r.lower().startswith("apache-airflow")]
    extras, _ = _pip_installs("airflow.Dockerfile")
    assert extras == {"airflow"}
    assert any(r.startswith("apache-airflow>=") for r in PYPROJECT["optional-dependencies"]["airflow"])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"(\d+(?:\.\d+)*)", text).group(1).split("."))


def test_checkpoints_are_loaded_with_a_safe_torch_everywhere():
    """torch.load(weights_only=True) is safe from torch 2.6: the torch extra and the agent image's base require it."""
    [torch] = [r for r in PYPROJECT["optional-dependencies"]["torch"] if re.match(r"torch\b", r)]
    assert re.fullmatch(r"torch>=[\d.]+", torch) and _version(torch.split(">=")[1]) >= (2, 6), torch
    [base] = re.findall(r"^FROM (\S+)", (DOCKER / "agent.Dockerfile").read_text(), re.MULTILINE)
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and _version(tag) >= (2, 6), base
    loads = [ln for f in (DOCKER.parent / "rubberband_airflow").rglob("*.py") for ln in f.read_text().splitlines()
             if "torch.load(" in ln]
    assert loads and all("weights_only=True" in ln for ln in loads), loads


def _statements(name: str) -> list[dict]:
    policy = json.loads((DOCKER / "iam" / name).read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def test_orchestrator_policy_is_limited_by_run_tags():
    statements = _statements("orchestrator-policy.json")
    actions = {a for s in statements if s["Effect"] == "Allow"
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert "ec2:*" not in actions and "s3:*" not in actions and "*" not in actions
    terminate = next(s for s in statements if s["Action"] == "ec2:TerminateInstances")
    assert "aws:ResourceTag/rubberband:run_id" in json.dumps(terminate["Condition"])
    launch = next(s for s in statements if "instance/*" in json.dumps(s.get("Resource")) and
                  "ec2:RunInstances" in s["Action"])
    assert "aws:RequestTag/rubberband:run_id" in json.dumps(launch["Condition"])
    passrole = next(s for s in statements if s["Action"] == "iam:PassRole")
    assert passrole["Resource"].endswith("role/rubberband-agent")


def test_agent_policy_reaches_only_the_storage_prefix():
    statements = _statements("agent-policy.json")
    for s in statements:
        assert all(a.startswith("s3:") for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
        assert "rubberband" in json.dumps(s["Resource"]) or "rubberband" in json.dumps(s.get("Condition"))


def _compose() -> list[str] | None:
    """The compose client here: the plugin (`docker compose`) or the standalone `docker-compose`."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_compose() is None, reason="no compose client (scripts/install-test-tools.sh installs one)")
def test_compose_config_is_valid_and_demands_its_secrets():
    """`compose config` resolves and validates the file without an engine."""
    cmd = [*_compose(), "-f", str(DOCKER / "compose.yaml"), "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**env, "AIRFLOW_JWT_SECRET": "s" * 48, "AIRFLOW_FERNET_KEY": "k" * 44})
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert services[name]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] == "s" * 48
        # the plugin writes the long form, docker-compose 1.x the short; sources resolved to absolute paths
        mounts = {v["target"]: v["source"] for v in services[name]["volumes"] if isinstance(v, dict)} or \
            dict(reversed(v.split(":")[:2]) for v in services[name]["volumes"])
        assert mounts == {"/opt/airflow/dags": str(DOCKER.parent / "dags"),
                          "/opt/airflow/plugins": str(DOCKER.parent / "plugins")}
        assert services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"  # the default
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "AIRFLOW_FERNET_KEY": "k" * 44})
    assert r.returncode != 0 and "set AIRFLOW_JWT_SECRET" in r.stderr


@pytest.mark.skipif(_compose() is None, reason="no compose client (scripts/install-test-tools.sh installs one)")
def test_compose_celery_profile_is_the_distributed_stack():
    """The profile ``celery``: CeleryExecutor everywhere, Redis the broker, PostgreSQL the result
    backend, two workers of the provider's image."""
    cmd = [*_compose(), "-f", str(DOCKER / "compose.yaml"), "--profile", "celery", "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={
        **env, "AIRFLOW_JWT_SECRET": "s" * 48, "AIRFLOW_FERNET_KEY": "k" * 44, "AIRFLOW_EXECUTOR": "CeleryExecutor"})
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    assert services["redis"]["image"].startswith("redis:")
    worker = services["worker"]
    assert worker["command"] == ["celery", "worker"] and worker["deploy"]["replicas"] == 2
    assert worker["build"]["dockerfile"] == "docker/airflow.Dockerfile"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("api-server", "scheduler", "dag-processor", "triggerer", "worker"):
        environment = services[name]["environment"]
        assert environment["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert environment["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
        assert environment["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
