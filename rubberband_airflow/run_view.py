"""The run view: one tuning run's fleet, cost, learning curves, leaderboard and cost-against-deadline
curve, planned against actual, as one self-contained HTML page.

Everything comes from the run's files (plan.json, run.json, the ledger, each trial's metrics.jsonl
and stage results, the stages' start and end files, the recovery records
``stages/<i>/recovery/<instance>.json`` and the re-plans ``stages/<i>/replan.json``, see
``execution/storage.py``); the planned side from the simulator
(docs/planning-model.md section 4) on the plan's own problem. Charts are Vega-Lite specs drawn by
the vendored Vega libraries (rubberband_airflow/static/vega), inlined so the page needs no network.
Every value from the run or a spec reaches the page escaped: HTML text through ``html.escape``,
chart data as JSON with ``<``, ``>`` and ``&`` written as unicode escapes.
"""

from __future__ import annotations

import functools
import html
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from rubberband_airflow.execution import recovery
from rubberband_airflow.execution.backends.base import entry_price
from rubberband_airflow.execution.results import Mode, is_done, ranked
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.errors import InfeasibleError, ProblemError
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import Problem, parse_problem
from rubberband_airflow.planning.simulator import Draws, Outcome, simulate_outcome
from rubberband_airflow.predictions import observed_text, stage_predictions

_LIBRARIES = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")
# Deadlines the cost-against-deadline curve re-plans the run's problem at, as fractions of its own.
_DEADLINE_FACTORS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0, 3.0)
_PHASES = ("pending", "booting", "ready")


@dataclass(frozen=True)
class RunFiles:
    """What the view reads of one run."""

    plan: dict[str, Any]
    run: dict[str, Any]
    ledger: list[dict[str, Any]]
    stages: list[dict[str, Any]]  # stage, start, end (None while running), trials
    trials: dict[str, dict[str, Any]]  # id -> config, metrics, results {stage: result}
    now: float
    recoveries: list[dict[str, Any]]  # the records of lost instances, oldest first
    replans: list[dict[str, Any]]  # stage, time, before and after (each a plan as plan.json holds it)
    stopped_after: int | None = None  # the last stage of a run its report says stopped before its last stage

    @property
    def started(self) -> float:
        return float(self.run.get("started") or self.now)

    @property
    def finished(self) -> bool:
        """Every planned stage ended, or one ended with no trial done, or the run stopped before
        its last stage (a task failed for good): the run ended there."""
        planned = len(self.plan.get("stages") or [])
        ended = [s for s in self.stages if s["end"] is not None]
        if (planned and len(ended) == planned) or self.stopped_after is not None:
            return True
        return any(not any(is_done(r) for r in self.stage_results(s["stage"]).values()) for s in ended)

    def stage_results(self, stage: int) -> dict[str, dict[str, Any] | None]:
        trials: list[str] = next((s["trials"] for s in self.stages if s["stage"] == stage), [])
        return {t: self.trials.get(t, {}).get("results", {}).get(stage) for t in trials}


def read_run(storage: RunStorage, now: float | None = None) -> RunFiles:
    """The run's files as they are now (a run in flight has stages without an end)."""
    stage_names = sorted(int(s) for s in storage.listdir("stages") if s.isdigit())
    stages = []
    for stage in stage_names:
        start, end, chosen = storage.read_json_many(
            [("stages", str(stage), "start.json"), ("stages", str(stage), "end.json"),
             ("stages", str(stage), "trials.json")])
        if start is None:
            continue
        stages.append({"stage": stage, "start": start["time"], "end": end["time"] if end else None,
                       "trials": list((chosen or {}).get("trials") or [])})
    trials: dict[str, dict[str, Any]] = {}
    for trial in storage.listdir("trials"):
        results = {s["stage"]: storage.read_result(trial, s["stage"]) for s in stages if trial in s["trials"]}
        trials[trial] = {"config": storage.read_json("trials", trial, "config.json") or {},
                         "metrics": storage.metrics(trial), "results": results}
    for s in stages:  # as the report measures it: an ended stage ends when its last trial finished
        finished = [r["finished"] for t in s["trials"] if (r := trials.get(t, {}).get("results", {}).get(s["stage"]))
                    and r.get("finished")]
        if s["end"] is not None and finished:
            s["end"] = max(finished)
    recoveries = [r for stage in stage_names for r in recovery.records(storage, stage)]
    replans = [{**r, "stage": stage} for stage, r in zip(stage_names, storage.read_json_many(
        [("stages", str(stage), "replan.json") for stage in stage_names])) if isinstance(r, dict)]
    return RunFiles(storage.read_json("plan.json") or {}, storage.read_json("run.json") or {}, storage.ledger(),
                    stages, trials, time.time() if now is None else now, recoveries, replans,
                    _stopped_after(storage, stages))


def _stopped_after(storage: RunStorage, stages: list[dict[str, Any]]) -> int | None:
    """The last stage of a run whose report says it stopped before its last stage, unless a stage
    started after that report (a clear of the failed tasks took the run on)."""
    report = storage.read_json("report.json")
    if not isinstance(report, dict) or report.get("complete", True):
        return None
    written = storage.written("report.json")
    if written is not None and any(s["start"] > written for s in stages):
        return None
    return max((int(s["stage"]) for s in report.get("stages") or []), default=0)


