"""The run report: best configuration, predicted against actual JCT and cost, per-stage table, every trial."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rubberband_airflow.execution import observe, recovery, replanning, runner
from rubberband_airflow.execution.backends.base import billed_cost, entry_price
from rubberband_airflow.execution.results import Mode, best_trial, is_done
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import Billing, parse_problem
from rubberband_airflow.planning.simulator import Draws, simulate_outcome
from rubberband_airflow.predictions import replan_lines, replan_rows, stage_predictions

log = logging.getLogger(__name__)


def _stage_numbers(storage: RunStorage) -> list[int]:
    return sorted(int(s) for s in storage.listdir("stages") if s.isdigit() and storage.exists("stages", s, "end.json"))


def build_report(storage: RunStorage, dag_id: str) -> dict[str, Any]:
    """Everything a user checks after a run, from the run's files alone."""
    plan = storage.read_json("plan.json") or {}
    run = storage.read_json("run.json") or {}
    mode = Mode(run.get("mode", Mode.MAX))
    problem_data = plan.get("problem")
    stages = []
    previous_end = run.get("started")
    results_by_trial: dict[str, dict[str, Any]] = {}
    read: dict[int, dict[str, dict[str, Any] | None]] = {}
    for stage in _stage_numbers(storage):
        trials = storage.read_json("stages", str(stage), "trials.json")["trials"]
        found = read[stage] = storage.read_results(stage, trials)
        results = {t: r or {"state": "failed", "error": "no result"} for t, r in found.items()}
        for t, r in results.items():
            results_by_trial.setdefault(t, {})[str(stage)] = r
        done = {t: r for t, r in results.items() if is_done(r)}
        start = storage.read_json("stages", str(stage), "start.json")["time"]
        # The orchestrator's overhead (h of the planning model) runs from the last result of the stage
        # before to the first trial the agents start in this one: promotion, scaling and placement.
        spawned = [r.get("spawned", r.get("started")) for r in results.values()]
        first = min((float(t) for t in spawned if t is not None), default=start)
        # Less the time its start waited to be tried again (a retry, or a morning's clear of a start
        # that failed at night): the orchestrator's overhead, not a night's (None where unknown).
        wait = runner.start_retry_wait(storage, stage, first, previous_end) if previous_end else 0.0
        ends = [r["finished"] for r in results.values() if r.get("finished")]
        end = max(ends) if ends else storage.read_json("stages", str(stage), "end.json")["time"]
        executed = replanning.current_plan(storage, stage) or plan  # the stage's re-plan, if any
        alloc = executed["stages"][stage - 1] if stage <= len(executed.get("stages", [])) else {}
        stages.append({"stage": stage, "trials": len(trials), "done": len(done),
                       "failed": sorted(set(results) - set(done)),
                       "gpus_per_trial": alloc.get("gpus_per_trial"), "instances": alloc.get("instances"),
                       "epochs": alloc.get("epochs"), "market": alloc.get("market"),
                       "release": alloc.get("release"), "start": start, "end": end,
                       "overhead_seconds": max(0.0, first - previous_end - wait)
                       if previous_end and wait is not None else None,
                       "start_retry_wait_seconds": wait,
                       "seconds": end - start,
                       "best_metric": _best_metric(done, mode)})
        previous_end = end
    final = stages[-1] if stages else None
    planned = len(plan.get("stages") or [])
    best = None
    if final:
        last = {t: r[str(final["stage"])] for t, r in results_by_trial.items() if str(final["stage"]) in r}
        trial = best_trial(last, mode)
        if trial is not None:
            best = {"trial": trial, "metric": last[trial]["metric"], "config": storage.read_config(trial)}
    ledger = storage.ledger()
    actual_cost = None
    predicted_stage_ends = None
    prices: dict[str, float] = {}
    billing = Billing()
    if problem_data:
        problem = parse_problem(problem_data)
        prices, billing = {t.name: t.price_per_hour for t in problem.instance_types}, problem.billing
        actual_cost = billed_cost(ledger, prices, problem.billing) \
            + problem.data_cost()
        outcome = simulate_outcome(problem, parse_plan(plan, problem), Draws.for_problem(problem))
        predicted_stage_ends = outcome.stage_end.mean(axis=0).tolist()
    jct = (final["end"] - run["started"]) if final and run.get("started") else None
    records = [r for r in storage.read_json_many([("stages", str(s["stage"]), "replan.json") for s in stages])
               if isinstance(r, dict)]
    started = run.get("started")
    predictions = stage_predictions(plan, records, {s["stage"]: s["end"] - started for s in stages}) \
        if started else []
    stage1 = [r["1"]["metric"] for r in results_by_trial.values() if r.get("1", {}).get("state") == "done"]
    return {
        "dag_id": dag_id, "run": storage.uri, "metric": run.get("metric"), "mode": str(mode),
        "best": best,
        # Whether the plan's last stage ended: a run whose task failed mid-way ends with fewer.
        "stages_planned": planned, "complete": final is not None and final["stage"] == planned,
        "median_stage1_metric": float(np.median(stage1)) if stage1 else None,
        "instance_type": plan.get("instance_type"),
        "deadline_seconds": plan.get("deadline_seconds"),
        "jct_quantile": plan.get("jct_quantile"),
        "predicted": {"jct_seconds": (plan.get("predicted") or {}).get("jct_seconds"),
                      "cost_usd": (plan.get("predicted") or {}).get("cost_usd"),
                      "stage_end_seconds": predicted_stage_ends},
        "actual": {"jct_seconds": jct, "cost_usd": actual_cost,
                   "stage_end_seconds": [s["end"] - run["started"] for s in stages] if run.get("started") else None},
        "stage_overhead_seconds": [s["overhead_seconds"] for s in stages],
        "planned_stage_overhead": {"seconds": (problem_data or {}).get("workload", {}).get("stage_overhead_seconds"),
                                   "from": plan.get("stage_overhead_from")},
        "trial_overhead_seconds": _trial_overhead(storage, len(stages) + 1, read),
        "teardown_seconds": _teardown(ledger, final["end"]) if final and final["stage"] == planned else None,
        "planned_teardown": {"seconds": (problem_data or {}).get("workload", {}).get("teardown_seconds", 0.0),
                             "from": plan.get("teardown_from")},
        "planned_trial_overhead": {"seconds": (problem_data or {}).get("workload", {}).get("trial_overhead_seconds"),
                                   "from": plan.get("trial_overhead_from")},
        "replans": replan_rows(records, started),
        "stage_predictions": predictions,
        "baselines": plan.get("baselines"),
        "stages": stages,
        "trials": {t: {"config": storage.read_config(t), "results": r} for t, r in sorted(results_by_trial.items())},
        "recoveries": recoveries(storage, ledger, prices, billing),
        "retries": retries(storage),
        # What an earlier attempt of the run finished and this one kept (its cost is in that
        # attempt's ledger and report, not here), or why nothing was kept.
        "carried": storage.read_json("carried.json"),
        "spot_fallbacks": spot_fallbacks(ledger),
        "ledger": ledger,
    }


