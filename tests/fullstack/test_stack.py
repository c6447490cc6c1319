"""The digits DAG under the real scheduler, triggerer and LocalExecutor on PostgreSQL, triggered by REST."""

import psutil

from rubberband_airflow.execution.storage import RunStorage
from tests.airflow.conftest import airflow_home  # noqa: F401 (the session fixture the stack builds on)
from tests.fullstack.conftest import airflow_stack  # noqa: F401


def test_rest_triggered_run_overrides_params_and_reports(airflow_stack):
    stack = airflow_stack
    stack.wait_for_dag("digits_tuning")
    run_id = stack.trigger("digits_tuning", {"num_trials": 4, "deadline_seconds": 600})
    state = stack.wait_for_run("digits_tuning", run_id)
    states = stack.task_states("digits_tuning", run_id)
    assert state == "success", states
    assert states["plan[-1]"] == "success" and states["teardown[-1]"] == "success"
    waits = [k for k in states if k.startswith("stage_1.wait[")]
    assert len(waits) == 4  # one deferred sensor per trial: the form's num_trials, not the spec's 8
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    storage = RunStorage(f"file://{stack.home}/rubberband/digits_tuning/{safe}")
    rep = storage.read_json("report.json")
    assert rep["best"] is not None and len(rep["trials"]) == 4
    assert rep["deadline_seconds"] == 600
    events = stack.api("GET", "/assets/events?limit=100")["asset_events"]
    assert any(e.get("source_run_id") == run_id and e["extra"].get("metric") == rep["best"]["metric"] for e in events)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "rubberband_airflow.execution" in
                " ".join(p.info["cmdline"] or []) and str(stack.home) in " ".join(p.info["cmdline"] or [])]
