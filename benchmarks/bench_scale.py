"""Hundreds of trials on a distributed Airflow: the synthetic workload at 16, 64 and 256 trials.

The stack is the full-stack tests' Celery one (tests/fullstack/conftest.py): CeleryExecutor with
Redis and PostgreSQL, two workers, triggerer, scheduler, dag-processor, api-server; run storage on
S3 (moto's server); trial waits started on the triggerer. Its triggerer reaches S3 through a
counting proxy, so the storage requests of the trial waits are counted. For each run, per stage:
the orchestration overhead (the previous stage's last result to the stage's first trial start),
the triggerer's storage requests per minute per waiting trial, the scheduler's time per mapped
wait (the start task's end to the last wait's start, over the waits); and the run's predicted
against actual JCT and cost, and the triggerer's CPU seconds. Writes benchmarks/results/scale.json
and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil

from benchmarks.doc_sections import save_results, write_section
from rubberband_airflow.execution.storage import RunStorage
from tests.execution.moto_cloud import BUCKET
from tests.fullstack.conftest import SCALE_DAG, SCALE_PREFIX, Stack, celery_stack_at, moto_cloud_server, run_folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
SIZES = tuple(int(n) for n in os.environ.get("RUBBERBAND_SCALE_SIZES", "16,64,256").split(","))
# Deadlines that a plan still meets with the stage overhead the DAG's previous run measured (each
# run plans with it), on at most MAX_INSTANCES instances of 16 slots: at most 64 trials at once
# (about 5 GB of trial processes here).
DEADLINES = {16: 30.0, 64: 40.0, 256: 60.0}
MAX_INSTANCES = 4


class _Counting(BaseHTTPRequestHandler):
    """Forwards each request to moto's server and notes when it was made."""

    server: _Proxy
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        key = urllib.parse.urlparse(self.path).path.rsplit("/", 1)[-1]
        kind = "list" if "list-type" in self.path else f"{self.command} {key if key.endswith('.json') else '…'}"
        self.server.seen.append((time.time(), kind))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(self.server.target, timeout=60)
        conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items()})
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        # a HEAD's length is the object's, not of the (empty) body
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def log_message(self, *args: Any) -> None:
        pass