def _trial_overhead(storage: RunStorage, next_stage: int,
                    read: dict[int, dict[str, dict[str, Any] | None]]) -> float | None:
    """The time a trial held its slot beyond its epochs, as the re-plans measure it (``observe.observed``);
    None where it cannot be measured (the report is written whatever a run's files hold)."""
    try:
        return observe.observed(storage, next_stage, observe.StageResults(storage, read)).get("trial_overhead_seconds")
    except (KeyError, TypeError, ValueError) as e:
        log.warning("the run's trial overhead could not be measured: %r", e)
        return None


def recoveries(storage: RunStorage, ledger: list[dict[str, Any]], prices: dict[str, float],
               billing: Billing) -> list[dict[str, Any]]:
    """Each lost instance's recovery: the trials placed again, from which epoch, where, and what
    the loss cost over the plan: the lost instance's billed time after its last useful work, and
    the replacement's billed time (from the ledger)."""
    entries = {e["instance"]: e for e in ledger}
    out = []
    for stage in sorted(int(s) for s in storage.listdir("stages") if s.isdigit()):
        for rec in recovery.records(storage, stage):
            lost = entries.get(rec["lost"], {})
            useful, end = rec.get("last_useful"), lost.get("terminated")
            idle = max(0.0, end - useful) if useful is not None and end is not None else 0.0
            price = _price(lost, prices)
            replaced = [entries[i] for i in (rec.get("replacement") or {}).get("instances", []) if i in entries]
            billed = [(e, float(billed_seconds(e["running"], e["terminated"], billing.minimum_seconds,
                                               billing.increment_seconds)))
                      for e in replaced if e.get("running") is not None and e.get("terminated") is not None]
            extra_usd = price / 3600.0 * idle + sum(_price(e, prices) / 3600.0 * b for e, b in billed)
            out.append({"stage": stage, "lost": rec["lost"], "reason": rec.get("reason"), "trials": rec["trials"],
                        "replacement": [e["instance"] for e in replaced], "lost_idle_seconds": idle,
                        "replacement_seconds": sum(b for _, b in billed),
                        "extra_seconds": idle + sum(b for _, b in billed), "extra_usd": extra_usd})
    return out


