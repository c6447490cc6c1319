"""One DAG per tuning spec: plan, then per stage of successive halving scale, place, wait, promote;
a teardown that always terminates what the run launched; a report that publishes the best config.

    # dags/digits_tuning.py
    from rubberband_airflow.dag_factory import tuning_dag
    dag = tuning_dag(__file__.replace(".py", ".yaml"))
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, TaskGroup, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from rubberband_airflow.execution import runner
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.operators.planning import RubberBandPlanOperator
from rubberband_airflow.planning.problem import max_stages
from rubberband_airflow.report import build_report, log_summary
from rubberband_airflow.search_space import sample
from rubberband_airflow.sensors.trial import TrialResultSensor
from rubberband_airflow.spec import TuningSpec, load_spec
from rubberband_airflow.tuning import backend_for, instance_type_names, run_uri, settings, storage_conn_id, storage_for

# Instances launched (or terminated) by one mapped scaling task.
BATCH_SIZE = 8
# The trigger form may raise the number of trials up to this factor of the spec's.
TRIALS_FACTOR = 4


def best_config_uri(spec: TuningSpec) -> str:
    """Where the latest best configuration of a tuning DAG is published (the Asset's URI)."""
    return f"{spec.storage.rstrip('/')}/{spec.name}/best_config.json"


def best_config_asset(spec_path: str | Path) -> Asset:
    """The Asset a tuning DAG publishes its best configuration to: schedule downstream DAGs on it."""
    spec = load_spec(str(spec_path))
    return Asset(name=f"{spec.name}.best_config", uri=best_config_uri(spec), group="rubberband")


def _params(spec: TuningSpec) -> dict[str, Param]:
    types = instance_type_names(spec)
    sha = spec.sha
    return {
        "deadline_seconds": Param(spec.deadline_seconds, type="number", minimum=1, title="Deadline (seconds)",
                                  description="The run must finish within this many seconds at the planner's "
                                              "quantile; the cheapest plan that does is chosen.",
                                  section="Deadline"),
        "num_trials": Param(sha["num_trials"], type="integer", minimum=1, maximum=sha["num_trials"] * TRIALS_FACTOR,
                            title="Trials", description="Configurations sampled for stage 1.",
                            section="Successive halving"),
        "eta": Param(sha["eta"], type="integer", minimum=2, maximum=8, title="Reduction factor (eta)",
                     description="Each stage keeps the best 1/eta of the trials and trains them eta times longer.",
                     section="Successive halving"),
        "min_epochs": Param(sha["min_epochs"], type="integer", minimum=1, title="Epochs in stage 1",
                            section="Successive halving"),
        "instance_types": Param(types, type="array", items={"type": "string", "enum": types},
                                title="Instance types", description="Types the planner may choose from "
                                "(one type per run).", section="Resources"),
        "max_instances": Param(None, type=["null", "integer"], minimum=1, title="Most instances at once",
                               description="Caps every type's max_instances for this run.", section="Resources"),
        "seed": Param(spec.seed, type="integer", minimum=0, title="Seed",
                      description="Seeds the sampled configurations and the planner's Monte Carlo samples.",
                      section="Resources"),
    }


def _stage_count(spec: TuningSpec) -> int:
    """Task groups made at parse time: enough for the most stages the trigger form allows."""
    return max_stages(spec.sha["num_trials"] * TRIALS_FACTOR, 2) if not spec.sha.get("num_stages") \
        else spec.sha["num_stages"]


def _run_context() -> tuple[str, str]:
    ctx = get_current_context()
    return ctx["dag"].dag_id, ctx["run_id"]


def _stage_alloc(plan: dict[str, Any], stage: int) -> dict[str, Any]:
    if stage > len(plan["stages"]):
        raise AirflowSkipException(f"this run's plan has {len(plan['stages'])} stages")
    return plan["stages"][stage - 1]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def tuning_dag(spec_path: str | Path) -> DAG:
    """Build the tuning DAG of one spec file; a bad spec raises an error naming the file and field."""
    spec_path = str(spec_path)
    spec = load_spec(spec_path)
    best = best_config_asset(spec_path)

    @task
    def start_run(plan: dict[str, Any]) -> str:
        """Sample the configurations and write the run's files; returns the run's storage URI."""
        s = load_spec(spec_path)
        dag_id, run_id = _run_context()
        params = dict(get_current_context()["params"])
        cfg = settings(s, params)
        storage = storage_for(s, run_uri(s, dag_id, run_id))
        configs = sample(s.search_space, cfg["sha"]["num_trials"], cfg["seed"])
        runner.start_run(storage, runner.RunSpec(s.trainable, s.metric, s.mode, cfg["seed"]), configs, plan,
                         plan["gpus_per_instance"])
        storage.write_json({"eta": cfg["sha"]["eta"], "min_epochs": cfg["sha"]["min_epochs"],
                            "num_trials": cfg["sha"]["num_trials"], "instance_type": plan["instance_type"]},
                           "sha.json")
        return storage.uri

    def _uri() -> str:
        """This run's storage URI: the same in every task, from the spec, DAG id and run id."""
        return run_uri(load_spec(spec_path), *_run_context())

    def _storage(uri: str | None = None) -> RunStorage:
        """This run's storage (or another URI under the spec's storage), through the spec's connection."""
        spec_now = load_spec(spec_path)
        return storage_for(spec_now, uri or run_uri(spec_now, *_run_context()))

    def _backend(uri: str, plan: dict[str, Any]):
        dag_id, run_id = _run_context()
        return backend_for(load_spec(spec_path), _storage(uri), dag_id, run_id, plan["instance_type"])

    def _fleet(plan: dict[str, Any], stage: int) -> tuple[list[str], int]:
        """The run's live instances (gone ones recorded as such first) and how many the stage wants."""
        return runner.reconcile(_backend(_uri(), plan)), int(_stage_alloc(plan, stage)["instances"])

    @task
    def scale_out(plan: dict[str, Any], stage: int) -> list[dict[str, Any]]:
        """The batches of instances this stage adds (empty when it adds none)."""
        _storage().write_json({"stage": stage, "time": time.time()}, "stages", str(stage), "start.json")
        live, want = _fleet(plan, stage)
        missing = max(0, want - len(live))
        return [{"batch": f"stage-{stage}-batch-{k}", "count": len(chunk)}
                for k, chunk in enumerate(_chunks(list(range(missing)), BATCH_SIZE))]

    @task
    def scale_in(plan: dict[str, Any], stage: int) -> list[list[str]]:
        """The batches of instances this stage drops: the most recently requested first."""
        live, want = _fleet(plan, stage)
        return _chunks(live[want:][::-1], BATCH_SIZE)

    @task
    def provision(plan: dict[str, Any], batch: dict[str, Any]) -> list[str]:
        """Launch one batch of instances (a retry finds the batch by its tags and launches nothing)."""
        return _backend(_uri(), plan).launch(batch["batch"], int(batch["count"]))

    @task
    def deprovision(plan: dict[str, Any], instances: list[str]) -> list[str]:
        """Terminate one batch of surplus instances."""
        _backend(_uri(), plan).terminate(instances)
        return instances

    @task(trigger_rule="none_failed")
    def place(plan: dict[str, Any], stage: int) -> list[str]:
        """Place the stage's trials on slots (each trial's GPUs on one instance); returns the trials."""
        alloc = _stage_alloc(plan, stage)
        uri = _uri()
        storage = _storage(uri)
        backend = _backend(uri, plan)
        trials = runner.stage_trials(storage, stage)
        sha = storage.read_json("sha.json")
        problem = plan["problem"]
        g = int(alloc["gpus_per_trial"])
        itype = next(t for t in problem["instance_types"] if t["name"] == plan["instance_type"])
        epochs_before = sha["min_epochs"] * sha["eta"] ** (stage - 2) if stage > 1 else 0
        epochs_after = sha["min_epochs"] * sha["eta"] ** (stage - 1)
        w = problem["workload"]
        duration = w["trial_overhead_seconds"] + (epochs_after - epochs_before) * w["epoch_seconds"][str(g)]
        live = backend.live()
        ready_in = {i: 0.0 if storage.heartbeat(i) else itype["pending_seconds"] + itype["boot_seconds"]
                    for i in live}
        placement = runner.place(trials, live, ready_in, plan["gpus_per_instance"] // g, g, duration,
                                 epochs_before, epochs_after)
        runner.assign_stage(storage, stage, placement)
        return trials

    @task(trigger_rule="all_done")
    def promote(plan: dict[str, Any], stage: int) -> dict[str, Any]:
        """Promote the best trials that finished; failed trials are never promoted."""
        _stage_alloc(plan, stage)
        storage = _storage()
        trials = runner.stage_trials(storage, stage)
        results = runner.stage_results(storage, stage, trials)
        missing = [t for t, r in results.items() if r is None]
        for t in missing:  # a sensor that gave up: record the trial as failed, never drop it
            storage.write_result(t, stage, {"state": "failed", "stage": stage, "error": "no result was recorded"})
        results = runner.stage_results(storage, stage, trials)
        done = [t for t, r in results.items() if r["state"] == "done"]
        failed = sorted(set(trials) - set(done))
        storage.write_json({"stage": stage, "time": time.time()}, "stages", str(stage), "end.json")
        if not done:
            raise AirflowFailException(f"every trial of stage {stage} failed: {failed}")
        sha = storage.read_json("sha.json")
        spec_now = load_spec(spec_path)
        if stage == len(plan["stages"]):
            # The job is done: release the fleet now, as the plan assumes (teardown stays the safety net).
            runner.stop_instances(storage, _backend(storage.uri, plan))
            return {"stage": stage, "promoted": [], "failed": failed}
        keep = max(1, sha["num_trials"] // sha["eta"] ** stage)
        return {"stage": stage, "promoted": runner.promote(storage, stage, results, keep, spec_now.mode),
                "failed": failed}

    @task
    def teardown() -> list[str]:
        """Terminate every instance the run still has, however the run went."""
        uri = _uri()
        storage = _storage(uri)
        plan = storage.read_json("plan.json")
        if plan is None:
            return []  # the run never started: nothing was launched
        return runner.stop_instances(storage, _backend(uri, plan))

    @task(trigger_rule="all_done", outlets=[best])
    def report() -> dict[str, Any]:
        """Write the report, publish the best configuration, and log a summary."""
        uri = _uri()
        storage = _storage(uri)
        if storage.read_json("run.json") is None:
            raise AirflowSkipException("the run did not start: nothing to report")
        rep = build_report(storage, load_spec(spec_path))
        storage.write_json(rep, "report.json")
        log_summary(rep)
        if rep["best"] is None:
            raise AirflowFailException("no trial finished: there is no best configuration")
        spec_now = load_spec(spec_path)
        publish = storage_for(spec_now, best_config_uri(spec_now).rsplit("/", 1)[0])
        publish.write_json({"config": rep["best"]["config"], "metric": rep["best"]["metric"],
                            "metric_name": rep["metric"], "trial": rep["best"]["trial"], "run": uri,
                            "published": datetime.now(timezone.utc).isoformat()}, "best_config.json")
        get_current_context()["outlet_events"][best].extra = {"run": uri, "metric": rep["best"]["metric"]}
        return {"run": uri, "best_trial": rep["best"]["trial"], "best_metric": rep["best"]["metric"],
                "actual_jct_seconds": rep["actual"]["jct_seconds"], "actual_cost_usd": rep["actual"]["cost_usd"],
                "report": storage.url("report.json")}

    with DAG(
        dag_id=spec.name,
        schedule=spec.schedule,
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        params=_params(spec),
        tags=["rubberband", *spec.tags],
        description=spec.description or f"RubberBand tuning of {spec.trainable}",
        doc_md=f"Tuning spec: `{spec_path}`. Metric: `{spec.metric}` ({spec.mode}). Best configuration "
               f"published to `{best_config_uri(spec)}`.",
        default_args={"retries": 1, "retry_delay": timedelta(seconds=5)},
    ) as dag:
        plan = RubberBandPlanOperator(task_id="plan", spec_path=spec_path, retries=0)
        started = start_run(plan.output)
        previous: Any = started
        for stage in range(1, _stage_count(spec) + 1):
            with TaskGroup(f"stage_{stage}"):
                grow = scale_out(plan.output, stage)
                shrink = scale_in(plan.output, stage)
                grow >> shrink
                launched = provision.partial(plan=plan.output).expand(batch=grow)
                dropped = deprovision.partial(plan=plan.output).expand(instances=shrink)
                trials = place(plan.output, stage)
                [launched, dropped] >> trials
                waits = TrialResultSensor.partial(
                    task_id="wait", run_uri="{{ ti.xcom_pull(task_ids='start_run') }}", stage=stage, retries=1,
                    storage_conn_id=storage_conn_id(spec),
                    poll_interval=2.0).expand(trial=trials)
                promoted = promote(plan.output, stage)
                waits >> promoted
            previous >> grow
            previous = promoted
        # start_run is the setup: the teardown runs however the stages end, even if a user marks
        # the run failed, and terminates every instance the run launched.
        done = teardown().as_teardown(setups=started)
        previous >> done
        done >> report()
    return dag
