"""docker/: what can be checked without a Docker engine."""

import json
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_compose_runs_the_airflow_stack_on_postgres_with_the_provider():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "init", "api-server", "scheduler", "dag-processor", "triggerer"} <= set(services)
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        s = services[name]
        assert s["build"]["dockerfile"] == "docker/airflow.Dockerfile"
        assert s["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert s["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
        assert s["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["command"] == ["db", "migrate"]
    assert "apache/airflow:3.3.2" in (DOCKER / "airflow.Dockerfile").read_text()
    assert "rubberband-agent" in (DOCKER / "agent.Dockerfile").read_text()


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