class _Proxy(ThreadingHTTPServer):
    def __init__(self, endpoint: str) -> None:
        super().__init__(("127.0.0.1", 0), _Counting)
        self.target = urllib.parse.urlparse(endpoint).netloc
        self.seen: list[tuple[float, str]] = []  # when, and what: a listing, or a method and object name
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _time(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


def _triggerer_cpu(stack: Stack) -> float:
    """CPU seconds of the triggerer and its trigger runner so far."""
    total = 0.0
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (p.info["cmdline"] or [])[-1:] == ["triggerer"] and p.environ().get("AIRFLOW_HOME") == str(stack.home):
                for q in [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _startup(stack: Stack, run_id: str, ti: dict[str, Any]) -> float | None:
    """Seconds from a task instance's start to its task process having parsed the DAG (Airflow's task
    runner's imports and DAG parse, before any of the task's own code), from its log."""
    log = stack.home / "logs" / f"dag_id={ti['dag_id']}" / f"run_id={run_id}" / f"task_id={ti['task_id']}" / \
        f"attempt={ti.get('try_number') or 1}.log"
    try:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    except (OSError, ValueError):
        return None
    parsed = next((r["timestamp"] for r in lines if r.get("event") == "Worker startup parse complete"), None)
    begun = _time(ti["start_date"])
    return None if parsed is None or begun is None else _time(parsed) - begun


def measure(stack: Stack, proxy: _Proxy, trials: int, again: bool = False) -> dict[str, Any]:
    """One run of the scale DAG with ``trials`` trials, and what it measured (``again``: a second run
    of the size, planned with the overheads the first measured)."""
    cpu = _triggerer_cpu(stack)
    began = time.time()
    run_id = stack.trigger(SCALE_DAG, {"num_trials": trials, "deadline_seconds": DEADLINES.get(trials, 60.0),
                                       "max_instances": MAX_INSTANCES})
    state = stack.wait_for_run(SCALE_DAG, run_id, timeout=3600)
    wall = time.time() - began
    cpu = _triggerer_cpu(stack) - cpu
    tis = stack.task_instances(SCALE_DAG, run_id)
    storage = RunStorage(f"s3://{BUCKET}/{SCALE_PREFIX}/{SCALE_DAG}/{run_folder(run_id)}")
    rep = storage.read_json("report.json")
    if rep is None:
        raise RuntimeError(f"the {trials}-trial run {run_id} ended {state} without a report (its plan failed?)")
    stages = []
    previous_last: float | None = None
    for s in rep["stages"]:
        i = s["stage"]
        results = [r[str(i)] for r in (v["results"] for v in rep["trials"].values()) if str(i) in r]
        first_start = min(r.get("spawned") or r["started"] for r in results)
        latency = [r["started"] - r["spawned"] for r in results if r.get("spawned")]
        last_result = max(r["finished"] for r in results)
        waits = [t for t in tis if t["task_id"] == f"stage_{i}.wait"]
        start = next(t for t in tis if t["task_id"] == f"stage_{i}.start")
        starts = [_time(t["start_date"]) for t in waits]
        ends = [_time(t["end_date"]) for t in waits]
        window = (min(x for x in starts if x), max(x for x in ends if x))
        trial_minutes = sum(e - b for b, e in zip(starts, ends) if b and e) / 60
        seen = [kind for t, kind in proxy.seen if window[0] <= t <= window[1]]
        requests = len(seen)
        kinds: dict[str, int] = {}
        for kind in seen:
            kind = kind if kind == "list" or not kind.startswith("GET stage-") else "GET stage-<i>.json"
            kinds[kind] = kinds.get(kind, 0) + 1
        barrier = None
        if previous_last is not None:  # where the overhead went: the stage before's waits; this start
            before = [_time(t["end_date"]) for t in tis if t["task_id"] == f"stage_{i - 1}.wait"]
            waits_ended = max(x for x in before if x)
            barrier = {"waits_ended": waits_ended - previous_last,
                       "start_queued": _time(start["start_date"]) - waits_ended,
                       "start": _time(start["end_date"]) - _time(start["start_date"]),
                       "first_trial": first_start - _time(start["end_date"]),
                       # of start's run: the task process's start (Airflow's)
                       "start_startup": _startup(stack, run_id, start)}
        stages.append({"stage": i, "trials": s["trials"], "instances": s["instances"],
                       "overhead_seconds": first_start - previous_last if previous_last else None,
                       "barrier_seconds": barrier,
                       "seconds": last_result - first_start,
                       "trial_start_seconds": {"mean": sum(latency) / len(latency), "max": max(latency)}
                       if latency else None,
                       "triggerer_requests": requests, "triggerer_requests_by_kind": kinds,
                       "trial_minutes_waited": trial_minutes,
                       "requests_per_trial_minute": requests / trial_minutes if trial_minutes else None,
                       "scheduler_seconds_per_wait": (max(x for x in starts if x) - _time(start["end_date"]))
                       / len(waits)})
        previous_last = last_result
    plan = storage.read_json("plan.json")
    # Billed after the last result: the model terminates every instance at the last result
    # (docs/planning-model.md, section 4); the run terminates them at its teardown task.
    ledger = storage.ledger()
    after = [float(e["terminated"]) - max(float(e["running"]), previous_last or 0.0) for e in ledger
             if e.get("running") is not None and e.get("terminated") is not None]
    # Billed before an instance's first trial: the model's instances (launch latency 0) run one at once.
    first_trial: dict[str, float] = {}
    for trial in rep["trials"].values():
        for r in trial["results"].values():
            if r.get("instance") and (spawned := r.get("spawned") or r.get("started")) is not None:
                first_trial[r["instance"]] = min(float(spawned), first_trial.get(r["instance"], float("inf")))
    idle = [first_trial[e["instance"]] - float(e["running"]) for e in ledger
            if e.get("running") is not None and e["instance"] in first_trial]
    price = next(t["price_per_hour"] for t in plan["problem"]["instance_types"] if t["name"] == plan["instance_type"])
    out = {"trials": trials, "again": again, "state": state, "deadline_seconds": DEADLINES.get(trials, 60.0),
           "instances_per_stage": [s["instances"] for s in plan["stages"]], "wall_seconds": wall,
           "triggerer_cpu_seconds": cpu,
           "predicted_jct": rep["predicted"]["jct_seconds"]["mean"], "actual_jct": rep["actual"]["jct_seconds"],
           "predicted_cost": rep["predicted"]["cost_usd"]["mean"], "actual_cost": rep["actual"]["cost_usd"],
           "planned_stage_overhead": plan["problem"]["workload"]["stage_overhead_seconds"],
           "stage_overhead_from": plan.get("stage_overhead_from"),
           "planned_trial_overhead": plan["problem"]["workload"]["trial_overhead_seconds"],
           "trial_overhead_from": plan.get("trial_overhead_from"),
           "measured_trial_overhead": rep.get("trial_overhead_seconds"),
           "planned_teardown": plan["problem"]["workload"].get("teardown_seconds"),  # None: not billed
           "measured_teardown": rep.get("teardown_seconds"),
           "billed_after_last_result_seconds": sum(max(0.0, a) for a in after),
           "billed_before_first_trial_seconds": sum(max(0.0, x) for x in idle),
           "billed_seconds": (rep["actual"]["cost_usd"] or 0.0) * 3600 / price,
           "predicted_billed_seconds": rep["predicted"]["cost_usd"]["mean"] * 3600 / price,
           "terminated_after_last_result_seconds": max(after, default=None),
           "stages": stages}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="rubberband-scale-"))
    with moto_cloud_server(folder) as cloud:
        proxy = _Proxy(cloud.endpoint)
        settings = {"AIRFLOW__RUBBERBAND__WAITS_START_ON_TRIGGERER": "True"}
        triggerer = {"triggerer": (["triggerer"], {"FSSPEC_S3_ENDPOINT_URL": proxy.url})}
        with celery_stack_at(folder / "home", cloud, settings, triggerer) as stack:
            stack.wait_for_dag(SCALE_DAG)
            # Not measured: the triggerer's first trigger imports the storage and cloud libraries
            # (seconds, once per triggerer process), which a long-running deployment paid long ago.
            measure(stack, proxy, min(SIZES))
            runs = [measure(stack, proxy, n) for n in SIZES]
            # The largest again, as a nightly DAG runs: planned with the overheads its first run measured.
            runs.append(measure(stack, proxy, max(SIZES), again=True))
        proxy.shutdown()
    write_doc(save_results(RESULTS, runs))


