"""Provider conventions as the amazon provider keeps them, for the operator, sensor, trigger, hook and plugin."""

import ast
import importlib
import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

import rubberband_airflow.sensors.trial as sensor_module
from rubberband_airflow.execution.runner import RunSpec, assign_stage, start_run
from rubberband_airflow.get_provider_info import get_provider_info
from rubberband_airflow.hooks import storage as storage_hook
from rubberband_airflow.hooks.backend import backend_of_run, run_backend
from rubberband_airflow.operators.planning import RubberBandPlanOperator
from rubberband_airflow.sensors.trial import TrialResultSensor
from rubberband_airflow.triggers.trial import BOOT_SECONDS, LIVENESS_INTERVAL, SILENT_SECONDS, TrialResultTrigger
from tests.airflow.conftest import ROOT, airflow_env
from tests.execution.conftest import storage  # noqa: F401 (fixture)

PROVIDER_MODULES = ["rubberband_airflow.operators.planning", "rubberband_airflow.sensors.trial",
                    "rubberband_airflow.triggers.trial", "rubberband_airflow.hooks.storage",
                    "rubberband_airflow.hooks.backend", "rubberband_airflow.sweeper",
                    "rubberband_airflow.plugin", "rubberband_airflow.get_provider_info"]


# deferrable follows [operators] default_deferrable


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_sensor_defers_by_default_as_operators_default_deferrable_says(tmp_path, value):
    """Read when the module is imported, as the amazon provider's sensors do: a fresh interpreter each."""
    env = {**airflow_env(tmp_path), "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": value}
    code = ("from rubberband_airflow.sensors.trial import TrialResultSensor as S\n"
            "print(S(task_id='w', run_uri='file:///r', trial='trial-0000', stage=1).deferrable,"
            " S(task_id='x', run_uri='file:///r', trial='trial-0000', stage=1, deferrable=True).deferrable)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [value.capitalize(), "True"]


def test_the_sensor_refuses_reschedule_mode_which_would_forget_the_heartbeat():
    with pytest.raises(ValueError, match="Only 'poke' is acceptable"):
        TrialResultSensor(task_id="w", run_uri="file:///r", trial="trial-0000", stage=1, deferrable=False,
                          mode="reschedule")


# The sensor's two paths


def _placed(storage, instance: str = "i-never") -> None:  # noqa: F811
    start_run(storage, RunSpec("tests.trainables:hangs", "accuracy", "max", seed=1), [{"lr": 0.1}],
              {"instance_type": "local-1", "stages": []}, 1)
    assign_stage(storage, 1, {instance: [{"trial": "trial-0000", "gpus": 1, "start_epoch": 0, "stop_epoch": 1}]})


def _poking_sensor(storage) -> TrialResultSensor:  # noqa: F811
    return TrialResultSensor(task_id="wait", run_uri=storage.uri, trial="trial-0000", stage=1, deferrable=False,
                             poll_interval=0.05, timeout=30)


@pytest.fixture
def short_liveness(monkeypatch):
    """The poking sensor's liveness windows, shortened: no heartbeat within 0.5 s, or none new for 0.5 s."""
    monkeypatch.setattr(sensor_module, "boot_limit", lambda plan: 0.5)
    monkeypatch.setattr(sensor_module, "SILENT_SECONDS", 0.5)
    monkeypatch.setattr(sensor_module, "LIVENESS_INTERVAL", 0.0)


def test_a_poking_sensor_returns_the_result_when_it_appears(storage):  # noqa: F811
    _placed(storage, "i-alive")
    done = {"state": "done", "stage": 1, "metric": 0.75}
    threading.Timer(0.3, storage.write_result, ("trial-0000", 1, done)).start()
    context: dict = {}
    assert _poking_sensor(storage).execute(context) == {"trial": "trial-0000", "stage": 1, "metric": 0.75}
    assert context["rubberband_trial_label"] == "trial-0000 lr=0.1"


def test_a_poking_sensor_fails_a_trial_whose_agent_never_starts_and_records_why(storage, short_liveness):  # noqa: F811
    _placed(storage)
    with pytest.raises(AirflowFailException, match="instance i-never sent no heartbeat within 0.5 s"):
        _poking_sensor(storage).execute({})
    assert storage.read_result("trial-0000", 1) == {
        "state": "failed", "stage": 1, "instance": "i-never",
        "error": "instance i-never sent no heartbeat within 0.5 s: its agent never started"}


def test_a_poking_sensor_fails_a_trial_whose_instance_falls_silent(storage, short_liveness):  # noqa: F811
    _placed(storage, "i-dead")
    storage.write_json({"time": 1.0, "running": True}, "instances", "i-dead", "heartbeat.json")  # then nothing
    with pytest.raises(AirflowFailException, match="trial-0000 failed in stage 1: instance i-dead was lost"):
        _poking_sensor(storage).execute({})
    assert storage.read_result("trial-0000", 1)["state"] == "failed"


def test_a_deferring_sensor_hands_the_wait_to_its_trigger(storage):  # noqa: F811
    _placed(storage)
    sensor = TrialResultSensor(task_id="wait", run_uri=storage.uri, trial="trial-0000", stage=1, deferrable=True,
                               storage_conn_id="aws_default", poll_interval=2.0)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.trigger.serialize()[1] == {
        "run_uri": storage.uri, "trial": "trial-0000", "stage": 1, "poll_interval": 2.0,
        "silent_seconds": SILENT_SECONDS, "boot_seconds": BOOT_SECONDS, "liveness_interval": LIVENESS_INTERVAL,
        "storage_conn_id": "aws_default", "spec_path": None, "dag_id": None, "run_id": None,
        "finish_task": False}


# template_fields


def test_template_fields_are_attributes_and_render():
    op = RubberBandPlanOperator(task_id="plan", spec_path="{{ params.dags }}/digits_tuning.yaml")
    sensor = TrialResultSensor(task_id="wait", run_uri="{{ params.storage }}/{{ run_id }}", trial="{{ params.trial }}",
                               stage=2, storage_conn_id="{{ params.conn }}")
    assert op.template_fields == ("spec_path",)
    for task in (op, sensor):
        assert all(hasattr(task, name) for name in task.template_fields)
        task.render_template_fields({"params": {"dags": "/opt/dags", "storage": "s3://b/t", "trial": "trial-0003",
                                                "conn": "aws_default"}, "run_id": "manual__1"})
    assert op.spec_path == "/opt/dags/digits_tuning.yaml"
    assert (sensor.run_uri, sensor.trial, sensor.stage, sensor.storage_conn_id) == (
        "s3://b/t/manual__1", "trial-0003", 2, "aws_default")


# The trigger


def test_trigger_serialize_round_trips_every_constructor_argument():
    from airflow.models.trigger import Trigger
    from airflow.sdk.module_loading import import_string

    kwargs = {"run_uri": "s3://b/t/manual__1", "trial": "trial-0007", "stage": 3, "poll_interval": 1.5,
              "silent_seconds": 120.0, "boot_seconds": 1800.0, "liveness_interval": 10.0,
              "storage_conn_id": "aws_default", "spec_path": "/opt/dags/digits_tuning.yaml",
              "dag_id": "digits_tuning", "run_id": "manual__1", "finish_task": True}
    params = set(inspect.signature(TrialResultTrigger.__init__).parameters) - {"self"}
    assert set(kwargs) == params  # every argument, none at its default
    assert all(kwargs[p] != inspect.signature(TrialResultTrigger).parameters[p].default for p in params)
    classpath, out = TrialResultTrigger(**kwargs).serialize()
    assert out == kwargs
    stored = Trigger._decrypt_kwargs(Trigger.encrypt_kwargs(out))  # as the trigger row keeps them
    again = import_string(classpath)(**stored)
    assert type(again) is TrialResultTrigger and again.serialize() == (classpath, kwargs)


# :param docstrings, logging, imports


def _documented(obj) -> set[str]:
    return {line.split(":param ", 1)[1].split(":", 1)[0] for line in inspect.getdoc(obj).splitlines()
            if line.strip().startswith(":param ")}


@pytest.mark.parametrize("obj,signature_of", [
    (RubberBandPlanOperator, RubberBandPlanOperator.__init__), (TrialResultSensor, TrialResultSensor.__init__),
    (TrialResultTrigger, TrialResultTrigger.__init__), (storage_hook.run_storage, storage_hook.run_storage),
    (storage_hook.read_text, storage_hook.read_text), (storage_hook.storage_for, storage_hook.storage_for),
    (storage_hook.load_profile, storage_hook.load_profile), (run_backend, run_backend),
    (backend_of_run, backend_of_run)],
    ids=lambda o: getattr(o, "__qualname__", ""))
def test_every_public_class_and_hook_function_documents_each_parameter(obj, signature_of):
    doc = inspect.getdoc(obj)
    summary, blank = doc.splitlines()[:2]
    assert summary.endswith(".") and not blank  # a one-line summary, then a paragraph
    params = {n for n, p in inspect.signature(signature_of).parameters.items()
              if n != "self" and p.kind is not p.VAR_KEYWORD}
    assert _documented(obj) == params


@pytest.mark.parametrize("module", PROVIDER_MODULES)
def test_provider_modules_log_and_import_no_execution_time_internals(module):
    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
    for node in ast.walk(tree):
        assert not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"), (
            f"{module}:{node.lineno} prints; use logging")
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not any(n.startswith("airflow.sdk.execution_time") for n in names), f"{module}:{node.lineno}"


