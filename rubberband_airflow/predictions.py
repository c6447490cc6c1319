"""A run's re-plans and its prediction error per stage, for the report and the run view.

Each re-plan (``stages/<i>/replan.json``, see ``execution/replanning.py``) in short: when, what was
observed, instances per stage and predicted JCT and cost before and after. Each stage's predicted
end is that of the plan the stage executed (the first plan, or the latest re-plan at or before
it), from the simulator on that plan's problem (a re-plan's: the remaining stages from the run's
state); its error is the actual end less the predicted one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.replan import parse_state, remaining_problem
from rubberband_airflow.planning.simulator import Draws, simulate_outcome


def _mean(plan: Any, figure: str) -> float | None:
    value = ((plan or {}).get("predicted") or {}).get(figure, {}).get("mean") if isinstance(plan, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _summary(plan: Any) -> dict[str, Any]:
    stages = (plan or {}).get("stages") if isinstance(plan, dict) else None
    return {"instances": [s.get("instances") for s in stages or [] if isinstance(s, dict)],
            "jct_seconds": _mean(plan, "jct_seconds"), "cost_usd": _mean(plan, "cost_usd")}


def replan_rows(records: list[dict[str, Any]], started: float | None) -> list[dict[str, Any]]:
    """Each re-plan of the run, oldest first: stage, seconds from the run's start, observed, before, after."""
    out = []
    for r in sorted(records, key=lambda r: r.get("stage") or 0):
        t = r.get("time")
        retry = r.get("spot_retry")
        if isinstance(retry, dict):  # how long before the re-plan EC2 last refused spot capacity
            since = t - retry["time"] if isinstance(t, (int, float)) and isinstance(retry.get("time"), (int, float)) \
                else None
            retry = {"batches": retry.get("batches") or [], "refused_seconds_before": since}
        out.append({"stage": r.get("stage"), "seconds": t - started if isinstance(t, (int, float)) and started
                    else None, "observed": r.get("observed") or {}, "infeasible": r.get("infeasible"),
                    "before": _summary(r.get("before")), "after": _summary(r.get("after")),
                    "spot_fallback": r.get("spot_fallback"), "spot_retry": retry,
                    # A re-plan made again by a late retry of the stage's start: how long after the one it replaced.
                    "replaced_seconds_before": t - r["replaced"]["time"] if isinstance(r.get("replaced"), dict)
                    and isinstance(t, (int, float)) else None})
    return out


def _first_ends(plan: dict[str, Any]) -> list[float]:
    problem = parse_problem(plan["problem"])
    return simulate_outcome(problem, parse_plan(plan, problem), Draws.for_problem(problem)).stage_end.mean(
        axis=0).tolist()


def _replan_ends(first: dict[str, Any], record: dict[str, Any]) -> list[float]:
    """The mean predicted ends of the re-planned stages (from the re-plan's stage on)."""
    after, stage = record["after"], int(record["stage"])
    problem = parse_problem(first["problem"])
    revised = parse_problem(after["problem"])  # an on-demand fallback's offer is only in the re-plan's problem
    known = {t.name for t in problem.instance_types}
    offers = [revised.instance_type(after["instance_type"])]
    offers += [t for t in [revised.twin(offers[0])] if t is not None]  # the re-plan's family, as it planned
    problem = replace(problem, instance_types=tuple(problem.instance_type(t.name) if t.name in known else t
                                                    for t in offers))
    rest = remaining_problem(problem, parse_state(record["state"], problem))
    plan = parse_plan({"instance_type": after["instance_type"], "stages": after["stages"][stage - 1:]}, rest)
    return simulate_outcome(rest, plan, Draws.for_problem(rest)).stage_end.mean(axis=0).tolist()


def stage_predictions(plan: dict[str, Any], records: list[dict[str, Any]],
                      actual_ends: dict[int, float]) -> list[dict[str, Any]]:
    """Per stage that ended (``actual_ends``: seconds from the run's start): the plan it executed, its
    predicted and actual end, and the error (actual less predicted; positive: later than predicted)."""
    if not plan.get("problem"):
        return []
    try:
        predicted = {i + 1: e for i, e in enumerate(_first_ends(plan))}
        source = {i: "first plan" for i in predicted}
        for r in sorted(records, key=lambda r: r.get("stage") or 0):
            if r.get("state") is None:  # recorded by a retry that could not observe the run: no prediction
                continue
            j = int(r["stage"])
            for k, e in enumerate(_replan_ends(plan, r)):
                predicted[j + k], source[j + k] = e, f"re-plan before stage {j}"
    except (ProblemError, KeyError, TypeError, ValueError):
        return []  # a run written by another version: no prediction to compare with
    out = []
    for stage, end in sorted(actual_ends.items()):
        p = predicted.get(stage)
        out.append({"stage": stage, "plan": source.get(stage), "predicted_end_seconds": p,
                    "actual_end_seconds": end, "error_seconds": None if p is None else end - p,
                    "error_pct": None if not p else (end - p) / p * 100})
    return out


def observed_text(observed: dict[str, Any]) -> str:
    """What a re-plan observed, in a few words."""
    parts = [f"epoch {s:.2f} s on {g} GPU" for g, s in (observed.get("epoch_seconds") or {}).items()]
    for key, name in (("trial_overhead_seconds", "trial overhead"), ("stage_overhead_seconds", "stage overhead")):
        if observed.get(key) is not None:
            parts.append(f"{name} {observed[key]:.1f} s")
    parts += [f"launch of {t} {s:.1f} s" for t, s in (observed.get("launch_seconds") or {}).items()]
    return ", ".join(parts) or "nothing yet"


def replan_lines(rep: dict[str, Any]) -> list[str]:
    """Each re-plan (when, observed, instances, predicted JCT and cost before and after) and the
    prediction error of each stage."""
    lines = []
    for r in rep.get("replans") or []:
        b, a = r["before"], r["after"]
        when = f" at {r['seconds']:.1f} s" if r.get("seconds") is not None else ""
        lines.append(f"Re-plan before stage {r['stage']}{when}: observed {observed_text(r['observed'])}; instances "
                     f"{b['instances']} -> {a['instances']}, predicted JCT {_num(b['jct_seconds'], ' s')} -> "
                     f"{_num(a['jct_seconds'], ' s')}, cost {_num(b['cost_usd'], '$')} -> {_num(a['cost_usd'], '$')}"
                     + (" (no plan met the deadline: the fastest)" if r.get("infeasible") else "")
                     + (f"; on demand from here: EC2 had no spot capacity for {', '.join(f['batches'])}"
                        if (f := r.get("spot_fallback")) else "")
                     + (f"; back on spot: EC2 last refused spot capacity "
                        f"{_num(back['refused_seconds_before'], ' s')} before ({', '.join(back['batches'])})"
                        if (back := r.get("spot_retry")) else "")
                     + (f"; made again by a retry of the stage's start {_num(late, ' s')} after the re-plan before it"
                        if (late := r.get("replaced_seconds_before")) is not None else ""))
    for p in rep.get("stage_predictions") or []:
        lines.append(f"Stage {p['stage']} ended at {p['actual_end_seconds']:.1f} s, predicted "
                     f"{_num(p['predicted_end_seconds'], ' s')} by the {p['plan']} "
                     f"(error {_num(p['error_seconds'], ' s', signed=True)})")
    return lines


def _num(value: float | None, unit: str, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if unit == "$":
        return f"${value:.4f}"
    return f"{value:+.1f}{unit}" if signed else f"{value:.1f}{unit}"
