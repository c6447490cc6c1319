"""Sensor for one trial of one stage: done (its metric is the XCom) or failed (the task fails)."""

from __future__ import annotations

from typing import Any, Sequence

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.hooks.storage import run_storage
from rubberband_airflow.triggers.trial import TrialResultTrigger, boot_limit


def config_summary(config: dict[str, Any], limit: int = 60) -> str:
    """A short label of a configuration for the task list, e.g. ``lr=0.012 width=64``."""
    parts = []
    for key in sorted(config):
        value = config[key]
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TrialResultSensor(BaseSensorOperator):
    """Waits for a trial's result in run storage, deferring to the triggerer so no worker slot is held.

    Map it over the trials of a stage; each mapped instance is labelled with the trial id and a
    summary of its configuration. A failed trial fails this task (without retries) with its reason;
    so does a trial whose instance is lost (its agent's heartbeat stops), which is recorded as
    failed in run storage.
    """

    template_fields: Sequence[str] = ("run_uri", "trial", "stage")
    ui_color = "#f0e4ff"

    def __init__(self, *, run_uri: str, trial: str, stage: int, storage_conn_id: str | None = None,
                 deferrable: bool = True, poll_interval: float = 5.0, **kwargs: Any) -> None:
        kwargs.setdefault("map_index_template", "{{ rubberband_trial_label }}")
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        self.run_uri = run_uri
        self.trial = trial
        self.stage = stage
        self.storage_conn_id = storage_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval

    def _storage(self) -> RunStorage:
        return run_storage(self.run_uri, self.storage_conn_id)

    def _label(self, context: Context) -> None:
        try:
            config = self._storage().read_config(self.trial)
            context["rubberband_trial_label"] = f"{self.trial} {config_summary(config)}"  # type: ignore[typeddict-unknown-key]
        except FileNotFoundError:
            context["rubberband_trial_label"] = self.trial  # type: ignore[typeddict-unknown-key]

    def execute(self, context: Context) -> Any:
        self._label(context)
        result = self._storage().read_result(self.trial, int(self.stage))
        if result is not None:
            return self._finish(result)
        if not self.deferrable:
            return super().execute(context)
        boot_seconds = boot_limit(self._storage().read_json("plan.json"))
        self.defer(trigger=TrialResultTrigger(self.run_uri, self.trial, int(self.stage), self.poll_interval,
                                              boot_seconds=boot_seconds, storage_conn_id=self.storage_conn_id),
                   method_name="execute_complete")

    def poke(self, context: Context) -> bool | PokeReturnValue:
        result = self._storage().read_result(self.trial, int(self.stage))
        if result is None:
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._finish(result))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        self._label(context)
        if event.get("lost"):  # record why, unless the agent wrote a result after all
            storage = self._storage()
            recorded = storage.read_result(self.trial, int(self.stage))
            if recorded is not None:
                return self._finish(recorded)
            storage.write_result(self.trial, int(self.stage), event["result"])
        return self._finish(event["result"])

    def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
        if result.get("state") != "done":
            raise AirflowFailException(f"{self.trial} failed in stage {self.stage}: {result.get('error')}")
        self.log.info("%s finished stage %s: %s = %s", self.trial, self.stage, "metric", result.get("metric"))
        return {"trial": self.trial, "stage": int(self.stage), "metric": result.get("metric")}
