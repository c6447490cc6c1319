"""One DAG per tuning spec: plan, then per stage of successive halving start (promote the stage
before, re-plan, scale, place), wait, promote;
a teardown that always terminates what the run launched; a report that publishes the best config.

    # dags/digits_tuning.py
    from rubberband_airflow.dag_factory import tuning_dag
    dag = tuning_dag(__file__.replace(".py", ".yaml"))
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, TaskGroup, conf, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from airflow.triggers.base import StartTriggerArgs

from rubberband_airflow import trainable
from rubberband_airflow.execution import replanning, runner
from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.hooks.backend import deployment_name, retire_earlier_attempts, run_backend, teardown_run
from rubberband_airflow.hooks.storage import run_storage, storage_for
from rubberband_airflow.operators.planning import RubberBandPlanOperator
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import SHA
from rubberband_airflow.report import build_report, log_summary
from rubberband_airflow.search_space import sample
from rubberband_airflow.sensors.trial import TrialResultSensor
from rubberband_airflow.spec import TuningSpec, load_spec
from rubberband_airflow.triggers.trial import TrialResultTrigger
from rubberband_airflow.tuning import (
    RunSnapshot,
    carry_over_earlier_attempt,
    dag_uri,
    instance_type_names,
    read_snapshot,
    run_uri,
    settings,
    storage_conn_id,
    write_snapshot,
)

log = logging.getLogger(__name__)

# Instances launched in one request (a batch, found again by its name when a task is retried).
BATCH_SIZE = 8
# The trigger form may raise the number of trials up to this factor of the spec's.
TRIALS_FACTOR = 4


def best_config_uri(spec: TuningSpec) -> str:
    """Where the latest best configuration of a tuning DAG is published (the Asset's URI)."""
    return f"{dag_uri(spec)}/best_config.json"


def best_config_asset(spec_path: str | Path) -> Asset:
    """The Asset a tuning DAG publishes its best configuration to: schedule downstream DAGs on it."""
    spec = load_spec(str(spec_path))
    return Asset(name=f"{spec.name}.best_config", uri=best_config_uri(spec), group="rubberband")


RUN_URI = "{{ ti.xcom_pull(task_ids='start_run') }}"
# Seconds between two listings of a stage's results by its trials' triggers (one for all of them).
POLL_SECONDS = 2.0


def _waits_on_triggerer(stage: int, conn_id: str | None, spec_path: str) -> dict[str, Any]:
    """With ``[rubberband] waits_start_on_triggerer``: the arguments that start a stage's trial
    waits on the triggerer (the scheduler defers them there; no worker runs them unless one
    fails or loses its instance). The triggerer renders the run URI's template; the trigger finds its
    trial by its map index in the stage's placement."""
    if not conf.getboolean("rubberband", "waits_start_on_triggerer", fallback=False):
        return {}
    return {"start_from_trigger": True, "start_trigger_args": StartTriggerArgs(
        trigger_cls=f"{TrialResultTrigger.__module__}.{TrialResultTrigger.__qualname__}",
        # map_indexes=-1: a plain GetXCom (the triggerer cannot serve a mapped task's sequence slice)
        trigger_kwargs={"run_uri": "{{ ti.xcom_pull(task_ids='start_run', map_indexes=-1) }}", "trial": None,
                        "stage": stage, "poll_interval": POLL_SECONDS,
                        "storage_conn_id": conn_id, "spec_path": spec_path, "boot_seconds": None, "finish_task": True},
        next_method="execute_complete", next_kwargs=None, timeout=None)}


def _params(spec: TuningSpec) -> dict[str, Param]:
    types = instance_type_names(spec)
    sha = spec.sha
    return {
        "deadline_seconds": Param(spec.deadline_seconds, type="number", minimum=1, title="Deadline (seconds)",
                                  description="The run must finish within this many seconds at the planner's "
                                              "quantile; the cheapest plan that does is chosen.",
                                  section="Deadline"),
        "num_trials": Param(sha.num_trials, type="integer", minimum=1, maximum=sha.num_trials * TRIALS_FACTOR,
                            title="Trials", description="Configurations sampled for stage 1.",
                            section="Successive halving"),
        "eta": Param(sha.eta, type="integer", minimum=2, maximum=8, title="Reduction factor (eta)",
                     description="Each stage keeps the best 1/eta of the trials and trains them eta times longer.",
                     section="Successive halving"),
        "min_epochs": Param(sha.min_epochs, type="integer", minimum=1, title="Epochs in stage 1",
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
    """Task groups made at parse time: enough for the most stages the trigger form allows (eta 2)."""
    return SHA(spec.sha.num_trials * TRIALS_FACTOR, 2, spec.sha.min_epochs, spec.sha.num_stages).stages


def _attempt(ctx: Any) -> int:
    """The attempt of the running DAG run: 1, then one more each time the run is cleared."""
    return int(getattr(ctx["dag_run"], "clear_number", 0) or 0) + 1


def _try(ctx: Any) -> tuple[int, bool]:
    """The running task's try number and whether it is the first try of its clear (Airflow's own rule:
    a clear sets ``max_tries`` to the try number then plus the task's retries)."""
    ti = ctx["ti"]
    first = int(ti.max_tries) - int(ti.task.retries or 0) + 1
    return int(ti.try_number), int(ti.try_number) <= first


class _Run:
    """What a task of one run works with: the run's storage (start_run's XCom), its own copy
    of the spec and the trigger form's values (the snapshot start_run wrote), and the plan its
    stage executes in this attempt (``plan.json``, or the latest re-plan at or before the stage)."""

    def __init__(self, conn_id: str | None, stage: int | None = None) -> None:
        ctx = get_current_context()
        self.dag_id, self.run_id, self.clear = ctx["dag"].dag_id, ctx["run_id"], _attempt(ctx) - 1
        uri = ctx["ti"].xcom_pull(task_ids="start_run")
        if not uri:
            raise AirflowFailException("start_run has no XCom: clear the run from start_run on")
        self.storage = run_storage(uri, conn_id)
        snapshot = read_snapshot(self.storage)
        self.spec, self.params = snapshot.spec, snapshot.params
        self.attempt, self.deployment = snapshot.attempt, snapshot.deployment
        self.plan: runner.RunPlan | None = None
        if stage is not None:
            self.use(replanning.current_plan(self.storage, stage), stage)

    def use(self, plan: dict[str, Any] | None, stage: int) -> None:
        """Execute ``plan`` from here on; past its last stage, skip this task."""
        if plan is None:
            raise AirflowFailException(f"{self.storage.uri} has no plan.json: clear the run from start_run on")
        self.plan = runner.RunPlan.from_json(plan)
        if not self.plan.has_stage(stage):
            raise AirflowSkipException(f"this run's plan has {self.plan.stages} stages")

    @property
    def backend(self) -> ComputeBackend:
        assert self.plan is not None
        return run_backend(self.spec, self.storage, self.dag_id, self.run_id, self.plan.plan.instance_type,
                           idle_timeout=self.plan.agent_idle_seconds(self.spec.trial_timeout),
                           attempt=self.attempt, deployment=self.deployment)


def tuning_dag(spec_path: str | Path) -> DAG:
    """Build the tuning DAG of one spec file; a bad spec raises an error naming the file and field."""
    spec_path = str(spec_path)
    spec = load_spec(spec_path)
    conn_id = storage_conn_id(spec)
    best = best_config_asset(spec_path)

    # Each task's body is tried again through a storage error burst (``trainable.patiently``: a transient
    # error, backing off, for up to 5 minutes), as the waits and the trials ride one out. Its steps are
    # those Airflow's own retry repeats, each idempotent: a stage's batches are decided once and found
    # again by name, and an instance launched whose ledger entry failed is adopted (runner.scale).
    @task
    def start_run(plan: dict[str, Any]) -> str:
        """Start this attempt of the DAG run: snapshot the spec and the form's values, sample the
        configurations and write the run's files in the attempt's own folder; returns its URI."""
        def body() -> str:
            ctx = get_current_context()
            dag_id, attempt = ctx["dag"].dag_id, _attempt(ctx)
            today = load_spec(spec_path)
            storage = storage_for(today, run_uri(today, dag_id, ctx["run_id"], attempt))
            params = dict(ctx["params"])
            write_snapshot(storage, RunSnapshot(today, params, attempt, deployment_name()))
            cfg = settings(today, params)
            configs = sample(today.search_space, cfg.sha.num_trials, cfg.seed)
            runner.start_run(storage, runner.RunSpec(today.trainable, today.metric, today.mode, cfg.seed),
                             configs, plan, plan["gpus_per_instance"])
            if attempt > 1:
                # A run cleared while it ran: its earlier attempt's instances still run (and bill).
                stopped = retire_earlier_attempts(today, dag_id, ctx["run_id"], attempt)
                if stopped:
                    log.warning("attempt %d replaces the earlier ones: terminated %s", attempt, ", ".join(stopped))
                kept = carry_over_earlier_attempt(
                    storage, today, params, plan, attempt,
                    lambda k: storage_for(today, run_uri(today, dag_id, ctx["run_id"], k)))
                log.info("%s", kept.get("reason") or f"kept from attempt {kept['from_attempt']}: {kept['results']}")
            log.info("attempt %d of run %s: files in %s", attempt, ctx["run_id"], storage.uri)
            return storage.uri

        return trainable.patiently(body, "start_run")

    @task
    def start(stage: int, replan: bool) -> list[str]:
        """Start the stage in one task (each task hop between two stages costs the orchestrator a
        scheduling round and a task process): promote the stage before (its own promote task, off
        this path, then reads the outcome), re-plan the stages from this one on from the run's
        state (``replan``), grow or shrink the fleet (newest instances dropped first), and place
        the stage's trials on slots (each trial's GPUs on one instance); returns the trials."""
        def body() -> list[str]:
            r = _Run(conn_id)
            continued = r.clear - (r.attempt - 1)
            before = replanning.current_plan(r.storage, stage - 1) if stage > 1 else None
            if stage > 1:
                r.use(before, stage)  # past the plan's last stage: skipped, the stage before promoted by its own task
            this_try, first_of_clear = _try(get_current_context())
            runner.note_start_try(r.storage, stage, this_try, first_of_clear, continued)
            if stage > 1:
                assert before is not None and r.plan is not None
                try:
                    runner.promote_stage(r.storage, r.backend, r.plan, stage - 1, r.spec.mode)
                except runner.StageFailed as e:
                    raise AirflowFailException(str(e)) from None
                if replan:
                    try:
                        replanning.replan_before(r.storage, r.backend, before, stage, continued, this_try)
                    except ProblemError as e:
                        raise AirflowFailException(f"re-plan before stage {stage}: {e}") from None
            r.use(replanning.current_plan(r.storage, stage), stage)
            assert r.plan is not None
            placement = runner.start_stage(r.storage, r.backend, r.plan, stage, r.spec.trial_timeout, r.clear,
                                           BATCH_SIZE, continued=continued, start_try=this_try)
            # A trial whose result was carried over from an earlier attempt is not placed; its wait ends at once.
            return runner.placed_trials(placement, runner.stage_trials(r.storage, stage))

        return trainable.patiently(body, f"the start of stage {stage}")

    @task
    def prewarm(stage: int) -> list[str]:
        """Pre-warm the next stage: at the plan's lead time, launch the instances it adds, unless the
        stage ended first (a plan without a lead time: nothing, at once)."""
        def body() -> list[str]:
            r = _Run(conn_id, stage)
            assert r.plan is not None
            return runner.prewarm(r.storage, r.backend, r.plan, stage, BATCH_SIZE, continued=r.clear - (r.attempt - 1))

        return trainable.patiently(body, f"the pre-warming of stage {stage + 1}")

    # After every wait, failed or not; skipped with its stage (a stage past the plan's last, whose
    # start skipped it), without a task process.
    @task(trigger_rule="all_done_min_one_success")
    def promote(stage: int) -> dict[str, Any]:
        """Promote the best trials that finished; failed trials are never promoted (the next
        stage's start, where there is one, promotes at the same time: one of them does, once)."""
        def body() -> dict[str, Any]:
            r = _Run(conn_id, stage)
            assert r.plan is not None
            try:
                return runner.promote_stage(r.storage, r.backend, r.plan, stage, r.spec.mode).to_json()
            except runner.StageFailed as e:
                raise AirflowFailException(str(e)) from None

        return trainable.patiently(body, f"the promotion of stage {stage}")

    @task
    def teardown() -> list[str]:
        """Terminate every instance the run still has, however the run went (then sweep by its tags)."""
        ctx = get_current_context()
        uri = ctx["ti"].xcom_pull(task_ids="start_run")
        return teardown_run(uri, spec, ctx["dag"].dag_id, ctx["run_id"]) if uri else []

    @task(trigger_rule="all_done", outlets=[best])
    def report() -> dict[str, Any]:
        """Write the report, publish the best configuration, and log a summary (in an attempt
        continued after a clear of its failed tasks, first terminate what it launched since)."""
        def body() -> dict[str, Any]:
            if not get_current_context()["ti"].xcom_pull(task_ids="start_run"):
                # The plan or start_run failed: the run failed, whatever its skipped stages leave behind.
                raise AirflowFailException("the run did not start (its plan or start_run failed): nothing to report")
            run = _Run(conn_id)
            if run.clear > run.attempt - 1:  # a continued attempt: its teardown ran before the clear, not since
                teardown_run(run.storage.uri, run.spec, run.dag_id, run.run_id)
            rep = {**build_report(run.storage, run.dag_id), "run_id": run.run_id, "attempt": run.attempt}
            run.storage.write_json(rep, "report.json")
            log_summary(rep)
            if rep["best"] is None:
                raise AirflowFailException("no trial finished: there is no best configuration")
            if not rep["complete"]:
                raise AirflowFailException(
                    f"the run ended after stage {rep['stages'][-1]['stage']} of {rep['stages_planned']} (a task of "
                    f"the run failed: see which): the report has what ran; no best configuration is published")
            publish = storage_for(run.spec, dag_uri(run.spec, run.dag_id))
            publish.write_json({"config": rep["best"]["config"], "metric": rep["best"]["metric"],
                                "metric_name": rep["metric"], "trial": rep["best"]["trial"], "run": run.storage.uri,
                                "published": datetime.now(UTC).isoformat()}, "best_config.json")
            get_current_context()["outlet_events"][best].extra = {"run": run.storage.uri,
                                                                  "metric": rep["best"]["metric"]}
            return {"run": run.storage.uri, "best_trial": rep["best"]["trial"], "best_metric": rep["best"]["metric"],
                    "actual_jct_seconds": rep["actual"]["jct_seconds"], "actual_cost_usd": rep["actual"]["cost_usd"],
                    "report": run.storage.url("report.json")}

        return trainable.patiently(body, "the report")

    with DAG(
        dag_id=spec.name,
        schedule=spec.schedule,
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
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
        promotes = []
        for stage in range(1, _stage_count(spec) + 1):
            with TaskGroup(f"stage_{stage}"):
                # Every task of a stage reads the plan it executes from run storage: the first plan,
                # or (re-planning on) the stage's re-plan, which its start task writes. A stage past
                # the plan's last skips its start, and with it the rest.
                # From stage 2 on, after every wait of the stage before, failed or not (and its
                # pre-warm); skipped with it. (Stage 1 follows start_run, the setup: all_success.)
                stage_start = start if stage == 1 else start.override(trigger_rule="all_done_min_one_success")
                trials = stage_start(stage, spec.replan and stage > 1)
                # Deferred whatever [operators] default_deferrable says: a trial's wait lasts as long as
                # the trial, and one sensor per trial must not hold a worker slot for it. A done trial
                # ends its task on the triggerer: a second worker launch per trial is what a stage of
                # hundreds of trials spent its time on.
                waits = TrialResultSensor.partial(
                    task_id="wait", run_uri=RUN_URI, stage=stage, retries=1,
                    storage_conn_id=conn_id, spec_path=spec_path, deferrable=True, finish_on_triggerer=True,
                    poll_interval=POLL_SECONDS, **_waits_on_triggerer(stage, conn_id, spec_path)).expand(trial=trials)
                promoted = promote(stage)
                [trials, waits] >> promoted
                # The next stage starts from this one's waits, not its promote (a task hop fewer
                # between stages: it promotes this stage itself), and counts its fleet once this
                # stage's pre-warm is over.
                after = [waits]
                if stage < _stage_count(spec):
                    warm = prewarm(stage)
                    trials >> warm
                    after.append(warm)
            previous >> trials
            previous = after
            promotes.append(promoted)
        # start_run is the setup: the teardown runs however the stages end, even if a user marks
        # the run failed, and terminates every instance the run launched.
        done = teardown().as_teardown(setups=started)
        [*previous, *promotes] >> done
        # After every stage's promote too: a clear of the failed tasks re-runs the stage that failed
        # (and those after it), not the teardown, and the report must wait for them.
        [*promotes, done] >> report()
    return dag