def _targets(runs: list[dict[str, Any]]) -> list[str]:
    """Issue 13's targets against the runs: overhead, storage requests, prediction."""
    def met(ok: bool) -> str:
        return "met" if ok else "missed"

    first = [r for r in runs if not r.get("again")]
    small, big = min(first, key=lambda r: r["trials"]), max(first, key=lambda r: r["trials"])
    again = next((r for r in runs if r.get("again")), big)

    def overhead(r: dict[str, Any]) -> float:
        return max(s["overhead_seconds"] for s in r["stages"] if s["overhead_seconds"] is not None)

    def rates(r: dict[str, Any]) -> list[float]:
        return [s["requests_per_trial_minute"] for s in r["stages"] if s["requests_per_trial_minute"] is not None]

    growth, scale = overhead(big) / overhead(small), big["trials"] / small["trials"]
    others = [x for r in first if r is not big for x in rates(r)]
    jct = again["actual_jct"] / again["predicted_jct"] - 1
    cost = again["actual_cost"] / again["predicted_cost"] - 1
    lines = [f"Issue 13's targets at {big['trials']} trials: orchestration overhead per stage at most 10 s: "
             f"{met(overhead(big) <= 10)} ({overhead(big):.1f} s), growing no faster than linearly from "
             f"{small['trials']} trials: {met(growth <= scale)} ({growth:.1f} times for {scale:.0f} times the "
             f"trials); storage requests at most 1 per waiting trial per 10 s (6 per trial-minute): "
             f"{met(max(rates(big)) <= 6)} (at most {max(rates(big)):.2f})"]
    worst = max((s for s in big["stages"] if s["requests_per_trial_minute"] is not None),
                key=lambda s: s["requests_per_trial_minute"])
    kinds, minutes = worst["triggerer_requests_by_kind"], worst["trial_minutes_waited"]
    polls = sum(n for k, n in kinds.items() if k == "list" or k.endswith("heartbeat.json"))
    reads = kinds.get("GET stage-<i>.json", 0)
    lines[-1] += (f" (stage {worst['stage']}: {polls / minutes:.2f} of them the polling shared by the waiting "
                  f"trials, listings of the results and looks at the instances; {reads / minutes:.2f} each trial's "
                  f"one read of its result, {reads} reads over waits of {60 * minutes / max(1, worst['trials']):.0f} s "
                  "each on average; the rest the stage's one-off reads of its plan, spec and placement)")
    if others and max(others) > 6:
        lines[-1] += (f"; with fewer trials up to {max(others):.1f}, where a stage's fixed reads and each trial's "
                      "one read of its result weigh on short waits of few trials")
    lines[-1] += (f"; in the run of {again['trials']} trials planned with the overheads the one before it "
                  f"measured, predicted JCT within 5%: {met(abs(jct) <= 0.05)} ({jct:+.0%}), cost within 2%: "
                  f"{met(abs(cost) <= 0.02)} ({cost:+.0%}")
    if again.get("measured_trial_overhead") is not None:
        measured = [s["overhead_seconds"] for s in again["stages"] if s["overhead_seconds"] is not None]
        lines[-1] += (f": it planned with a stage overhead of {again['planned_stage_overhead']:.1f} s and measured "
                      f"{', '.join(f'{x:.1f}' for x in measured)} s, with a trial overhead of "
                      f"{again['planned_trial_overhead']:.1f} s and measured {again['measured_trial_overhead']:.1f} s "
                      f"(instances per stage {[s['instances'] for s in again['stages']]}, the run before it "
                      f"{[s['instances'] for s in big['stages']]}; on this machine's 2 cores a trial's start "
                      "slows with the trials started at once, where the planning model takes it to be the same "
                      "however many start)")
        if again.get("billed_after_last_result_seconds") is not None:
            lines[-1] += (f"; its instances were billed {again['billed_after_last_result_seconds']:.0f} instance-"
                          f"seconds after the last result (terminated up to "
                          f"{again['terminated_after_last_result_seconds']:.1f} s after it, by the final promote's "
                          "and the teardown's tasks)")
            if again.get("planned_teardown") is not None:
                lines[-1] += (f", where its plan billed each instance live at the end "
                              f"{again['planned_teardown']:.1f} s (the teardown its predecessors measured)")
            else:
                lines[-1] += ", which its plan did not bill"
        if again.get("billed_before_first_trial_seconds") is not None:
            lines[-1] += (f"; of the {again['billed_seconds']:.0f} instance-seconds it was billed (predicted "
                          f"{again['predicted_billed_seconds']:.0f}), "
                          f"{again['billed_before_first_trial_seconds']:.0f} were before each instance's first "
                          "trial (its agent's start, the placement, its first poll), which the model counts as "
                          "none: it requests a stage's instances at the stage's start, when its first trials "
                          "start, and the local type's launch latency is 0 s")
    lines[-1] += ")."
    return lines + [""]


