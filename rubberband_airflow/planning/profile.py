"""From a stored profile and a tuning spec's settings to a planning problem (docs/profiling.md).

The profiler measures; this turns what it measured into the problem's workload, with the
scaling curve fitted so GPU counts that were not measured are predicted too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rubberband_airflow.planning.errors import ProblemError


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit``."""
    g, out = 1, []
    while g <= limit:
        out.append(g)
        g *= 2
    return out


def fit_scaling(measured: dict[int, float]) -> tuple[float, float]:
    """Fit t(g) = a + b / g with a, b >= 0 (non-negative least squares) to measured epoch seconds.

    ``a`` is the part that does not shrink with more GPUs (communication, serial work), ``b``
    the part that does. One measured point gives a = 0 (perfect scaling assumed).
    """
    gs = np.array(sorted(measured), dtype=float)
    ts = np.array([measured[int(g)] for g in gs])
    if len(gs) == 1:
        return 0.0, float(ts[0] * gs[0])
    from scipy.optimize import nnls  # here, not at import: DAG files import this module when parsed

    (a, b), _ = nnls(np.column_stack([np.ones_like(gs), 1.0 / gs]), ts)
    return float(a), float(b)


def predict_epoch_seconds(measured: dict[int, float], up_to: int) -> dict[int, float]:
    """Measured epoch seconds, and the fitted curve's values for the powers of two not measured."""
    a, b = fit_scaling(measured)
    return {g: float(measured.get(g, a + b / g)) for g in powers_of_two(max(up_to, max(measured)))}


def to_problem(profile_data: dict[str, Any], tuning: dict[str, Any]) -> dict[str, Any]:
    """A planning problem from a profile and a tuning spec.

    ``tuning`` has ``sha``, ``deadline_seconds``, ``instance_types`` (each: name, gpus,
    price_per_hour, max_instances; pending and boot default to the profile's), and optionally
    ``stage_overhead_seconds`` (the orchestrator's, measured from past runs),
    ``trial_overhead_seconds`` (measured in past runs: the profile's otherwise),
    ``teardown_seconds`` (measured in past runs: 0 otherwise), ``billing`` and ``planner``.
    """
    for key in ("sha", "deadline_seconds", "instance_types"):
        if key not in tuning:
            raise ProblemError(f"tuning.{key}", "is required")
    if not isinstance(tuning["instance_types"], list) or not tuning["instance_types"]:
        raise ProblemError("tuning.instance_types", "must be a non-empty list")
    measured = {int(g): float(v) for g, v in profile_data["epoch_seconds_measured"].items()}
    types = []
    launch = profile_data["instance_type"]
    for t in tuning["instance_types"]:
        types.append({"pending_seconds": launch["pending_seconds"], "boot_seconds": launch["boot_seconds"],
                      "pending_sigma": launch["pending_sigma"], **t})
    biggest = max(int(t["gpus"]) for t in types)
    curve = predict_epoch_seconds(measured, biggest)
    stage_overhead = tuning.get("stage_overhead_seconds", profile_data.get("stage_overhead_seconds"))
    if stage_overhead is None:
        raise ProblemError("tuning.stage_overhead_seconds", "is unknown: give it here, or profile an instance "
                           "with more than one GPU so the profile measures it")
    problem = {
        "sha": tuning["sha"],
        "workload": {"epoch_seconds": {str(g): round(v, 6) for g, v in curve.items()},
                     "trial_overhead_seconds": round(float(tuning.get("trial_overhead_seconds",
                                                                         profile_data["trial_overhead_seconds"])), 6),
                     "stage_overhead_seconds": round(float(stage_overhead), 6),
                     "straggler_sigma": round(profile_data["straggler_sigma"], 6),
                     "checkpoint_gb": profile_data["checkpoint_gb"],
                     **({"teardown_seconds": round(float(tuning["teardown_seconds"]), 6)}
                        if tuning.get("teardown_seconds") is not None else {})},
        "instance_types": types,
        "deadline_seconds": tuning["deadline_seconds"],
    }
    for key in ("billing", "planner"):
        if key in tuning:
            problem[key] = tuning[key]
    return problem
