"""Re-planning and pre-warming benchmarks (docs/planning-model.md section 7 and section 4, rule 2).

A run is executed in a simulated "true" world whose epoch times deviate from the profile by a
factor; it is re-planned after every stage from its state (elapsed time, live fleet, spending,
the epoch times it measured). Writes benchmarks/results/replan.json and a section of
docs/benchmarks.md. Run with `make bench`.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.doc_sections import write_section
from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.errors import InfeasibleError
from rubberband_airflow.planning.plan import Plan, parse_plan
from rubberband_airflow.planning.planner import Evaluator, _prewarm, plan_problem
from rubberband_airflow.planning.problem import Problem, parse_problem
from rubberband_airflow.planning.replan import Observed, RunState, remaining_problem, replan
from rubberband_airflow.planning.simulator import Draws, Fleet, bill, run_stage, simulate
from rubberband_airflow.planning.start import LiveInstance, Start

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "rubberband_airflow" / "examples"
RESULTS = ROOT / "benchmarks" / "results" / "replan.json"
LARGE = ROOT / "benchmarks" / "problems" / "large-1024-trials.json"
DEVIATIONS = [0.7, 0.85, 1.0, 1.2, 1.5]
RUNS = 40


def scaled(data: dict, factor: float) -> dict:
    """The problem whose epoch times are ``factor`` times the profile's."""
    out = copy.deepcopy(data)
    out["workload"]["epoch_seconds"] = {g: s * factor for g, s in data["workload"]["epoch_seconds"].items()}
    return out


def _plan_or_fastest(problem: Problem, state: RunState | None) -> Plan:
    """The planner's plan (a re-plan with a state), or its fastest plan where none is on time."""
    target = remaining_problem(problem, state) if state is not None else problem
    try:
        out = replan(problem, state) if state is not None else plan_problem(problem)
    except InfeasibleError as err:
        out = err.fastest_plan
    return parse_plan(out, target)


def execute(profile: Problem, truth: Problem, run: int, replanning: bool, first: Plan) -> tuple[float, float]:
    """(JCT, cost) of one run in the true world: the plan ``first``, re-planned after each stage."""
    plan, state = first, None
    done = 0
    while True:
        start = state.start if state is not None else None
        world = replace(truth, sha=replace(truth.sha, done=done), start=start)
        itype = world.instance_type(plan.instance_type)
        draws = Draws.for_problem(replace(world, planner=replace(world.planner, seed=1000 + 97 * run + done)),
                                  samples=1)
        fleet = run_stage(world, itype, Fleet.initial(world, itype, 1), 0, plan.stages[0], draws)
        if done + 1 == truth.num_stages:
            outcome = bill(world, itype, fleet)
            return float(outcome.jct[0]), float(outcome.cost[0])
        b = world.billing
        spent = world.fixed_cost(itype) + sum(
            itype.price_per_hour / 3600 * float(billed_seconds(fleet.running[k][0], end[0], b.minimum_seconds,
                                                               b.increment_seconds))
            for k, end in enumerate(fleet.terminated) if end is not None)
        if done >= 1:
            spent += b.data_price_per_gb * truth.workload.checkpoint_gb * truth.sha.trials(done + 1)
        live = tuple(LiveInstance(itype.name, float(fleet.running[k][0]), float(fleet.live_ready[0, m]))
                     for m, k in enumerate(fleet.live))
        done += 1
        # What the run measured: the epoch time of the GPU count it used (its mean, noise aside).
        g = plan.stages[0].gpus_per_trial
        measured = {**(state.observed.epoch_seconds if state is not None else {}), g: truth.workload.epoch_seconds[g]}
        state = RunState(done + 1, Start(float(fleet.end[0]), spent, live), Observed(measured))
        plan = _plan_or_fastest(profile, state) if replanning else Plan(plan.instance_type, plan.stages[1:])


