"""Re-planning a run before a stage: the plan each stage executes, and the re-plan from the run's
state (docs/planning-model.md section 7; docs/airflow.md, "Re-planning").

A run's first plan is ``plan.json``. The re-plan before stage i writes the whole run's revised
plan to ``stages/<i>/plan.json`` once (a retried re-plan returns the plan written first, so the
stage's tasks never mix two plans; only a later try of the stage's start, long after, before the
stage launched or placed anything, plans it again: ``replan_stage``) and its record to
``stages/<i>/replan.json``: ``time``, ``start_try``, ``state`` (what it started from),
``observed``, ``before`` and ``after`` (each a plan as ``plan.json`` holds it), ``infeasible``
when no plan met the deadline and the fastest was taken, and ``replaced`` when it replaced an
earlier re-plan. The revised plan keeps the stages already run, holds the re-planned ones from stage i on,
its ``predicted`` counts JCT from the run's start and cost with what was spent, and its
``problem`` is the first plan's corrected by what the run observed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from rubberband_airflow.execution import observe, runner
from rubberband_airflow.execution.backends.base import ComputeBackend, Market, offer
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import InfeasibleError, ProblemError
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import InstanceType, Problem, parse_problem
from rubberband_airflow.planning.replan import corrected, parse_state, remaining_problem, replan
from rubberband_airflow.planning.simulator import simulate

log = logging.getLogger(__name__)

# After EC2 refused a spot plan's launch spot capacity, its re-plans go on demand; the first re-plan
# this long after the latest refusal plans on spot again (EC2's capacity is short for minutes, often).
SPOT_RETRY_SECONDS = 600.0
# A retried start re-plans again where its stage's re-plan is older than this and nothing acted on it.
STALE_SECONDS = 60.0


def current_plan(storage: RunStorage, stage: int) -> dict[str, Any] | None:
    """The plan stage ``stage`` executes: the latest re-plan at or before it, else ``plan.json``."""
    revised = storage.read_json_many([("stages", str(k), "plan.json") for k in range(stage, 1, -1)])
    return next((p for p in revised if p is not None), None) or storage.read_json("plan.json")


def revise(storage: RunStorage, before: dict[str, Any], stage: int, now: float | None = None) -> \
        tuple[dict[str, Any], dict[str, Any]]:
    """The run's plan re-planned before ``stage`` from its state, and the record of the re-plan.
    The re-plan keeps the run's instance type and, where the first plan's problem offers it in
    both markets, chooses each stage's market again, the live instances of both its fleet, each
    as the offer it was bought in. A spot plan whose launches EC2 refused spot capacity
    (``spot_fallback``) buys on demand only (its live spot instances kept or released) until
    ``SPOT_RETRY_SECONDS`` after the latest refusal, then spot again (and on demand where the spec
    offers it). Each re-planned stage names its market. When no plan meets the deadline, the
    fastest is taken."""
    now = time.time() if now is None else now
    first = storage.read_json("plan.json") or before
    problem = parse_problem(first["problem"])
    name = before["instance_type"]
    itype = _instance_type(problem, before, name)
    market: Market | None = None
    types = (itype,) + tuple(t for t in [problem.twin(itype)] if t is not None)
    # The refusals of the run's own spot offer (a plan re-planned after a fallback is on demand; a
    # plan on the on-demand offer may buy some stages spot).
    spot = first["instance_type"]
    twin = problem.twin(_instance_type(problem, first, spot))
    if offer(spot)[1] != Market.SPOT and twin is not None and twin.market == Market.SPOT:
        spot = twin.name
    fallback = spot_fallback(storage.ledger(), spot)
    buy = None
    if fallback is not None:
        # The spot offer and the on-demand one, each live instance as the offer it was bought in.
        spot_type = _instance_type(problem, first, spot)
        on_demand = _on_demand(problem, spot_type, offer(spot)[0], fallback["price_per_hour"])
        if now - fallback["time"] < SPOT_RETRY_SECONDS:  # on demand; spot instances kept or released
            name, itype, market, buy = on_demand.name, on_demand, Market.ON_DEMAND, [str(Market.ON_DEMAND)]
        else:  # spot again; on demand too only where the spec offers it
            name, itype = spot, spot_type
            if on_demand.name not in {t.name for t in problem.instance_types}:
                buy = [str(Market.SPOT)]
        types = (itype, spot_type if itype is on_demand else on_demand)
    problem = replace(problem, instance_types=types)
    state = observe.run_state(storage, problem, name, stage, now)
    if buy is not None:
        state["buy_markets"] = buy
    state["observed"]["launch_seconds"] = {k: v for k, v in state["observed"]["launch_seconds"].items()
                                           if k in {t.name for t in types}}
    parsed = parse_state(state, problem)
    record: dict[str, Any] = {"time": now, "stage": stage, "state": state, "observed": state["observed"]}
    if fallback is not None:
        record["spot_fallback" if market == Market.ON_DEMAND else "spot_retry"] = fallback
    try:
        out = replan(problem, parsed)
    except InfeasibleError as e:
        rest = remaining_problem(problem, parsed)
        s = simulate(rest, parse_plan(e.fastest_plan, rest))
        out = {"first_stage": stage, **e.fastest_plan, "deadline_seconds": problem.deadline_seconds,
               "jct_quantile": problem.planner.jct_quantile,
               "predicted": {"jct_seconds": s["jct_seconds"], "cost_usd": s["cost_usd"]}}
        record["infeasible"] = str(e)
    # Said outright: a stage that names no market launches in the backend's, spot for a spot spec.
    own = market or problem.instance_type(out["instance_type"]).market
    stages = [{**s, "market": str(market or s.get("market") or own)} for s in out["stages"]]
    fixed = corrected(problem, parsed.observed)
    after = {k: v for k, v in out.items() if k not in ("first_stage", "stages")}
    after.update(stages=list(before["stages"][:stage - 1]) + stages,
                 problem={**first["problem"], **_workload(fixed.to_dict(), first["problem"])},
                 gpus_per_instance=before.get("gpus_per_instance", itype.gpus),
                 replanned_before_stage=stage)
    record.update(before=before, after=after)
    return after, record


def spot_fallback(ledger: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """Where a plan on the spot offer ``name`` had a batch launched on demand because EC2 refused
    spot capacity: the batches, EC2's latest refusal and when it was asked (``time``), and the
    on-demand price the ledger records (None where it records none); None for an on-demand plan
    or a run that got its spot capacity."""
    instance_type, market = offer(name)
    fell = [e for e in ledger if e.get("spot_refused") and e.get("type") == instance_type]
    if market != Market.SPOT or not fell:
        return None
    prices = [e["price_per_hour"] for e in fell if e.get("price_per_hour") is not None]
    return {"batches": sorted({e["batch"] for e in fell}), "refused": fell[-1]["spot_refused"],
            "time": max(float(e.get("requested") or 0.0) for e in fell),
            "price_per_hour": prices[-1] if prices else None}


def _instance_type(problem: Problem, plan: dict[str, Any], name: str) -> InstanceType:
    """The plan's instance type: the first plan's problem's, else (an offer a re-plan added) its own."""
    try:
        return problem.instance_type(name)
    except ProblemError:
        return parse_problem(plan["problem"]).instance_type(name)


