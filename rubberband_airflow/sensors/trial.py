"""Sensor for one trial of one stage: done (its metric is the XCom) or failed (the task fails)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue, conf
from airflow.sdk.bases.sensor import poke_mode_only
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import StartTriggerArgs

from rubberband_airflow.execution import backoff, replanning, runner
from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.hooks.backend import backend_of_run
from rubberband_airflow.hooks.storage import run_storage
from rubberband_airflow.triggers.trial import (
    LIVENESS_INTERVAL,
    SILENT_SECONDS,
    STORAGE_PATIENCE_SECONDS,
    Liveness,
    TrialResultTrigger,
    boot_limit,
    lost_result,
)


def config_summary(config: dict[str, Any], limit: int = 60) -> str:
    """A short label of a configuration for the task list, e.g. ``lr=0.012 width=64``."""
    parts = []
    for key in sorted(config):
        value = config[key]
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@poke_mode_only
class TrialResultSensor(BaseSensorOperator):
    """
    Wait for one trial's result of one stage in a tuning run's storage.

    Map it over the trials of a stage; each mapped instance is labelled with the trial id and a
    summary of its configuration, and returns ``{"trial", "stage", "metric"}``. A failed trial
    fails this task (without retries) with its reason. When the trial's instance is lost (the
    backend says it is gone, its agent is hung past a trial's limit, or its agent's heartbeat stops
    or never starts), the trials it held are placed again and resume from their last checkpoint
    (``runner.recover_trials``, once for all the sensors that see the loss), and the wait goes on;
    the trial fails only when it cannot be placed again, with the reason recorded in run storage.
    Without ``spec_path`` there is no backend to recover with, and a lost instance fails the trial.
    Deferred, the wait runs on the triggerer (``TrialResultTrigger``) and holds no worker slot.
    Otherwise the sensor pokes, in ``poke`` mode only: it tells a lost instance by how long the
    heartbeat has not changed, which a rescheduled sensor would forget between pokes.

    :param run_uri: the run's storage root, ``<storage>/<dag_id>/<run_id>`` (templated)
    :param trial: the trial id, e.g. ``trial-0003`` (templated)
    :param stage: the stage (from 1) whose result to wait for (templated)
    :param storage_conn_id: the Airflow connection run storage is reached through; None for
        fsspec's own credentials (local paths always use them) (templated)
    :param spec_path: the tuning spec, from which the run's backend is made to notice and recover
        a lost instance; None to go by heartbeats alone and fail the trial of a lost instance
    :param deferrable: wait on the triggerer instead of a worker; defaults to
        ``[operators] default_deferrable``
    :param poll_interval: seconds between reads of the result, on the triggerer or by each poke
        (the default ``poke_interval``)
    :param finish_on_triggerer: deferred, a trial that is done ends this task on the triggerer (its
        XCom set there) instead of resuming it on a worker; a failed or lost trial still resumes it
    :param start_from_trigger: the scheduler starts the wait on the triggerer, no worker runs
        ``execute`` (with ``start_trigger_args``, whose trigger kwargs the triggerer renders)
    :param start_trigger_args: the trigger to start from (a ``TrialResultTrigger``)
    """

    template_fields: Sequence[str] = ("run_uri", "trial", "stage", "storage_conn_id")
    ui_color = "#f0e4ff"

    def __init__(self, *, run_uri: str, trial: str, stage: int, storage_conn_id: str | None = None,
                 spec_path: str | None = None,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
                 poll_interval: float = 5.0, finish_on_triggerer: bool = False, start_from_trigger: bool = False,
                 start_trigger_args: StartTriggerArgs | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("map_index_template", "{{ rubberband_trial_label }}")
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        self.run_uri = run_uri
        self.trial = trial
        self.stage = stage
        self.storage_conn_id = storage_conn_id
        self.spec_path = spec_path
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.finish_on_triggerer = finish_on_triggerer
        self.start_from_trigger = start_from_trigger
        if start_trigger_args is not None:
            self.start_trigger_args = start_trigger_args
        self._liveness: Liveness | None = None
        self._liveness_checked = float("-inf")
        self._run_ids: tuple[str, str] | None = None  # (dag_id, run_id), from the task's context
        self._task_try: int | None = None  # the task's try number, from its context
        self._too_late = ""  # why a clear does not run the failed trial again, where it does not

    def _storage(self) -> RunStorage:
        return run_storage(self.run_uri, self.storage_conn_id)

    def _label(self, context: Context) -> None:
        try:
            config = self._storage().read_config(self.trial)
            context["rubberband_trial_label"] = f"{self.trial} {config_summary(config)}"  # type: ignore[typeddict-unknown-key]
        except OSError:  # not there, or storage failing: the label is the trial's id
            context["rubberband_trial_label"] = self.trial  # type: ignore[typeddict-unknown-key]

    def execute(self, context: Context) -> Any:
        self._label(context)
        self._remember_run(context)
        if not self.deferrable:
            result = self._start_patiently(self._storage(), context)
            return self._finish(result) if result is not None else super().execute(context)
        return self._start(context)

    def _start(self, context: Context) -> dict[str, Any] | None:
        """Start the deferred wait: the trial's result, or defer to the trigger."""
        storage = self._storage()
        result = self._start_patiently(storage, context)
        if result is not None:
            return self._finish(result)
        backoff.retry(lambda: self._defer(storage), "handing the wait to the triggerer", STORAGE_PATIENCE_SECONDS)
        return None

    def _start_patiently(self, storage: RunStorage, context: Context) -> dict[str, Any] | None:
        """``_begin`` through a storage error burst: the wait starts late, not failed (a failed wait's
        trial would be recorded as failed by promote, though it finished)."""
        return backoff.retry(lambda: self._begin(storage, context), "starting the wait", STORAGE_PATIENCE_SECONDS)

    def _begin(self, storage: RunStorage, context: Context) -> dict[str, Any] | None:
        """Run the trial again if the run was cleared since it failed; its result, if it has one."""
        self._rerun_if_cleared(storage, context)
        return storage.read_result(self.trial, int(self.stage))

    def _defer(self, storage: RunStorage) -> None:
        dag_id, run_id = self._run_ids or (None, None)
        self.defer(trigger=TrialResultTrigger(self.run_uri, self.trial, int(self.stage), self.poll_interval,
                                              boot_seconds=boot_limit(storage.read_json("plan.json")),
                                              storage_conn_id=self.storage_conn_id, spec_path=self.spec_path,
                                              dag_id=dag_id, run_id=run_id, finish_task=self.finish_on_triggerer),
                   method_name="execute_complete")

    def _rerun_if_cleared(self, storage: RunStorage, context: Context) -> None:
        """A failed trial whose wait runs again after a clear of the wait (it reported the failure in
        an earlier try of its task) is run again while its stage is not promoted: a new try, placed
        once per clear of the run for the stage's failed trials whose waits it reset
        (``runner.rerun_failed``), which this wait then waits for."""
        clear = getattr(context.get("dag_run"), "clear_number", None)
        if (clear is None or self._task_try is None
                or not runner.cleared_since_failure(storage, self.trial, int(self.stage), self._task_try)):
            return
        if storage.exists("stages", str(self.stage), "promoted.json"):
            self._too_late = (f"; the run was cleared, but stage {self.stage} was promoted without it, so a try "
                              "now could not take part in the later stages: clear the whole run (from start_run) "
                              "for a new attempt, which keeps what finished and runs this trial again")
            return
        backend = self._backend(storage)
        if backend is None:
            return
        plan = runner.RunPlan.from_json(replanning.current_plan(storage, int(self.stage)))
        record = runner.rerun_failed(storage, backend, plan, int(self.stage), int(clear), self._cleared_trials(context))
        self.log.warning("%s failed in stage %s; the run was cleared (clear %s): try %s of its stage runs %s",
                         self.trial, self.stage, clear, record["try"], ", ".join(record["trials"]))

    def _cleared_trials(self, context: Context) -> set[str] | None:
        """The trials of this wait's stage whose waits a clear reset (their tasks are not failed now,
        by map index over the stage's start's trials): the failed trials the clear is to run again.
        None where Airflow cannot say (every failed trial of the stage then)."""
        ti = context.get("ti")
        if ti is None or self._run_ids is None or "." not in str(getattr(ti, "task_id", "")):
            return None
        dag_id, run_id = self._run_ids
        try:
            trials = ti.xcom_pull(task_ids=ti.task_id.rsplit(".", 1)[0] + ".start")
            states = (ti.get_task_states(dag_id=dag_id, task_ids=[ti.task_id], run_ids=[run_id]) or {}).get(run_id)
        except Exception as e:  # noqa: BLE001 - without the answer, every failed trial runs again
            self.log.warning("could not tell which waits of stage %s were cleared (%s): every failed trial of "
                             "it runs again", self.stage, e)
            return None
        if not isinstance(trials, list) or not states:
            return None
        cleared = {t for k, t in enumerate(trials)
                   if states.get(f"{ti.task_id}_{k}") not in ("failed", "upstream_failed")} | {self.trial}
        self.log.info("the clear reset the waits of %s in stage %s", ", ".join(sorted(cleared)), self.stage)
        return cleared

    def _remember_run(self, context: Context) -> None:
        """The DAG and run ids, which make the run's backend, and the task's try (a task's context has them)."""
        if "dag" in context and "run_id" in context:
            self._run_ids = (context["dag"].dag_id, context["run_id"])
        self._task_try = getattr(context.get("ti"), "try_number", None)

    def _backend(self, storage: RunStorage) -> ComputeBackend | None:
        if self.spec_path is None or self._run_ids is None:
            return None
        return backend_of_run(self.spec_path, storage, *self._run_ids)

    def poke(self, context: Context) -> bool | PokeReturnValue:
        """The trial's result, or whether its instance is lost; a storage error is a poke without news."""
        try:
            return self._poke()
        except backoff.STORAGE_ERRORS as e:
            if not backoff.transient(e):
                raise
            self.log.warning("reading %s's result failed (%s); trying again at the next poke", self.trial, e)
            return False

    def _poke(self) -> bool | PokeReturnValue:
        storage = self._storage()
        result = storage.read_result(self.trial, int(self.stage))
        if result is not None:
            return PokeReturnValue(is_done=True, xcom_value=self._finish(result))
        if self._liveness is None:
            self._liveness = Liveness(storage, self.trial, int(self.stage), SILENT_SECONDS,
                                      boot_limit(storage.read_json("plan.json")), self._backend(storage))
        if time.monotonic() - self._liveness_checked >= LIVENESS_INTERVAL:
            self._liveness_checked = time.monotonic()
            reason = self._liveness.lost()
            if reason is not None:
                self.log.warning("%s of stage %s is lost: %s", self.trial, self.stage, reason)
                if not self._recover(storage, self._liveness.instance, reason):
                    return PokeReturnValue(is_done=True, xcom_value=self._record_lost(
                        storage, lost_result(int(self.stage), reason, self._liveness.instance)))
        self.log.debug("%s has no result for stage %s yet", self.trial, self.stage)
        return False

    def execute_complete(self, context: Context, event: dict[str, Any] | str) -> dict[str, Any] | None:
        """Resumes from the trigger: the trial's result; or its instance was lost, and the trial is
        placed again (the wait goes on) or, where it cannot be, failed; or it failed and the run was
        cleared since, and it runs again (the wait goes on) as a wait's ``execute`` would have had it."""
        self._label(context)
        self._remember_run(context)
        if not isinstance(event, dict):  # a task-end event that resumed the task after all (`airflow dags test`)
            result = self._storage().read_result(self.trial, int(self.stage))
            return self._finish(result or {"state": "failed", "error": f"the trigger ended the wait ({event}) "
                                                                          "but the trial has no result"})
        if event.get("lost"):
            storage = self._storage()
            if self._recover(storage, event.get("instance"), event["result"]["error"]):
                self._defer(storage)
                return None
            return self._record_lost(storage, event["result"])
        if event["result"].get("state") != "done":
            # A wait started on the triggerer (``start_from_trigger``) ran no ``execute``: after a clear,
            # its trigger found the failure the clear is to run again, which starts here.
            return self._start(context)
        return self._finish(event["result"])

    def _recover(self, storage: RunStorage, instance: str | None, reason: str) -> bool:
        """Have the lost instance's trials placed again; whether the wait goes on (this trial was
        placed again, or has a result by now)."""
        backend = self._backend(storage)
        if backend is None or instance is None:
            return False
        plan = replanning.current_plan(storage, int(self.stage))  # the stage's re-plan, if it has one
        record = runner.recover_trials(storage, backend, runner.RunPlan.from_json(plan), int(self.stage), instance,
                                       reason)
        moved = (record.get("moved") or {}).get(self.trial)
        self.log.warning("%s of stage %s: instance %s was lost (%s); %s", self.trial, self.stage, instance, reason,
                         f"placed again on {moved}" if moved else "not placed again")
        return moved is not None or storage.read_result(self.trial, int(self.stage)) is not None

    def _report_failure(self) -> None:
        """Note that this try of the task reported the trial's failure: a clear of the task runs it again."""
        if self._task_try is None:
            return
        try:
            backoff.retry(lambda: runner.report_failure(self._storage(), self.trial, int(self.stage), self._task_try),
                          "noting the failure", STORAGE_PATIENCE_SECONDS)
        except backoff.STORAGE_ERRORS as e:
            self.log.warning("could not note %s's failure (%s): a clear of this task will not run it again", self.trial,
                             e)

    def _record_lost(self, storage: RunStorage, result: dict[str, Any]) -> dict[str, Any]:
        """Records why the trial failed, unless its agent wrote a result after all, and finishes."""
        recorded = storage.read_result(self.trial, int(self.stage))
        if recorded is not None:
            return self._finish(recorded)
        if not storage.write_result(self.trial, int(self.stage), result):  # written once: the first stands
            result = storage.read_result(self.trial, int(self.stage)) or result
        return self._finish(result)

    def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
        if result.get("state") != "done":
            self._report_failure()
            raise AirflowFailException(f"{self.trial} failed in stage {self.stage}: {result.get('error')}"
                                       + self._too_late)
        self.log.info("%s finished stage %s: %s = %s", self.trial, self.stage, "metric", result.get("metric"))
        return {"trial": self.trial, "stage": int(self.stage), "metric": result.get("metric")}