def write_doc(result: dict[str, Any]) -> None:
    """The section ``scale`` of docs/benchmarks.md, from the results."""
    runs = result["runs"]
    lines = ["## Hundreds of trials on CeleryExecutor", "",
             "By `benchmarks/bench_scale.py` (raw numbers: `benchmarks/results/scale.json`): the synthetic workload "
             "(sleeping 2 s epochs, eta 4, two stages) on at most 4 local instances of 16 slots (oversubscribed: "
             "at most 64 trials at once), at the deadlines of `DEADLINES`, on the "
             "Celery stack of the full-stack tests (two workers, Redis, PostgreSQL, S3 on moto's server), trial "
             "waits started on the triggerer, after a run of the smallest size that warms the triggerer up (its "
             "first trigger imports the storage and cloud libraries, seconds once per triggerer process), and "
             "the largest size once more at the end. "
             f"Machine: {result['machine']}, running nothing else (load average {result['load_average']:.1f} at "
             "the end, the stack's and its trials' own).", "",
             "*Overhead*: the previous stage's last result to the stage's first trial start. *Trial start*: a "
             "trial's process spawned by its agent to its worker running. *Requests*: the "
             "triggerer's S3 requests per minute per waiting trial. *Scheduler*: the start task's end to the "
             "stage's last wait started, per wait. *Overhead's parts*: the previous stage's last result to its "
             "last wait ended (on the triggerer), to this stage's start task started (scheduler, Celery), start's "
             "run (promote the stage before, re-plan, scale, place), to the first trial spawned (the agents' "
             "poll).", "",
             "| trials | stage | trials in stage | instances | overhead | overhead's parts | "
             "trial start (mean, max) | "
             "requests / trial-minute | scheduler per wait | predicted JCT | actual JCT | predicted cost | "
             "actual cost | triggerer CPU |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for s in r["stages"]:
            first = s["stage"] == 1
            overhead = f"{s['overhead_seconds']:.1f} s" if s["overhead_seconds"] is not None else "–"
            rate = f"{s['requests_per_trial_minute']:.2f}" if s["requests_per_trial_minute"] is not None else "–"
            start = s.get("trial_start_seconds")
            begin = f"{start['mean']:.1f} s, {start['max']:.1f} s" if start else "–"
            parts = s.get("barrier_seconds")
            split = " + ".join(f"{max(0.0, parts[k]):.1f}" for k in ("waits_ended", "start_queued", "start",
                                                             "first_trial")) \
                if parts else "–"
            label = f"{r['trials']}{' again' if r.get('again') else ''}"
            lines.append(f"| {label if first else ''} | {s['stage']} | {s['trials']} | {s['instances']} | "
                         f"{overhead} | {split} | {begin} | "
                         f"{rate} | {s['scheduler_seconds_per_wait']:.2f} s | "
                         + (f"{r['predicted_jct']:.1f} s | {r['actual_jct']:.1f} s | ${r['predicted_cost']:.4f} | "
                            f"${r['actual_cost']:.4f} | {r['triggerer_cpu_seconds']:.0f} s |" if first
                            else "| | | | |"))
    ratios = [r["actual_jct"] / r["predicted_jct"] for r in runs]
    overheads = [s["overhead_seconds"] for r in runs for s in r["stages"] if s["overhead_seconds"] is not None]
    lines += ["", f"Actual JCT was {min(ratios):.1f} to {max(ratios):.1f} times the prediction and the "
              f"orchestration overhead between stages {min(overheads):.1f} to {max(overheads):.1f} s (between two "
              "stages the DAG runs one task, the next stage's start, which "
              "promotes the stage before; the stage's own promote task runs beside it, off that path). On this "
              "machine a trial is a process of its own, forked from its agent's "
              "fork server (which imported the worker and s3fs and loaded botocore's models of S3 once), handed "
              "its assignment and the run's settings by its agent, that makes a few requests to moto's server "
              "per epoch, and the trials of an instance start together: the *trial start* column is the time "
              "from the fork to the worker running (its S3 client made, its checkpoint looked at), which grows "
              "with the trials started at once on 2 shared cores. "
              "The requests include each trial's one-off read of its result once listed "
              "and each stage's one-off reads of the plan, spec "
              "and placement; the steady part is one listing of the stage's results per 2 s and one look at its "
              "instances per 30 s, shared by all its waiting trials (`triggerer_requests_by_kind` in the raw "
              "numbers).", ""]
    lines += ["Each run plans with the stage and trial overheads the DAG's latest runs of its size measured "
              "(the first of a size: those of all sizes, then the profile's):", ""]
    for r in runs:
        lines.append(f"- {r['trials']} trials{' again' if r.get('again') else ''}: stage overhead "
                     f"{r['planned_stage_overhead']:.1f} s ({r.get('stage_overhead_from')}), trial overhead "
                     f"{r['planned_trial_overhead']:.1f} s ({r.get('trial_overhead_from')}; it measured "
                     + (f"{r['measured_trial_overhead']:.1f} s" if r.get("measured_trial_overhead") is not None
                        else "none") + f"); predicted JCT {r['predicted_jct']:.1f} s, actual {r['actual_jct']:.1f} s "
                     f"({r['actual_jct'] / r['predicted_jct'] - 1:+.0%}).")
    lines += [""]
    lines += _targets(runs)
    names = {"waits_ended": "the last wait's end on the triggerer", "start_queued": "start's queueing",
             "start": "start's run",
             "first_trial": "the agents' poll"}
    for r in runs:
        for s in r["stages"]:
            if parts := s.get("barrier_seconds"):
                top = max(parts, key=parts.get)
                lines.append(f"- {r['trials']} trials{' again' if r.get('again') else ''}, before stage {s['stage']}: "
                             "the largest part of the "
                             f"{s['overhead_seconds']:.1f} s is {names[top]}, {parts[top]:.1f} s.")
    startups = [p[k] for r in runs for s in r["stages"] if (p := s.get("barrier_seconds"))
                if p.get(k := "start_startup") is not None]
    if startups:
        lines += ["", f"Each start's run begins with the task process's start, Airflow's: its "
                  f"imports and the DAG's parse took {min(startups):.1f} to {max(startups):.1f} s of each run "
                  "(`start_startup`), before any of the task's own code."]
    lines += ["", "A wait started on the triggerer costs the triggerer a load of the DAG's serialized form "
              "(twice: Airflow builds the trigger's workload, then renders its arguments) and about 25 ms of its "
              "main loop to end the task: while the triggers of a stage of hundreds of trials are created, the "
              "triggerer takes a core of this machine, and where the stage is shorter than that (here, trials of "
              "one 2 s epoch) the last waits end late. Much of start's run is requests to moto's single server "
              "process (256 results take it about 2 s on the idle machine): its promotion of the stage before "
              "reads every result of that stage and writes them into the stage's outcome, from which its "
              "re-plan reads them in one request."]
    write_section("scale", "\n".join(lines))


if __name__ == "__main__":
    main()