# --- the numbers behind each chart ---------------------------------------------------------------


def _cumulative_cost(running: np.ndarray, terminated: np.ndarray, price: float | np.ndarray, problem: Problem,
                     times: np.ndarray) -> list[float]:
    """The bill so far at each of ``times``: every instance billed from running to min(t, termination)
    at its hourly ``price`` (one for all, or one per instance)."""
    if running.size == 0:
        return [problem.data_cost()] * len(times)
    ends = np.minimum(terminated[None, :], times[:, None])
    seconds = billed_seconds(np.broadcast_to(running, ends.shape), ends, problem.billing.minimum_seconds,
                             problem.billing.increment_seconds)
    return ((np.asarray(price) / 3600.0 * seconds).sum(axis=1) + problem.data_cost()).tolist()


def _prices(ledger: list[dict[str, Any]], problem: Problem, plan: dict[str, Any]) -> np.ndarray:
    """Each running instance's hourly price: its ledger entry's (``entry_price``), else the plan's type's."""
    prices = {t.name: t.price_per_hour for t in problem.instance_types}
    default = problem.instance_type(plan["instance_type"]).price_per_hour
    out = []
    for e in ledger:
        if e.get("running") is not None:
            try:
                out.append(entry_price(e, prices))
            except KeyError:
                out.append(default)
    return np.array(out, dtype=float)


def _count_steps(starts: list[float], ends: list[float], series: str, until: float | None = None
                 ) -> list[dict[str, Any]]:
    """Instances billed over time as steps: the count after every start or end (and at ``until``, now)."""
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends])
    out, count = [{"t": 0.0, "instances": 0, "series": series}], 0
    for t, delta in events:
        count += delta
        out.append({"t": round(t, 3), "instances": count, "series": series})
    if until is not None:
        out.append({"t": round(until, 3), "instances": count, "series": series})
    return out


