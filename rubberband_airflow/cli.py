"""The `rubberband` command: `plan` and `simulate` (docs/planning-model.md section 6).

Exit status: 0 on success, 2 for an input error (the message names the field), 3 when no plan
meets the deadline (the message gives the fastest achievable JCT).
"""

from __future__ import annotations

import argparse
import json
import sys
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
    return parser


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
    print(plan_table(result) if args.table else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