def bench_deviations(name: str, data: dict, deadline: float) -> list[dict[str, Any]]:
    profile = parse_problem({**data, "deadline_seconds": deadline})
    one_shot = _plan_or_fastest(profile, None)
    robust_problem = parse_problem({**scaled(data, max(DEVIATIONS)), "deadline_seconds": deadline})
    robust = _plan_or_fastest(robust_problem, None)
    rows = []
    for f in DEVIATIONS:
        truth = parse_problem({**scaled(data, f), "deadline_seconds": deadline})
        oracle = _plan_or_fastest(truth, None)
        row: dict[str, Any] = {"problem": name, "deadline": deadline, "deviation": f}
        for label, plan, replanning in (("one_shot", one_shot, False), ("robust", robust, False),
                                        ("oracle", oracle, False), ("replan", one_shot, True)):
            results = np.array([execute(profile, truth, r, replanning, plan) for r in range(RUNS)])
            row[label] = {"hit_rate": float(np.mean(results[:, 0] <= deadline)),
                          "cost": float(results[:, 1].mean()), "jct_mean": float(results[:, 0].mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_prewarm() -> list[dict[str, Any]]:
    """Pre-warming's saving on the chosen plan, boot latency 3 to 5 minutes."""
    resnet = json.loads((EXAMPLES / "problem-resnet-p3.json").read_text())
    noisy = json.loads((EXAMPLES / "problem-noisy-g5.json").read_text())
    rows = []
    for name, data, deadlines in (("resnet-p3", resnet, [2400, 3000, 4000]), ("noisy g5", noisy, [7200, 10800])):
        for boot in (180, 300):
            for deadline in deadlines:
                d = copy.deepcopy(data)
                d["deadline_seconds"] = deadline
                for t in d["instance_types"]:
                    t["boot_seconds"] = boot
                problem = parse_problem(d)
                try:
                    out = plan_problem(problem)
                except InfeasibleError:
                    rows.append({"problem": name, "boot": boot, "deadline": deadline, "feasible": False})
                    continue
                warm = parse_plan(out, problem)
                cold = Plan(warm.instance_type, tuple(replace(s, launch_after=None) for s in warm.stages))
                rows.append({"problem": name, "boot": boot, "deadline": deadline, "feasible": True,
                             "prewarmed_stages": sum(s.launch_after is not None for s in warm.stages),
                             "cost": out["predicted"]["cost_usd"]["mean"],
                             "cost_without": simulate(problem, cold)["cost_usd"]["mean"]})
    for boot in (180, 300):  # a plan that grows: 1 then 4 p3.8xlarge, pre-warmed by the planner's rule
        d = copy.deepcopy(resnet)
        d["deadline_seconds"] = 6000
        for t in d["instance_types"]:
            t["boot_seconds"] = boot
        problem = parse_problem(d)
        cold = Plan.of("p3.8xlarge", [(1, 1), (1, 4), (1, 1), (4, 1)])
        ev = Evaluator(problem)
        warm = _prewarm(cold, ev)
        rows.append({"problem": "resnet-p3, growing plan 1x1g 4x1g 1x1g 1x4g", "boot": boot, "deadline": 6000,
                     "feasible": True, "prewarmed_stages": sum(s.launch_after is not None for s in warm.stages),
                     "cost": ev(warm).cost_mean, "cost_without": ev(cold).cost_mean})
    return rows


def bench_speed() -> dict[str, Any]:
    """One re-plan of the 1024-trial problem after its first stage, 1.3x slower than profiled."""
    data = json.loads(LARGE.read_text())
    data["deadline_seconds"] = 24000
    problem = parse_problem(data)
    t = time.perf_counter()
    first = parse_plan(plan_problem(problem), problem)
    plan_seconds = time.perf_counter() - t
    itype = problem.instance_type(first.instance_type)
    end = 4000.0
    live = tuple(LiveInstance(itype.name, 100.0, 300.0) for _ in range(first.stages[0].instances))
    state = RunState(2, Start(end, 50.0, live), Observed({1: data["workload"]["epoch_seconds"]["1"] * 1.3}))
    t = time.perf_counter()
    replan(problem, state)
    return {"plan_seconds": plan_seconds, "replan_seconds": time.perf_counter() - t,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def noisy(data: dict) -> dict:
    """The problem with straggler and pending noise (the benchmark's problems have both)."""
    out = copy.deepcopy(data)
    out["workload"]["straggler_sigma"] = max(0.2, out["workload"].get("straggler_sigma", 0.0))
    for t in out["instance_types"]:
        t["pending_sigma"] = max(0.3, t.get("pending_sigma", 0.0))
    out["planner"] = {**out.get("planner", {}), "samples": 128}
    return out


def _money(x: float) -> str:
    return f"${x:,.2f}"


def write_doc(results: dict[str, Any]) -> None:
    lines = [
        "## Re-planning against one-shot plans",
        "",
        "By `benchmarks/bench_replan.py` (raw numbers: `benchmarks/results/replan.json`). Each run is",
        "executed stage by stage in a simulated world whose epoch times are the profile's times the",
        f"deviation (noise on: straggler σ 0.2, pending σ 0.3; {RUNS} runs per cell, their own noise).",
        "*one-shot* plans on the profile and never changes; *robust* plans one-shot for the slowest",
        "deviation (+50%); *oracle* plans knowing the deviation; *re-plan* starts from the one-shot plan",
        "and re-plans after every stage (section 7) from the run's state and its measured epoch",
        "times. Hit rate: share of runs within the deadline. Cost: mean over the runs.",
        "",
        "| problem | deadline | deviation | one-shot hit / cost | robust hit / cost | oracle hit / cost "
        "| re-plan hit / cost | re-plan / oracle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["deviations"]:
        cells = [f"{r[k]['hit_rate']:.0%} / {_money(r[k]['cost'])}" for k in ("one_shot", "robust", "oracle", "replan")]
        ratio = r["replan"]["cost"] / r["oracle"]["cost"]
        lines.append(f"| {r['problem']} | {r['deadline']:,.0f} s | {r['deviation'] - 1:+.0%} | " + " | ".join(cells)
                     + f" | {ratio:.3f}x |")
    q = results["jct_quantile"]
    misses = [r for r in results["deviations"] if r["replan"]["hit_rate"] < q]
    over = [r for r in results["deviations"] if r["replan"]["cost"] > 1.05 * r["oracle"]["cost"]]
    lines += ["", f"Targets: re-plan hit rate >= the quantile ({q:.0%}) under every deviation: "
              + ("met." if not misses else f"missed in {len(misses)} of {len(results['deviations'])} cells.")
              + " Re-plan cost <= 1.05x the oracle's: "
              + ("met." if not over else f"missed in {len(over)} of {len(results['deviations'])} cells: "
                 "a re-plan at the barrier cannot change stage 1, which ran on the one-shot plan's "
                 "allocation (sized for the profile); when the run is much slower the remaining stages "
                 "scale out to catch up, when much faster they cannot recover what stage 1 overpaid.")]
    lines += ["", "### Pre-warming", "",
              "Cost of the chosen plan with the pre-warming the planner chose against the same plan without",
              "it, with every type's boot latency set to 3 or 5 minutes. Pre-warming applies only where a",
              "stage has more instances than the one before it; the last rows force such a plan (section 5,",
              "step 4: the noise-free programme does not model pre-warming, so it does not seek such plans).", "",
              "| problem | boot | deadline | pre-warmed stages | cost | without pre-warming | saved |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["prewarm"]:
        if not r["feasible"]:
            lines.append(f"| {r['problem']} | {r['boot']} s | {r['deadline']:,} s | misses deadline | | | |")
            continue
        saved = 1 - r["cost"] / r["cost_without"]
        lines.append(f"| {r['problem']} | {r['boot']} s | {r['deadline']:,} s | {r['prewarmed_stages']} | "
                     f"{_money(r['cost'])} | {_money(r['cost_without'])} | {saved:.1%} |")
    s = results["speed"]
    lines += ["", "### Re-planning speed", "",
              f"The 1024-trial problem (deadline 24,000 s), after its first stage, 30% slower: plan "
              f"{s['plan_seconds']:.2f} s, re-plan {s['replan_seconds']:.2f} s; peak resident memory of the "
              f"process {s['peak_rss_mib']:.0f} MiB (planning included). Issue 11's target for one re-plan "
              f"is <= 1 s: " + ("met." if s["replan_seconds"] <= 1 else "missed.")]
    write_section("replan", "\n".join(lines))


def main() -> None:
    resnet = json.loads((EXAMPLES / "problem-resnet-p3.json").read_text())
    results = {"jct_quantile": 0.95, "deviations": bench_deviations("resnet-p3", noisy(resnet), 3000),
               "prewarm": bench_prewarm(), "speed": bench_speed()}
    RESULTS.write_text(json.dumps(results, indent=2))
    write_doc(results)


if __name__ == "__main__":
    main()