def _median_sample(outcome: Outcome) -> int:
    return int(np.argsort(outcome.jct, kind="stable")[len(outcome.jct) // 2])


def _planned(problem: Problem, plan: dict[str, Any]) -> dict[str, Any]:
    """The simulator's run of the plan: its median-JCT sample's instances and stage ends."""
    outcome = simulate_outcome(problem, parse_plan(plan, problem), Draws.for_problem(problem))
    k = _median_sample(outcome)
    itype = problem.instance_type(plan["instance_type"])
    h = problem.workload.stage_overhead_seconds
    stage_end = outcome.stage_end[k].tolist()
    stage_start = [h + (stage_end[i - 1] if i else 0.0) for i in range(len(stage_end))]
    lives = []
    for j, (run, end) in enumerate(zip(outcome.running[k].tolist(), outcome.terminated[k].tolist())):
        requested = max(s for s in stage_start if s <= run + 1e-9)
        lives += _phases(f"plan #{j + 1}", "planned", requested, run, run + itype.boot_seconds, end)
    return {"stage_start": stage_start, "stage_end": stage_end, "lives": lives,
            "running": outcome.running[k], "terminated": outcome.terminated[k],
            "price": itype.price_per_hour, "jct": float(outcome.jct[k])}


def _phases(instance: str, source: str, requested: float, running: float | None, ready: float | None,
            end: float) -> list[dict[str, Any]]:
    """An instance's life as bars: pending (requested to running), booting (to ready), ready (to the end)."""
    marks = [requested, running if running is not None else end, ready if ready is not None else end, end]
    marks = [min(m, end) for m in marks]
    return [{"instance": instance, "source": source, "phase": phase, "start": round(a, 3), "end": round(b, 3)}
            for phase, a, b in zip(_PHASES, marks, marks[1:]) if b > a]


def _actual_lives(files: RunFiles) -> list[dict[str, Any]]:
    t0, out = files.started, []
    for e in files.ledger:
        end = float(e["terminated"] if e.get("terminated") is not None else files.now) - t0
        rel = [None if e.get(k) is None else float(e[k]) - t0 for k in ("requested", "running", "ready")]
        out += _phases(str(e["instance"]), "actual", rel[0] if rel[0] is not None else end, rel[1], rel[2], end)
    return out


def _trial_rows(files: RunFiles, mode: Mode) -> list[dict[str, Any]]:
    """Each trial: the last stage it reached, its latest metric, its state and (if failed) why."""
    rows = []
    for trial, t in files.trials.items():
        reached = max(t["results"], default=1)
        result = t["results"].get(reached)
        state = "running" if result is None else ("done" if is_done(result) else "failed")
        metric = result.get("metric") if result and is_done(result) else None
        rows.append({"trial": trial, "stage": reached, "state": state, "metric": metric,
                     "reason": str(result.get("error") or "no finite metric") if state == "failed" else None,
                     "config": t["config"]})
    order = {t: i for i, t in enumerate(ranked({r["trial"]: {"state": "done", "metric": r["metric"]} for r in rows
                                                if r["metric"] is not None}, mode))}
    return sorted(rows, key=lambda r: (-r["stage"], order.get(r["trial"], len(order)), r["trial"]))


def _curves(files: RunFiles, metric: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_trial = {r["trial"]: r for r in rows}
    out = []
    for trial, t in files.trials.items():
        row = by_trial[trial]
        for m in t["metrics"]:
            value = m.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out.append({"trial": trial, "epoch": m.get("epoch"), "metric": value, "reached": row["stage"],
                            "state": row["state"], "reason": row["reason"] or ""})
    return out


@functools.lru_cache(maxsize=32)
def _cost_curve(problem_json: str) -> tuple[tuple[float, float, str], ...]:
    """The cheapest plan's predicted mean cost at deadlines around the problem's own (infeasible ones left out)."""
    data = json.loads(problem_json)
    out = []
    for f in _DEADLINE_FACTORS:
        try:
            planned = plan_problem(parse_problem({**data, "deadline_seconds": data["deadline_seconds"] * f}))
        except (InfeasibleError, ProblemError):
            continue
        shape = " ".join(f"{s['instances']}x{s['gpus_per_trial']}g" for s in planned["stages"])
        out.append((float(data["deadline_seconds"] * f), float(planned["predicted"]["cost_usd"]["mean"]), shape))
    return tuple(out)


def view_data(files: RunFiles) -> dict[str, Any]:
    """Every number the page shows, in the form its charts take."""
    plan, run = files.plan, files.run
    mode = Mode(run.get("mode", Mode.MAX))
    metric = str(run.get("metric") or "metric")
    problem = parse_problem(plan["problem"]) if plan.get("problem") else None
    planned = _planned(problem, plan) if problem else None
    t0 = files.started
    end = max([files.now - t0 if not files.finished else 0.0]
              + [(e.get("terminated") or files.now) - t0 for e in files.ledger]
              + [(s["end"] or files.now) - t0 for s in files.stages])
    lives = _actual_lives(files)
    actual_running = [e["running"] - t0 for e in files.ledger if e.get("running") is not None]
    actual_term = [(e.get("terminated") or files.now) - t0 for e in files.ledger if e.get("running") is not None]
    up = [e.get("terminated") is None for e in files.ledger if e.get("running") is not None]
    fleet = _count_steps(actual_running, [t for t, live in zip(actual_term, up) if not live], "actual",
                         files.now - t0 if any(up) else None)  # an instance still up is billed until now
    stages = [{"stage": s["stage"], "start": round(s["start"] - t0, 3),
               "end": None if s["end"] is None else round(s["end"] - t0, 3), "label": f"stage {s['stage']}"}
              for s in files.stages]
    deadline = float(plan.get("deadline_seconds") or (problem.deadline_seconds if problem else 0.0))
    horizon = max(end, deadline, planned["jct"] if planned else 0.0)
    cost: list[dict[str, Any]] = []
    final: dict[str, float | None] = {"actual": None, "planned": None}
    if planned and problem:
        fleet += _count_steps(planned["running"].tolist(), planned["terminated"].tolist(), "planned")
        lives = planned["lives"] + lives
        times = np.unique(np.concatenate([np.linspace(0.0, horizon, 200), planned["running"],
                                          planned["terminated"], np.array(actual_running + actual_term)]))
        planned_cost = _cumulative_cost(planned["running"], planned["terminated"], planned["price"], problem, times)
        actual_cost = _cumulative_cost(np.array(actual_running), np.array(actual_term),
                                       _prices(files.ledger, problem, plan), problem, times[times <= end + 1e-9])
        cost = [{"t": round(float(t), 3), "cost": c, "series": "planned"} for t, c in zip(times, planned_cost)] \
            + [{"t": round(float(t), 3), "cost": c, "series": "actual"} for t, c in zip(times, actual_cost)]
        final = {"actual": actual_cost[-1] if actual_cost else None, "planned": planned_cost[-1]}
    rows = _trial_rows(files, mode)
    baselines = plan.get("baselines") or {}
    curve = [{"deadline": d, "cost": c, "plan": shape} for d, c, shape in
             (_cost_curve(json.dumps(plan["problem"], sort_keys=True)) if problem else ())]
    return {
        "metric": metric, "mode": str(mode), "finished": files.finished, "stopped_after": files.stopped_after,
        "stages_planned": len(plan.get("stages") or []), "horizon": round(horizon, 3),
        "deadline": deadline, "instance_type": plan.get("instance_type"),
        "plan_stages": plan.get("stages") or [],
        "predicted": plan.get("predicted") or {},
        "actual": {"jct_seconds": _jct(files), "cost_usd": final["actual"]},
        "planned_stage_end": [round(x, 3) for x in planned["stage_end"]] if planned else [],
        "fleet": fleet, "lives": lives, "stages": stages, "cost": cost, "curves": _curves(files, metric, rows),
        "trials": rows, "cost_curve": curve, "points": _points(plan, deadline, _jct(files), final),
        "lower_bound": (baselines.get("lower_bound") or {}).get("cost_usd"),
        "baselines": {k: _baseline_cost(v) for k, v in baselines.items() if k != "lower_bound"},
        "ledger": [str(e["instance"]) for e in files.ledger],
        "events": _events(files),
        "stage_predictions": stage_predictions(
            plan, [r for r in files.replans if isinstance(r.get("state"), dict)],
            {s["stage"]: s["end"] - t0 for s in files.stages if s["end"] is not None}),
    }


def _predicted(plan: Any, figure: str) -> float | None:
    """A plan's predicted mean ``figure`` (``cost_usd`` or ``jct_seconds``), if it holds a number."""
    value = (((plan.get("predicted") if isinstance(plan, dict) else None) or {}).get(figure) or {}).get("mean")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _shape(plan: Any) -> str:
    """A plan's instances per stage: ``2 → 1 → 1``; with each stage's market where it buys in both
    (``2 spot → 1 on-demand, spot released``)."""
    stages = [s if isinstance(s, dict) else {} for s in (plan.get("stages") if isinstance(plan, dict) else None) or []]
    mixed = len({s.get("market") for s in stages} - {None}) > 1

    def one(s: dict[str, Any]) -> str:
        text = str(s.get("instances", "?"))
        if mixed and s.get("market"):
            text += f" {s['market']}" + (f", {s['release']} released" if s.get("release") else "")
        return text

    return " → ".join(one(s) for s in stages) or "?"


def _events(files: RunFiles) -> list[dict[str, Any]]:
    """The recoveries and re-plans of the run, oldest first, as marks on the fleet chart."""
    t0, out = files.started, []
    for r in files.recoveries:
        moved = "; ".join(f"{m.get('trial')} to {m.get('to') or 'none (failed)'} from epoch {m.get('from_epoch')}"
                          for m in r.get("trials") or [] if isinstance(m, dict))
        out.append({"t": r.get("time"), "kind": "recovery", "label": f"recovery of {r.get('lost')}",
                    "detail": f"{r.get('reason') or 'instance lost'}; {moved or 'it held no unfinished trial'}"})
    for r in files.replans:
        before, after = r.get("before"), r.get("after")
        costs = [_fmt(_predicted(p, "cost_usd"), "$", 4) for p in (before, after)]
        jcts = [_fmt(_predicted(p, "jct_seconds"), " s") for p in (before, after)]
        seen = f"observed {observed_text(r['observed'])}; " if isinstance(r.get("observed"), dict) else ""
        out.append({"t": r.get("time"), "kind": "re-plan", "label": f"re-plan before stage {r['stage']}",
                    "detail": f"{seen}instances per stage {_shape(before)} to {_shape(after)}; predicted cost "
                              f"{costs[0]} to {costs[1]}, JCT {jcts[0]} to {jcts[1]}"})
    timed = [{**e, "t": round(float(e["t"]) - t0, 3)} for e in out
             if isinstance(e["t"], (int, float)) and not isinstance(e["t"], bool) and math.isfinite(e["t"])]
    return sorted(timed, key=lambda e: (e["t"], e["kind"]))


def _jct(files: RunFiles) -> float | None:
    """The run's JCT, as the report measures it: from its start to its last stage's end (not rounded, so that
    the page shows the report's figure: 12.0495 s rounded twice would read 12.1 s where the report says 12.0 s)."""
    ends = [s["end"] for s in files.stages if s["end"] is not None]
    return max(ends) - files.started if files.finished and ends else None


def _baseline_cost(b: dict[str, Any]) -> float | None:
    return _predicted(b, "cost_usd") if b.get("feasible") else None


def _points(plan: dict[str, Any], deadline: float, jct: float | None,
            final: dict[str, float | None]) -> list[dict[str, Any]]:
    """This run's plan, the run itself and the static baselines on the cost-against-deadline chart."""
    pts = []
    pc = _predicted(plan, "cost_usd")
    if pc is not None:
        pts.append({"label": "this plan (predicted)", "seconds": deadline, "cost": pc})
    if jct is not None and final["actual"] is not None:
        pts.append({"label": "this run (actual JCT)", "seconds": jct, "cost": final["actual"]})
    names = {"static_allocation": "best static allocation", "static_cluster": "best static cluster"}
    for key, b in (plan.get("baselines") or {}).items():
        if key in names and (c := _baseline_cost(b)) is not None:
            pts.append({"label": names[key], "seconds": deadline, "cost": c})
    return pts


# --- the charts (Vega-Lite specs) ----------------------------------------------------------------

_MUTED = "#8a8f98"  # readable on the light and the dark theme
_SERIES = {"domain": ["planned", "actual"], "range": ["#8a8f98", "#1f77b4"]}
_PHASE_COLORS = {"domain": list(_PHASES), "range": ["#f2b447", "#9b6bcc", "#2ca02c"]}
_EVENT_COLORS = {"recovery": "#e0559b", "re-plan": "#17a2b8"}
# Learning curves by the stage reached: mid-luminance colors, readable on the light and the dark theme.
_STAGE_COLORS = ["#8a8f98", "#4c9be8", "#2ca02c", "#e8833a", "#d6409f", "#9467bd"]


def _x(horizon: float, title: str = "seconds since the run started") -> dict[str, Any]:
    return {"field": "t", "type": "quantitative", "title": title, "scale": {"domain": [0, horizon * 1.02]}}


def _barriers(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage starts (solid), planned stage ends (dashed grey) and the deadline (red)."""
    starts = {"data": {"values": data["stages"]}, "mark": {"type": "rule", "color": _MUTED, "strokeWidth": 1.5},
              "encoding": {"x": {"field": "start", "type": "quantitative"},
                           "tooltip": [{"field": "label"}, {"field": "start", "title": "started (s)"},
                                       {"field": "end", "title": "ended (s)"}]}}
    labels = {"data": {"values": data["stages"]},
              "mark": {"type": "text", "align": "left", "dx": 3, "dy": -4, "baseline": "top", "fontSize": 10,
                       "color": _MUTED},
              "encoding": {"x": {"field": "start", "type": "quantitative"}, "y": {"value": 0},
                           "text": {"field": "label"}}}
    planned = {"data": {"values": [{"t": t, "label": f"planned end of stage {i + 1}"}
                                   for i, t in enumerate(data["planned_stage_end"])]},
               "mark": {"type": "rule", "strokeDash": [2, 3], "color": "#8a8f98"},
               "encoding": {"x": {"field": "t", "type": "quantitative"}, "tooltip": [{"field": "label"},
                                                                                  {"field": "t"}]}}
    deadline = {"data": {"values": [{"t": data["deadline"], "label": "deadline"}]},
                "mark": {"type": "rule", "color": "#d62728", "strokeWidth": 2},
                "encoding": {"x": {"field": "t", "type": "quantitative"},
                             "tooltip": [{"field": "label"}, {"field": "t", "title": "seconds"}]}}
    return [starts, labels, planned, deadline]


def _event_marks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A recovery or re-plan: a dotted line at its time, labelled below the stage labels (none without any)."""
    layers: list[dict[str, Any]] = []
    for kind, color in _EVENT_COLORS.items():
        events = [e for e in data["events"] if e["kind"] == kind]
        if not events:
            continue
        tooltip = [{"field": "label"}, {"field": "detail"}, {"field": "t", "title": "seconds"}]
        x = {"field": "t", "type": "quantitative"}
        layers += [{"data": {"values": events}, "encoding": {"x": x, "tooltip": tooltip},
                    "mark": {"type": "rule", "color": color, "strokeWidth": 2, "strokeDash": [1, 3]}},
                   {"data": {"values": events}, "encoding": {"x": x, "text": {"value": kind}, "tooltip": tooltip},
                    "mark": {"type": "text", "color": color, "align": "left", "dx": 3, "baseline": "top",
                             "fontSize": 10, "y": 10}}]
    return layers


def fleet_spec(data: dict[str, Any]) -> dict[str, Any]:
    steps = {"data": {"values": data["fleet"]},
             "mark": {"type": "line", "interpolate": "step-after", "strokeWidth": 2},
             "encoding": {"x": _x(data["horizon"], ""),
                          "y": {"field": "instances", "type": "quantitative", "title": "instances billed",
                                "axis": {"tickMinStep": 1}},
                          "color": {"field": "series", "type": "nominal", "scale": _SERIES, "title": None},
                          "strokeDash": {"field": "series", "type": "nominal", "title": None,
                                         "scale": {"domain": ["planned", "actual"], "range": [[5, 3], [1, 0]]}}}}
    bars = {"data": {"values": data["lives"]}, "mark": {"type": "bar", "height": {"band": 0.7}},
            "encoding": {"x": {"field": "start", "type": "quantitative", "title": "seconds since the run started",
                               "scale": {"domain": [0, data["horizon"] * 1.02]}},
                         "x2": {"field": "end"},
                         "y": {"field": "instance", "type": "nominal", "title": None, "sort": None},
                         "color": {"field": "phase", "type": "nominal", "scale": _PHASE_COLORS, "title": "instance"},
                         "opacity": {"field": "source", "type": "ordinal", "legend": None,
                                     "scale": {"domain": ["planned", "actual"], "range": [0.35, 1.0]}},
                         "tooltip": [{"field": "instance"}, {"field": "source"}, {"field": "phase"},
                                     {"field": "start", "title": "from (s)"}, {"field": "end", "title": "to (s)"}]}}
    width = "container"
    return {"vconcat": [{"layer": [steps, *_barriers(data), *_event_marks(data)], "width": width, "height": 140},
                        {"layer": [bars, *_barriers(data), *_event_marks(data)], "width": width}],
            "resolve": {"scale": {"color": "independent", "opacity": "independent", "strokeDash": "independent"}}}


def cost_spec(data: dict[str, Any]) -> dict[str, Any]:
    lines = {"data": {"values": data["cost"]}, "mark": {"type": "line", "strokeWidth": 2},
             "encoding": {"x": _x(data["horizon"]),
                          "y": {"field": "cost", "type": "quantitative", "title": "cost so far ($)"},
                          "color": {"field": "series", "type": "nominal", "scale": _SERIES, "title": None},
                          "strokeDash": {"field": "series", "type": "nominal", "title": None,
                                         "scale": {"domain": ["planned", "actual"], "range": [[5, 3], [1, 0]]}},
                          "tooltip": [{"field": "series"}, {"field": "t", "title": "seconds"},
                                      {"field": "cost", "format": "$.4f"}]}}
    so_far = max((c["t"] for c in data["cost"] if c["series"] == "actual"), default=data["horizon"])
    finals = [{"label": f"{k if k == 'planned' or data['finished'] else 'so far'} ${v:.4f}", "series": k, "cost": v,
               "t": data["horizon"] if k == "planned" else (data["actual"]["jct_seconds"] or so_far)}
              for k, v in (("planned", _predicted(data, "cost_usd")),
                           ("actual", data["actual"]["cost_usd"])) if v is not None]
    text = {"data": {"values": finals}, "mark": {"type": "text", "align": "right", "dy": -8, "fontWeight": "bold"},
            "encoding": {"x": {"field": "t", "type": "quantitative"}, "y": {"field": "cost", "type": "quantitative"},
                         "text": {"field": "label"},
                         "color": {"field": "series", "type": "nominal", "scale": _SERIES, "legend": None}}}
    best_static = min((c for c in data["baselines"].values() if c is not None), default=None)
    static = [] if best_static is None else [{"cost": best_static, "label": f"best static plan ${best_static:.4f}"}]
    rules = {"data": {"values": static}, "mark": {"type": "rule", "strokeDash": [6, 4], "color": "#ff7f0e"},
             "encoding": {"y": {"field": "cost", "type": "quantitative"}, "tooltip": [{"field": "label"}]}}
    rule_text = {"data": {"values": static}, "mark": {"type": "text", "align": "left", "dy": -6, "color": "#ff7f0e"},
                 "encoding": {"y": {"field": "cost", "type": "quantitative"}, "x": {"value": 4},
                              "text": {"field": "label"}}}
    return {"layer": [lines, rules, rule_text, text, *_barriers(data)[2:]], "width": "container", "height": 220}


def curves_spec(data: dict[str, Any]) -> dict[str, Any]:
    emphasis = {"field": "reached", "type": "ordinal", "title": "stage reached"}
    lines = {"mark": {"type": "line", "point": {"size": 18}},
             "encoding": {"x": {"field": "epoch", "type": "quantitative", "title": "epoch", "axis": {"tickMinStep": 1}},
                          "y": {"field": "metric", "type": "quantitative", "title": data["metric"],
                                "scale": {"zero": False}},
                          "detail": {"field": "trial"}, "color": {**emphasis, "scale": {"range": _STAGE_COLORS}},
                          "strokeWidth": {**emphasis, "legend": None, "scale": {"range": [1, 3.5]}},
                          "opacity": {**emphasis, "legend": None, "scale": {"range": [0.6, 1.0]}},
                          "tooltip": [{"field": "trial"}, {"field": "epoch"}, {"field": "metric", "format": ".4f"},
                                      {"field": "reached", "title": "stage reached"}, {"field": "state"}]}}
    failed = {"transform": [{"filter": "datum.state === 'failed'"},
                            {"joinaggregate": [{"op": "max", "field": "epoch", "as": "last"}], "groupby": ["trial"]},
                            {"filter": "datum.epoch === datum.last"}],
              "mark": {"type": "point", "shape": "cross", "size": 120, "color": "#d62728", "filled": True},
              "encoding": {"x": {"field": "epoch", "type": "quantitative"},
                           "y": {"field": "metric", "type": "quantitative"},
                           "tooltip": [{"field": "trial"}, {"field": "reason", "title": "failed"}]}}
    shown = any(c["state"] == "failed" for c in data["curves"])  # an empty layer has no extent (a console warning)
    return {"data": {"values": data["curves"]}, "layer": [lines, failed] if shown else [lines], "width": "container",
            "height": 260}


def deadline_spec(data: dict[str, Any]) -> dict[str, Any]:
    curve = {"data": {"values": data["cost_curve"]},
             "mark": {"type": "line", "point": True, "interpolate": "step-after"},
             "encoding": {"x": {"field": "deadline", "type": "quantitative", "title": "deadline (s)"},
                          "y": {"field": "cost", "type": "quantitative", "title": "predicted cost ($)"},
                          "tooltip": [{"field": "deadline", "title": "deadline (s)", "format": ".0f"},
                                      {"field": "cost", "format": "$.4f"},
                                      {"field": "plan", "title": "instances x GPUs per stage"}]}}
    points = {"data": {"values": data["points"]}, "mark": {"type": "point", "filled": True, "size": 110},
              "encoding": {"x": {"field": "seconds", "type": "quantitative"},
                           "y": {"field": "cost", "type": "quantitative"},
                           "shape": {"field": "label", "type": "nominal", "title": None},
                           "color": {"field": "label", "type": "nominal", "title": None},
                           "tooltip": [{"field": "label"}, {"field": "seconds", "format": ".1f"},
                                       {"field": "cost", "format": "$.4f"}]}}
    layers = [curve, points]
    if data["lower_bound"] is not None:
        layers.append({"data": {"values": [{"cost": data["lower_bound"], "label": "lower bound"}]},
                       "mark": {"type": "rule", "strokeDash": [2, 2], "color": "#8a8f98"},
                       "encoding": {"y": {"field": "cost", "type": "quantitative"},
                                    "tooltip": [{"field": "label"}, {"field": "cost", "format": "$.4f"}]}})
    return {"layer": layers, "width": "container", "height": 240}


def chart_specs(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each chart of the page by its element id."""
    specs = {"fleet": fleet_spec(data), "cost": cost_spec(data), "curves": curves_spec(data),
             "deadline": deadline_spec(data)}
    for spec in specs.values():
        spec["$schema"] = "https://vega.github.io/schema/vega-lite/v6.json"
        spec["autosize"] = {"type": "fit-x", "contains": "padding"}
    return specs


# --- the page ------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity made null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no ``</script>``, ``<!--`` or entity can close or bend it."""
    return json.dumps(_finite(value), sort_keys=True, allow_nan=False).replace("<", "\\u003c") \
        .replace(">", "\\u003e").replace("&", "\\u0026")


@functools.cache
def _libraries() -> str:
    folder = resources.files("rubberband_airflow") / "static" / "vega"
    return "\n".join(f"<script>{(folder / name).read_text(encoding='utf-8')}</script>" for name in _LIBRARIES)


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"${value:.{digits}f}" if unit == "$" else f"{value:.{digits}f}{unit}"


def _figures(data: dict[str, Any]) -> list[tuple[str, str]]:
    pj, pc = _predicted(data, "jct_seconds"), _predicted(data, "cost_usd")
    best_static = min((c for c in data["baselines"].values() if c is not None), default=None)
    saving = None if best_static is None or pc is None or best_static <= 0 else (best_static - pc) / best_static * 100
    shape = _shape({"stages": data["plan_stages"]})
    done = [r for r in data["trials"] if r["state"] == "done"]
    return [("deadline", _fmt(data["deadline"], " s", 0)),
            ("JCT predicted / actual", f"{_fmt(pj, ' s')} / {_fmt(data['actual']['jct_seconds'], ' s')}"),
            (f"cost predicted / {'actual' if data['finished'] else 'so far'}",
             f"{_fmt(pc, '$', 4)} / {_fmt(data['actual']['cost_usd'], '$', 4)}"),
            ("best static plan", _fmt(best_static, "$", 4)),
            ("saving against it", _fmt(saving, "%")),
            ("instances per stage", f"{shape} ({data['instance_type']})"),
            ("trials done", f"{len(done)} / {len(data['trials'])}")]


def _prediction_table(data: dict[str, Any]) -> str:
    """Each ended stage's end, predicted by the plan it executed against actual."""
    rows = "".join(f"<tr><td>{p['stage']}</td><td>{html.escape(str(p['plan']))}</td>"
                   f"<td class='num'>{_fmt(p['predicted_end_seconds'], ' s')}</td>"
                   f"<td class='num'>{_fmt(p['actual_end_seconds'], ' s')}</td>"
                   f"<td class='num'>{_fmt(p['error_seconds'], ' s')}</td></tr>"
                   for p in data.get("stage_predictions") or [])
    return ("<h2>Stage ends, predicted against actual</h2><table id='predictions'><thead><tr><th>stage</th>"
            "<th>executed plan</th><th>predicted end</th><th>actual end</th><th>error</th></tr></thead><tbody>"
            + rows + "</tbody></table>") if rows else ""


def _leaderboard(data: dict[str, Any]) -> str:
    rows = []
    for i, r in enumerate(data["trials"], start=1):
        config = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(r["config"].items()))
        metric = "–" if r["metric"] is None else f"{r['metric']:.4f}"
        state = r["state"] if r["reason"] is None else f"failed: {r['reason']}"
        rows.append(f"<tr class='{html.escape(r['state'])}'><td>{i}</td><td>{html.escape(r['trial'])}</td>"
                    f"<td class='num'>{html.escape(metric)}</td><td class='num'>{r['stage']}</td>"
                    f"<td>{html.escape(state)}</td><td class='cfg'>{html.escape(config)}</td></tr>")
    return ("<table id='leaderboard'><thead><tr><th>#</th><th>trial</th><th>" + html.escape(data["metric"])
            + "</th><th>stage</th><th>state</th><th>configuration</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


_CSS = """
:root{color-scheme:light;--fg:#1d2430;--muted:#5b6472;--bg:#ffffff;--card:#f4f6f8;--line:#d8dde3;--bad:#c62828}
:root[data-theme=dark]{color-scheme:dark;--fg:#e6e9ee;--muted:#a3abb7;--bg:#15191f;--card:#1f252d;--line:#333b46;
--bad:#ef6b6b}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:1.2rem 2rem;color:var(--fg);
background:var(--bg)}
h1{font-size:1.35rem;margin:0 0 .2rem}h2{font-size:1.05rem;margin:1.6rem 0 .3rem}
.sub{color:var(--muted);margin:0 0 1rem;font-size:.9rem;word-break:break-all}
.figures{display:flex;flex-wrap:wrap;gap:.6rem}.fig{background:var(--card);border-radius:6px;padding:.45rem .8rem}
.fig b{display:block;font-size:1.05rem}.fig span{color:var(--muted);font-size:.78rem}
.chart{width:100%;min-height:120px}.note{color:var(--muted);font-size:.82rem;margin:.2rem 0}
table{border-collapse:collapse;font-size:.85rem;width:100%}td,th{padding:3px 8px;border-bottom:1px solid var(--line);
text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.cfg{font-family:ui-monospace,monospace;font-size:.78rem;word-break:break-all}tr.failed td{color:var(--bad)}
a{color:inherit}
"""

# The page takes the color mode of the Airflow UI it is shown in. That UI (3.3, next-themes) marks
# its mode as the class ``light`` or ``dark`` of its <html>, which the tab (a same-origin iframe) reads;
# opened on its own on the api-server the page reads the UI's stored choice (localStorage ``theme``:
# light, dark or system), and elsewhere (a report file) it follows the browser's preference. A change
# of any of them (the class, the stored choice, the preference) redraws the page in the new mode.
_THEME = """
(function(){
  function mode(){
    try {
      var c = window.parent !== window && window.parent.document.documentElement.classList;
      if (c && (c.contains('dark') || c.contains('light'))) { return c.contains('dark') ? 'dark' : 'light'; }
    } catch (e) {}
    try {
      var t = window.localStorage.getItem('theme');
      if (t === 'dark' || t === 'light') { return t; }
    } catch (e) {}
    return window.matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
  }
  function update(){
    var m = mode();
    if (document.documentElement.getAttribute('data-theme') !== m) {
      document.documentElement.setAttribute('data-theme', m);
      document.dispatchEvent(new CustomEvent('rb-theme', {detail: m}));
    }
  }
  update();
  try {
    if (window.parent !== window) {
      new MutationObserver(update).observe(window.parent.document.documentElement, {attributes: true});
    }
  } catch (e) {}
  window.addEventListener('storage', update);
  window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', update);
})();
"""

_BOOT = """
(function(){
  var data = JSON.parse(document.getElementById('rb-specs').textContent);
  var refresh = document.querySelector('meta[name=rb-refresh]');
  var drawn = 0;
  function draw(mode){
    var opts = {renderer: 'svg', actions: false, config: {background: null}};
    if (mode === 'dark') { opts.theme = 'dark'; }
    Object.keys(data).forEach(function(id){
      var el = document.getElementById('chart-' + id);
      el.removeAttribute('data-rendered');
      vegaEmbed(el, data[id], opts).then(function(){
        el.setAttribute('data-rendered', mode);
        // A run in flight: read it again some seconds after its charts are drawn (never before).
        if (++drawn === Object.keys(data).length && refresh) {
          setTimeout(function(){ window.location.reload(); }, 1000 * Number(refresh.content));
        }
      }).catch(function(err){ console.error('chart ' + id + ': ' + err); });
    });
  }
  draw(document.documentElement.getAttribute('data-theme'));
  document.addEventListener('rb-theme', function(e){ draw(e.detail); });
})();
"""


def page_html(title: str, body: str, head: str = "") -> str:
    """A page in the run view's look, in the light or dark theme of the Airflow UI it is shown in
    (``title`` is text, ``body`` and ``head`` markup)."""
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>{head}"
            f"<title>{html.escape(title)} · RubberBand</title><style>{_CSS}</style><script>{_THEME}</script>"
            f"</head><body>{body}</body></html>")


def render_html(data: dict[str, Any], title: str, description: str = "", refresh_seconds: int | None = None) -> str:
    """The self-contained page of a run's view data."""
    figures = "".join(f"<div class='fig'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>"
                      for k, v in _figures(data))
    failed = [r for r in data["trials"] if r["state"] == "failed"]
    failures = "".join(f"<li>{html.escape(r['trial'])} in stage {r['stage']}: {html.escape(r['reason'] or '')}</li>"
                       for r in failed)
    events = "".join(f"<li>{e['t']:.1f} s: {html.escape(e['label'])}: {html.escape(e['detail'])}</li>"
                     for e in data["events"])
    state = ("finished" if data["finished"] else "in flight") if data.get("stopped_after") is None else \
        f"incomplete: the run stopped after stage {data['stopped_after']} of {data['stages_planned']}"
    refresh = f"<meta name='rb-refresh' content='{int(refresh_seconds)}'>" if refresh_seconds and \
        not data["finished"] else ""
    return page_html(title, (
        f"<h1>{html.escape(title)} <small class='note'>({state})</small></h1>"
        f"<p class='sub'>{html.escape(description)}</p>"
        f"<div class='figures'>{figures}</div>"
        "<h2>Fleet over time, planned against actual</h2><p class='note'>Instances billed per moment (steps) and each "
        "instance's life: pending from its request, booting once running, ready once its agent reported; vertical "
        "lines mark stage starts, dashed ones the planned stage ends, the red one the deadline, dotted ones "
        "recoveries of lost instances and re-plans. The planned instances (faded bars, plan #k) are the "
        "simulator's median run of the plan.</p>"
        "<div id='chart-fleet' class='chart'></div>"
        + (f"<ul id='events' class='note'>{events}</ul>" if events else "") + _prediction_table(data)
        + "<h2>Cost over time, planned against actual</h2><div id='chart-cost' class='chart'></div>"
        f"<h2>Learning curves ({html.escape(data['metric'])} by epoch)</h2><p class='note'>Thicker, brighter lines "
        "reached later stages; a red cross marks a trial that failed.</p><div id='chart-curves' class='chart'></div>"
        + (f"<ul id='failures' class='note'>{failures}</ul>" if failures else "")
        + "<h2>Leaderboard</h2>" + _leaderboard(data)
        + "<h2>Cost against deadline</h2><p class='note'>The cheapest plan's predicted cost had the deadline been "
        "tighter or looser (the run's problem re-planned), with this plan, this run and the best static plans at "
        "this deadline.</p><div id='chart-deadline' class='chart'></div>"
        f"<script type='application/json' id='rb-specs'>{_script_json(chart_specs(data))}</script>"
        f"{_libraries()}<script>{_BOOT}</script>"), refresh)


def run_view_html(storage: RunStorage, title: str, description: str = "", refresh_seconds: int | None = None,
                  now: float | None = None) -> str:
    """The run view of the run stored at ``storage``."""
    return render_html(view_data(read_run(storage, now)), title, description, refresh_seconds)