# Provider info


def test_provider_info_validates_against_airflows_schema_and_names_importable_modules():
    import airflow

    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["package-name"] == "rubberband-airflow"  # the distribution's name, as discovery requires
    assert "plugins" not in info  # registered by the airflow.plugins entry point only (not both ways)
    integrations = {i["integration-name"] for i in info["integrations"]}
    for kind in ("operators", "sensors", "hooks", "triggers"):
        for entry in info[kind]:
            assert entry["integration-name"] in integrations
            for module in entry["python-modules"]:
                importlib.import_module(module)


# The plugin


@pytest.fixture
def dags_folder_in_conf(tmp_path, monkeypatch):
    """``[core] dags_folder`` set in Airflow's config (no environment variable), with one spec in it."""
    from airflow.configuration import conf

    folder = tmp_path / "configured_dags"
    folder.mkdir()
    (folder / "digits_tuning.yaml").write_text((ROOT / "dags" / "digits_tuning.yaml").read_text())
    (folder / "notes.yaml").write_text("not: a spec\n")
    monkeypatch.delenv("AIRFLOW__CORE__DAGS_FOLDER", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "elsewhere"))  # a folder from the environment is not used
    before = conf.get("core", "dags_folder")
    conf.set("core", "dags_folder", str(folder))
    yield folder
    conf.set("core", "dags_folder", before)


def test_the_plugin_lists_the_specs_of_the_configured_dags_folder(dags_folder_in_conf, monkeypatch):
    from rubberband_airflow import plugin

    class Allow:
        def __init__(self, dag_ids: set[str]) -> None:
            self.dag_ids = dag_ids

        def is_authorized_dag(self, *, method, access_entity, details, user) -> bool:
            return details.id in self.dag_ids

    monkeypatch.setattr(plugin, "get_auth_manager", lambda: Allow({"digits_tuning"}))
    assert [s.name for s in plugin._specs(user=None)] == ["digits_tuning"]
    monkeypatch.setattr(plugin, "get_auth_manager", lambda: Allow(set()))
    assert plugin._specs(user=None) == []
