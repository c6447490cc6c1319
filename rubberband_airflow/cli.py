"""The `rubberband` command: `plan` and `simulate` (docs/planning-model.md section 6).

Exit status: 0 on success, 2 for an input error (the message names the field), 3 when no plan
meets the deadline (the message gives the fastest achievable JCT).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rubberband_airflow.planning.errors import InfeasibleError, ProblemError
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.planner import METHODS, plan_problem
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.report import plan_table
from rubberband_airflow.planning.simulator import simulate

EXIT_INPUT = 2
EXIT_INFEASIBLE = 3


def _load_json(path: str, what: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ProblemError(what, f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ProblemError(what, f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise ProblemError(what, f"{path} is not valid JSON: {e}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    problem = parse_problem(_load_json(args.problem, "problem"))
    return plan_problem(problem, args.method)


def _cmd_simulate(args: argparse.Namespace) -> dict[str, Any]:
    problem = parse_problem(_load_json(args.problem, "problem"))
    plan = parse_plan(_load_json(args.plan, "plan"), problem)
    return simulate(problem, plan)


def _load_object(ref: str, what: str) -> Any:
    """A JSON file, or ``package.module:attribute``."""
    if ":" in ref and not Path(ref).exists():
        module, _, attr = ref.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ProblemError(what, f"cannot load {ref}: {e}") from None
    return _load_json(ref, what)


def _cmd_profile(args: argparse.Namespace) -> dict[str, Any]:
    import fsspec

    from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType, machine_slots
    from rubberband_airflow.execution.storage import RunStorage
    from rubberband_airflow.profiler import profile
    from rubberband_airflow.search_space import validate

    space = validate(_load_object(args.search_space, "search_space"))
    itype = LocalInstanceType(f"local-{args.slots}", args.slots, args.pending_seconds, args.boot_seconds)
    if not 1 <= args.slots <= machine_slots():
        raise ProblemError("slots", f"must be between 1 and this machine's {machine_slots()} GPUs (or CPU cores, "
                                    f"where it has no GPU), got {args.slots}")
    root = args.storage or f"file://{Path('.rubberband/profiles').resolve()}"
    storage = RunStorage(f"{root.rstrip('/')}/{itype.name}-{int(time.time())}")
    past = [entry for uri in args.ledgers for entry in RunStorage(uri).ledger()]
    reports = [rep for uri in args.ledgers if (rep := RunStorage(uri).read_json("report.json"))]
    result = profile(storage, LocalBackend(storage, itype, trial_timeout=args.timeout), trainable=args.trainable,
                     search_space=space, metric=args.metric, instance_type=args.name or itype.name,
                     gpus=args.slots, configs=args.configs or max(4, 2 * args.slots), epochs=args.epochs,
                     timeout=args.timeout,
                     past_ledgers=past, conditions={"backend": "local", "storage": storage.uri,
                                                    "past_runs": args.ledgers})
    from rubberband_airflow.tuning import measured_stage_overhead

    if (measured := measured_stage_overhead(reports)) is not None:  # the orchestrator's, from real runs
        result["stage_overhead_seconds"] = measured
        result["conditions"]["stage_overhead_from"] = "past runs"
    if args.out:  # a path, or a URL such as s3://bucket/profiles/g5.12xlarge.json
        local = fsspec.core.split_protocol(args.out)[0] in (None, "file", "local")
        with fsspec.open(args.out, "w", **({"auto_mkdir": True} if local else {})) as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return result


def _cmd_problem(args: argparse.Namespace) -> dict[str, Any]:
    from rubberband_airflow.planning.profile import to_problem

    problem = to_problem(_load_json(args.profile, "profile"), _load_json(args.tuning, "tuning"))
    parse_problem(problem)  # the planner must accept it
    return problem


def _cmd_report(args: argparse.Namespace) -> str:
    from rubberband_airflow.execution.storage import RunStorage
    from rubberband_airflow.report import newest_reports, summary_lines

    storage = RunStorage(args.target)
    rep = storage.read_json("report.json")
    if rep is None and not (args.html and storage.exists("plan.json")):  # a tuning DAG's folder: its newest run
        reports = newest_reports(storage)
        if not reports:
            raise ProblemError("run", f"no report under {args.target}")
        name, rep = reports[0]
        storage = storage.child(name)
    if args.html:
        from rubberband_airflow.run_view import run_view_html

        title = (rep or {}).get("dag_id") or storage.uri.rstrip("/").rsplit("/", 1)[-1]
        described = ((storage.read_json("spec.json") or {}).get("spec") or {}).get("description")  # the run's spec
        description = f"{described} · {storage.uri}" if described else storage.uri
        Path(args.html).write_text(run_view_html(storage, title, description), encoding="utf-8")
        return f"Run view of {storage.uri} written to {args.html}"
    return "\n".join(summary_lines(rep))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rubberband", description="Plan and simulate cost-minimal, deadline-aware "
                     "hyperparameter tuning on elastic GPU instances.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the cheapest plan that meets the deadline, as JSON")
    p.add_argument("problem", help="planning problem (JSON)")
    p.add_argument("--method", choices=METHODS, default="exact",
                   help="exact: frontier search with simulator polish (default); greedy: the seed's "
                        "cost-marginal-benefit search, a baseline")
    p.add_argument("--table", action="store_true", help="print a readable table instead of JSON")
    p.set_defaults(run=_cmd_plan)
    s = sub.add_parser("simulate", help="print a plan's predicted JCT and cost, as JSON")
    s.add_argument("problem", help="planning problem (JSON)")
    s.add_argument("plan", help="allocation plan (JSON)")
    s.set_defaults(run=_cmd_simulate, table=False)
    f = sub.add_parser("profile", help="measure a trainable on a local instance and print its profile")
    f.add_argument("--trainable", default="rubberband_airflow.workloads.digits:train",
                   help="package.module:function (default: the digits example)")
    f.add_argument("--search-space", default="rubberband_airflow.workloads.digits:SEARCH_SPACE",
                   help="JSON file or package.module:attribute")
    f.add_argument("--metric", default="accuracy")
    f.add_argument("--slots", type=int, default=min(2, _cores()), help="GPUs (or CPU cores) of the instance")
    f.add_argument("--pending-seconds", type=float, default=0.0, help="injected pending latency")
    f.add_argument("--boot-seconds", type=float, default=0.0, help="injected boot latency")
    f.add_argument("--configs", type=int, help="configurations timed on one GPU (default: 2 per slot, at least 4)")
    f.add_argument("--epochs", type=int, default=3, help="epochs per profiling task")
    f.add_argument("--timeout", type=float, default=900.0, help="seconds before a profiling trial fails")
    f.add_argument("--storage", help="where the profiling run's files go (default .rubberband/profiles)")
    f.add_argument("--out", help="also write the profile here (a path or a URL such as s3://...)")
    f.add_argument("--name", help="instance type name to record (default local-SLOTS; on a GPU instance, its type)")
    f.add_argument("--ledgers", nargs="*", default=[], metavar="RUN_URI",
                   help="storage URIs of past runs: their ledgers give pending and boot latency, their "
                        "reports the orchestrator's stage overhead")
    f.set_defaults(run=_cmd_profile, table=False)
    q = sub.add_parser("problem", help="print the planning problem of a profile and a tuning spec")
    q.add_argument("profile", help="profile (JSON) from `rubberband profile`")
    q.add_argument("tuning", help="tuning spec (JSON): sha, deadline_seconds, instance_types, ...")
    q.set_defaults(run=_cmd_problem, table=False)
    r = sub.add_parser("report", help="print the summary of a tuning run's report")
    r.add_argument("target", metavar="RUN", help="a run's storage URI, or a tuning DAG's folder (its newest run)")
    r.add_argument("--html", metavar="OUT", help="write the run view (fleet, cost, learning curves, leaderboard, "
                   "cost against deadline) to this self-contained HTML file instead")
    r.set_defaults(run=_cmd_report, table=False)
    return parser


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except ProblemError as e:
        print(f"rubberband: input error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except InfeasibleError as e:
        print(f"rubberband: {e}", file=sys.stderr)
        if not args.table:
            print(json.dumps({"error": "infeasible", "deadline_seconds": e.deadline_seconds,
                              "fastest_jct_seconds": e.fastest_jct_seconds, "fastest_plan": e.fastest_plan},
                             indent=2))
        return EXIT_INFEASIBLE
    if isinstance(result, str):
        print(result)
    else:
        print(plan_table(result) if args.table else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