def retries(storage: RunStorage) -> list[dict[str, Any]]:
    """Each later try of a stage's failed trials (after a clear of the run's failed tasks): the
    trials, why their previous try failed, and the instances launched for it (in the ledger)."""
    return [{"stage": r["stage"], "try": r["try"], "clear": r["clear"], "trials": r["trials"],
             "failed_before": r.get("failed_before") or {},
             "launched": (r.get("launched") or {}).get("instances", [])}
            for stage in sorted(int(s) for s in storage.listdir("stages") if s.isdigit())
            for r in storage.retries(stage)]


def _price(entry: dict[str, Any], prices: dict[str, float]) -> float:
    """An instance's hourly price (``entry_price``); 0 for one the report has no price for."""
    try:
        return entry_price(entry, prices)
    except KeyError:
        return 0.0


def spot_fallbacks(ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batches launched on demand because no subnet had spot capacity for them, with EC2's refusals."""
    out: dict[str, dict[str, Any]] = {}
    for e in ledger:
        if e.get("spot_refused"):
            out.setdefault(e["batch"], {"batch": e["batch"], "instances": [], "refused": e["spot_refused"]})
            out[e["batch"]]["instances"].append(e["instance"])
    return list(out.values())


def _best_metric(results: dict[str, dict[str, Any]], mode: Mode) -> float | None:
    trial = best_trial(results, mode)
    return None if trial is None else results[trial]["metric"]


def newest_reports(root: RunStorage) -> list[tuple[str, dict[str, Any]]]:
    """The reports of the runs in a tuning DAG's folder, the latest to end first, with each run's folder name."""
    names = root.subfolders()
    reports = root.read_json_many([(name, "report.json") for name in names])
    found = [(name, rep) for name, rep in zip(names, reports) if rep]
    return sorted(found, key=lambda nr: (report_end(nr[1]), nr[0]), reverse=True)


def report_end(rep: dict[str, Any]) -> float:
    """When a reported run ended: its last stage's end (0 if no stage ended)."""
    return max([s.get("end") or 0.0 for s in rep.get("stages") or []], default=0.0)


def _pct(actual: float | None, predicted: float | None) -> str:
    if actual is None or not predicted:
        return "n/a"
    return f"{(actual - predicted) / predicted * 100:+.1f}%"


def _teardown(ledger: list[dict[str, Any]], end: float) -> float | None:
    """Seconds from the last result (``end``) to the termination of the instances live then, on
    average: what the model's ``teardown_seconds`` stands for. None until they are terminated."""
    live = [e for e in ledger if e.get("running") is not None and float(e["running"]) <= end
            and (e.get("terminated") is None or float(e["terminated"]) >= end)]
    if not live or any(e.get("terminated") is None for e in live):
        return None
    return sum(float(e["terminated"]) - end for e in live) / len(live)


OVERHEAD_SOURCES = {"spec": "fixed by the spec", "past runs": "measured in the DAG's past runs",
                    "calibration": "measured by the calibration DAG", "profile": "the profile's estimate"}


def overhead_lines(rep: dict[str, Any]) -> list[str]:
    """The stage overhead the plan assumed, where it came from, and the run's own (stage 2 on); the
    same of the trial overhead."""
    planned = rep.get("planned_stage_overhead") or {}
    if planned.get("seconds") is None:
        return []
    source = OVERHEAD_SOURCES.get(planned.get("from") or "", "")
    line = f"Stage overhead: planned {planned['seconds']:.1f} s" + (f" ({source})" if source else "")
    measured = [o for o in (rep.get("stage_overhead_seconds") or [])[1:] if o is not None]
    if measured:
        line += f", this run {sum(measured) / len(measured):.1f} s"
    lines = [line]
    trial = rep.get("planned_trial_overhead") or {}
    if trial.get("seconds") is not None:
        source = OVERHEAD_SOURCES.get(trial.get("from") or "profile", "")
        line = f"Trial overhead: planned {trial['seconds']:.1f} s" + (f" ({source})" if source else "")
        if rep.get("trial_overhead_seconds") is not None:
            line += f", this run {rep['trial_overhead_seconds']:.1f} s"
        lines.append(line)
    down = rep.get("planned_teardown") or {}
    if down.get("seconds") is not None and (down.get("from") or rep.get("teardown_seconds") is not None):
        source = OVERHEAD_SOURCES.get(down.get("from") or "", "not measured yet")
        line = f"Teardown (last result to instances terminated): planned {down['seconds']:.1f} s ({source})"
        if rep.get("teardown_seconds") is not None:
            line += f", this run {rep['teardown_seconds']:.1f} s"
        lines.append(line)
    return lines


def late_start_lines(rep: dict[str, Any]) -> list[str]:
    """The stages whose start was tried again, and how long the stage waited for it."""
    lines = []
    for s in rep["stages"]:
        wait = s.get("start_retry_wait_seconds", 0.0)
        if wait is None:
            lines.append(f"Stage {s['stage']} started late: its start was tried again after a try that recorded "
                         "nothing (its host gone); its stage overhead is not measured")
        elif wait > 0:
            lines.append(f"Stage {s['stage']} started {wait:.1f} s late: its start was tried again; that wait is "
                         "left out of its measured stage overhead")
    return lines


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary_lines(rep: dict[str, Any]) -> list[str]:
    """The report as a few readable lines (the task log and `make demo` print these)."""
    lines = [f"RubberBand run {rep['run']}"]
    best = rep["best"]
    if best:
        cfg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in sorted(best["config"].items()))
        lines.append(f"Best: {best['trial']} {rep['metric']}={best['metric']:.4f} "
                     f"(median of stage 1: {rep['median_stage1_metric']:.4f}) with {cfg}")
    else:
        lines.append("Best: none (no trial finished)")
    if not rep.get("complete", True):
        ran = rep["stages"][-1]["stage"] if rep["stages"] else 0
        lines.append(f"INCOMPLETE: the run ended after stage {ran} of {rep['stages_planned']} (a task of the run "
                     f"failed): its best is of the stages that ran")
    pred, act = rep["predicted"], rep["actual"]
    pj = (pred["jct_seconds"] or {}).get("mean")
    pc = (pred["cost_usd"] or {}).get("mean")
    if act["jct_seconds"] is not None and pj is not None:
        pq, q = (pred["jct_seconds"] or {}).get("quantile"), rep.get("jct_quantile")
        at_q = f" (p{q * 100:g} {pq:.1f} s)" if pq is not None and q is not None else ""
        lines.append(f"JCT:  predicted {pj:.1f} s{at_q}, actual {act['jct_seconds']:.1f} s "
                     f"({_pct(act['jct_seconds'], pj)} of the mean); deadline {rep['deadline_seconds']:.0f} s")
    if act["cost_usd"] is not None and pc is not None:
        lines.append(f"Cost: predicted ${pc:.4f}, actual ${act['cost_usd']:.4f} ({_pct(act['cost_usd'], pc)}) "
                     f"on {rep['instance_type']}")
    lines.append(f"{'stage':>5} {'trials':>6} {'done':>4} {'inst':>4} {'g':>2} {'seconds':>8} {'overhead':>8} "
                 f"{'best':>8}")
    for s in rep["stages"]:
        lines.append(f"{s['stage']:>5} {s['trials']:>6} {s['trials'] - len(s['failed']):>4} {s['instances'] or '-':>4} "
                     f"{s['gpus_per_trial'] or '-':>2} {s['seconds']:>8.1f} {_seconds(s['overhead_seconds']):>8} "
                     f"{s['best_metric'] if s['best_metric'] is not None else float('nan'):>8.4f}")
    markets = [s.get("market") for s in rep["stages"]]
    if len(set(markets) - {None}) > 1:  # the plan bought in both markets
        lines.append("Markets: " + ", ".join(
            f"stage {s['stage']} {s.get('market') or '-'}" + (f" ({s['release']} released)" if s.get("release") else "")
            for s in rep["stages"]))
    lines += overhead_lines(rep)
    lines += late_start_lines(rep)
    lines += replan_lines(rep)
    for f in rep.get("spot_fallbacks") or []:
        lines.append(f"Spot refused for batch {f['batch']} ({f['refused']}): its {len(f['instances'])} instances "
                     "ran on demand")
    carried = rep.get("carried") or {}
    if carried.get("reason"):
        lines.append(f"Carried over: {carried['reason']}")
    elif carried.get("results"):
        kept = "; ".join(f"stage {s}: {len(ts)}" for s, ts in sorted(carried["results"].items()))
        lines.append(f"Carried over from attempt {carried['from_attempt']} (trained and billed there): "
                     f"the results of {kept} trials")
    for t in rep.get("retries") or []:
        lines.append(f"Try {t['try']} of stage {t['stage']} (after clear {t['clear']}): "
                     f"{', '.join(t['trials']) or 'no failed trial'} run again")
    for r in rep.get("recoveries") or []:
        moved = ", ".join(f"{t['trial']} from epoch {t['from_epoch']} -> {t['to'] or 'failed: ' + str(t['error'])}"
                          for t in r["trials"]) or "no unfinished trial"
        lines.append(f"Recovery in stage {r['stage']}: {r['reason']}; {moved}; extra {r['extra_seconds']:.1f} "
                     f"instance-seconds, ${r['extra_usd']:.4f}")
    return lines


def log_summary(rep: dict[str, Any]) -> None:
    for line in summary_lines(rep):
        log.info("%s", line)
