"""One case of the quota benchmark, run in its own process so that its peak memory is its own.

`python -m benchmarks.quota_case TRIALS INSTANCES [--exact]` prints one JSON line: plan time,
peak resident memory, the plan's cost and the search used. ``--exact`` forces the exact
programme (no work limit), for the comparison where it fits.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from rubberband_airflow.planning import planner
from rubberband_airflow.planning.budget import MemoryBudget
from rubberband_airflow.planning.planner import _search, _usable_types, plan_problem
from rubberband_airflow.planning.problem import Problem, parse_problem

LARGE = Path(__file__).resolve().parent / "problems" / "large-1024-trials.json"
# The deadline of each case: this factor times the fastest noise-free JCT of its trials at 16
# instances per type (the 1024-trial problem's 18,000 s is about 1.4 times that), so that a
# larger quota never makes a case harder.
DEADLINE_FACTOR = 1.5
DEADLINE_QUOTA = 16


def case_problem(trials: int, instances: int) -> Problem:
    """The 1024-trial benchmark problem's family: its 3 types and noise, other trials and quotas."""
    data = json.loads(LARGE.read_text())
    data["sha"]["num_trials"] = trials
    for t in data["instance_types"]:
        t["max_instances"] = DEADLINE_QUOTA
    problem = parse_problem(data)
    fastest = min(points[0].jct for t in _usable_types(problem)
                  if (points := _search(problem, t, MemoryBudget(), fastest_only=True)[0]))
    for t in data["instance_types"]:
        t["max_instances"] = instances
    return parse_problem({**data, "deadline_seconds": round(fastest * DEADLINE_FACTOR)})


def run(trials: int, instances: int, exact: bool) -> dict[str, Any]:
    problem = case_problem(trials, instances)
    if exact:
        planner.EXACT_WORK = float("inf")
    t0 = time.perf_counter()
    out = plan_problem(problem)
    seconds = time.perf_counter() - t0
    return {"trials": trials, "instances": instances, "deadline_seconds": problem.deadline_seconds,
            "seconds": round(seconds, 2), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "method": out["method"], "cost_usd": out["predicted"]["cost_usd"]["mean"],
            "plan": f"{out['instance_type']} " + " ".join(f"{s['instances']}x{s['gpus_per_trial']}g"
                                                           for s in out["stages"])}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]), "--exact" in sys.argv[3:])))
