"""For `make demo`: the deadline at which the digits DAG's cheapest plan is elastic, and that plan.

Plans the DAG's own problem (its spec, the measured profile, the stage overhead of its past runs,
as the DAG's planning task does) at shrinking deadlines, from the cheapest plan's own JCT down,
and keeps the loosest deadline whose plan uses at least two fleet sizes across stages and saves
against the best static plan. Prints that plan against the baselines and writes it as JSON.
"""

from __future__ import annotations

import json
import sys

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import InfeasibleError
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.report import plan_table
from rubberband_airflow.spec import load_spec
from rubberband_airflow.tuning import dag_uri, past_runs, planning_problem


def saving(plan: dict) -> float:
    """The plan's saving (percent) against the cheapest static plan that meets the same deadline."""
    static = [b["predicted"]["cost_usd"]["mean"] for k, b in plan["baselines"].items()
              if k != "lower_bound" and b["feasible"]]
    best = min(static, default=float("inf"))
    return (best - plan["predicted"]["cost_usd"]["mean"]) / best * 100


def elastic_plan(problem: dict) -> dict:
    loose = plan_problem(parse_problem(problem))
    top = loose["predicted"]["jct_seconds"]["quantile"]
    for step in range(1, 40):
        try:
            plan = plan_problem(parse_problem({**problem, "deadline_seconds": round(top * (1 - 0.02 * step))}))
        except InfeasibleError:
            break
        if len({s["instances"] for s in plan["stages"]}) > 1 and saving(plan) > 0:
            return plan
    raise SystemExit("no deadline makes this profile's cheapest plan elastic: see docs/profiling.md")


def main(spec_path: str, profile_path: str, out: str) -> None:
    spec = load_spec(spec_path)
    with open(profile_path) as f:
        profile = json.load(f)
    history = past_runs(RunStorage(dag_uri(spec)))
    plan = elastic_plan(planning_problem(spec, {}, profile, history))
    print(plan_table(plan))
    print(f"\nFleet per stage: {' -> '.join(str(s['instances']) for s in plan['stages'])} instances; "
          f"{saving(plan):.1f}% cheaper than the best static plan at this deadline.")
    with open(out, "w") as f:
        json.dump(plan, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