def _on_demand(problem: Problem, spot: InstanceType, name: str, price: float | None) -> InstanceType:
    """The on-demand offer of a spot type: the problem's where it has one, else the spot type's
    figures on demand at ``price`` (the ledger's; the spot price where it records none)."""
    try:
        return problem.instance_type(name)
    except ProblemError:
        return replace(spot, name=name, market=str(Market.ON_DEMAND), interruptions_per_hour=0.0,
                       price_per_hour=spot.price_per_hour if price is None else float(price))


def _workload(fixed: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """The corrected workload and instance type latencies, in the first plan's problem (with the
    re-plan's instance type added where that problem has none of its name: an on-demand fallback)."""
    types = {t["name"]: t for t in fixed["instance_types"]}
    names = {t.get("name") for t in original["instance_types"]}
    return {"workload": {**original.get("workload", {}), **fixed["workload"]},
            "instance_types": [{**t, **{k: types[t["name"]][k] for k in ("pending_seconds", "boot_seconds")}}
                               if t.get("name") in types else t for t in original["instance_types"]]
            + [t for n, t in types.items() if n not in names]}


def replan_before(storage: RunStorage, backend: ComputeBackend, before: dict[str, Any], stage: int,
                  continued: int = 0, start_try: int | None = None) -> dict[str, Any]:
    """Re-plan before ``stage`` (``replan_stage``) once the instances that are gone or whose agent
    quit are retired, so that the fleet it counts is the one the stage will have."""
    runner.reconcile(backend)
    after = replan_stage(storage, before, stage, continued, start_try=start_try)
    log.info("re-plan before stage %d: instances per stage %s -> %s; predicted JCT %.1f s -> %.1f s, "
             "cost $%.4f -> $%.4f", stage, [s["instances"] for s in before["stages"]],
             [s["instances"] for s in after["stages"]], before["predicted"]["jct_seconds"]["mean"],
             after["predicted"]["jct_seconds"]["mean"], before["predicted"]["cost_usd"]["mean"],
             after["predicted"]["cost_usd"]["mean"])
    return after


def replan_stage(storage: RunStorage, before: dict[str, Any], stage: int, continued: int = 0,
                 now: float | None = None, start_try: int | None = None) -> dict[str, Any]:
    """Re-plan before ``stage`` once: write the revised plan (create-only), then its record; a
    second call (a retry) returns the plan written first, and writes its record where the try
    that wrote the plan failed before the record (what was observed, with the plan in force).
    Another try of the stage's start (``start_try``, Airflow's; the record keeps the one that
    re-planned) more than ``STALE_SECONDS`` after the re-plan (by its record), before the stage
    launched or placed anything on it (no launch decided in this continuation of the run,
    ``continued``, no trial placed), re-plans again from the run's state now: a start that failed
    at night and is cleared in the morning plans the stage from the morning (the record keeps the
    time, allocation and prediction of the plan it replaced). Instances the plan before had the
    stage release or drop are gone from the state, which the new plan starts from."""
    now = time.time() if now is None else now
    written = storage.read_json("stages", str(stage), "plan.json")
    if written is not None:
        first = storage.read_json("stages", str(stage), "replan.json")
        if first is not None and start_try is not None and first.get("start_try") != start_try \
                and now - float(first["time"]) > STALE_SECONDS \
                and not runner.recorded_launches(storage, stage, continued) \
                and not storage.exists("stages", str(stage), "placement.json"):
            try:
                after, record = revise(storage, before, stage, now)
            except ProblemError as e:  # the state no longer plans: the stage runs the plan written
                log.warning("stage %d keeps its re-plan: planning again failed: %s", stage, e)
                return dict(written)
            record.update(start_try=start_try, replaced={"time": first["time"], "predicted": written.get("predicted"),
                                                         "instances": [s["instances"] for s in written["stages"]]})
            storage.write_json(after, "stages", str(stage), "plan.json")  # the stage ran nothing on the one replaced
            storage.write_json(record, "stages", str(stage), "replan.json")
            log.warning("stage %d starts %.0f s after its re-plan, which it had not acted on: re-planned again",
                        stage, now - float(first["time"]))
            return after
        if not storage.exists("stages", str(stage), "replan.json"):
            try:
                _, record = revise(storage, before, stage)
            except ProblemError as e:  # the state no longer plans: the record says what it can
                record = {"time": time.time(), "stage": stage, "before": before,
                          "note": f"recorded by a retry, which could not observe the run again: {e}"}
            storage.create_json({**record, "after": written}, "stages", str(stage), "replan.json")
        return dict(written)
    after, record = revise(storage, before, stage, now)
    record["start_try"] = start_try
    if not storage.create_json(after, "stages", str(stage), "plan.json"):  # another try's plan stands, with its record
        return dict(storage.read_json("stages", str(stage), "plan.json"))
    storage.write_json(record, "stages", str(stage), "replan.json")
    return after
