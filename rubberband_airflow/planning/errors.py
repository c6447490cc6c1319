"""Errors of the planning core; each carries what a user needs to fix or understand it."""

from __future__ import annotations

from typing import Any


class ProblemError(ValueError):
    """Invalid input: names the offending field (dotted path) and says what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class InfeasibleError(RuntimeError):
    """No plan meets the deadline; carries the fastest achievable plan and its JCT at the quantile."""

    def __init__(self, deadline_seconds: float, fastest_jct_seconds: float, fastest_plan: dict[str, Any]) -> None:
        self.deadline_seconds = deadline_seconds
        self.fastest_jct_seconds = fastest_jct_seconds
        self.fastest_plan = fastest_plan
        super().__init__(
            f"no plan meets the deadline of {deadline_seconds:g} s; the fastest achievable JCT "
            f"(at the planner's quantile) is {fastest_jct_seconds:.1f} s with plan "
            f"{_plan_summary(fastest_plan)}"
        )


def _plan_summary(plan: dict[str, Any]) -> str:
    stages = ", ".join(f"{s['instances']}x{s['gpus_per_trial']}g" for s in plan["stages"])
    return f"{plan['instance_type']} [{stages}] (instances x GPUs per trial, by stage)"
