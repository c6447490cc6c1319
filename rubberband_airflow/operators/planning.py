"""The planning operator: its XCom is the plan, as plain JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from rubberband_airflow.hooks.storage import load_profile, storage_for
from rubberband_airflow.planning.errors import InfeasibleError, ProblemError
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.spec import load_spec
from rubberband_airflow.tuning import (
    CALIBRATION_DAG_ID,
    calibration_runs,
    dag_uri,
    like_this_run,
    past_runs,
    planning_problem,
    settings,
    stage_overhead,
    teardown,
    trial_overhead,
)


class RubberBandPlanOperator(BaseOperator):
    """
    Plan a tuning run: the cheapest allocation that meets the deadline at the planner's quantile.

    Builds the planning problem from the spec's profile, the spec, the run's params, and the
    stage and trial overheads measured in the DAG's last runs (of as many trials, where there are
    any), so a nightly DAG plans better each night; before its first run, the stage overhead the
    deployment's calibration DAG (``rubberband_calibration``) measured and the profile's trial
    overhead. Returns the plan as plain JSON with its predicted JCT and cost and the baselines. A bad input
    or an impossible deadline fails the task (no retry), the latter with the fastest achievable JCT.

    :param spec_path: path of the tuning spec (YAML) the run is planned for (templated)
    """

    template_fields: Sequence[str] = ("spec_path",)
    ui_color = "#e8f7e4"

    def __init__(self, *, spec_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_path = spec_path

    def execute(self, context: Context) -> dict[str, Any]:
        """Plans the run for the spec and ``context["params"]``; the plan is the XCom."""
        spec = load_spec(self.spec_path)
        try:
            # Not this run's earlier attempts: a cleared run plans as its first attempt did, and keeps
            # what that finished when nothing else changed (see the tuning DAG's start_run).
            history = like_this_run(past_runs(storage_for(spec, dag_uri(spec, context["dag"].dag_id)), limit=None,
                                              exclude_run_id=context["run_id"]),
                                    settings(spec, dict(context["params"])).sha.num_trials)
            calibration = calibration_runs(spec, context["dag"].dag_id, history,
                                           lambda: past_runs(storage_for(spec, dag_uri(spec, CALIBRATION_DAG_ID))))
            problem = planning_problem(spec, dict(context["params"]), load_profile(spec), history, calibration)
            out = plan_problem(parse_problem(problem))
        except ProblemError as e:
            raise AirflowFailException(f"bad tuning input: {e}") from None
        except InfeasibleError as e:
            raise AirflowFailException(str(e)) from None
        out["problem"] = problem
        out["history_runs"] = len(history)
        out["stage_overhead_from"] = stage_overhead(spec, history, calibration)[1]
        out["trial_overhead_from"] = trial_overhead(history)[1]
        out["teardown_from"] = teardown(history, calibration)[1]
        pred = out["predicted"]
        self.log.info("Plan: %s, stages %s; predicted JCT p%g %.0f s, mean cost $%.2f (deadline %.0f s)",
                      out["instance_type"], [(s["instances"], s["gpus_per_trial"]) for s in out["stages"]],
                      out["jct_quantile"] * 100, pred["jct_seconds"]["quantile"], pred["cost_usd"]["mean"],
                      out["deadline_seconds"])
        return out
