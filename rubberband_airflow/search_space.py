"""Search spaces: named distributions over hyperparameters, sampled reproducibly from a seed."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from rubberband_airflow.planning.errors import ProblemError

KINDS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "int": ("low", "high"), "choice": ("values",)}


def validate(space: Any, where: str = "search_space") -> dict[str, dict[str, Any]]:
    """Check a search space; errors name the parameter and the field."""
    if not isinstance(space, Mapping) or not space:
        raise ProblemError(where, "must be a non-empty mapping of parameter name to distribution")
    for name, dist in space.items():
        at = f"{where}.{name}"
        if not isinstance(dist, Mapping) or dist.get("type") not in KINDS:
            raise ProblemError(f"{at}.type", f"must be one of {', '.join(KINDS)}")
        fields = KINDS[dist["type"]]
        extra = set(dist) - set(fields) - {"type"}
        if extra:
            raise ProblemError(f"{at}.{sorted(extra)[0]}", f"unknown key for a {dist['type']} distribution")
        for f in fields:
            if f not in dist:
                raise ProblemError(f"{at}.{f}", "is required")
        if dist["type"] == "choice":
            if not isinstance(dist["values"], list) or not dist["values"]:
                raise ProblemError(f"{at}.values", "must be a non-empty list")
            continue
        low, high = dist["low"], dist["high"]
        for f, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ProblemError(f"{at}.{f}", f"must be a number, got {v!r}")
            if dist["type"] == "int" and not isinstance(v, int):
                raise ProblemError(f"{at}.{f}", f"must be an integer, got {v!r}")
        if not low < high and not (dist["type"] == "int" and low == high):
            raise ProblemError(f"{at}.high", f"must be greater than low ({low}), got {high}")
        if dist["type"] == "loguniform" and low <= 0:
            raise ProblemError(f"{at}.low", f"must be positive for a loguniform distribution, got {low}")
    return dict(space)


def sample(space: Mapping[str, Mapping[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations drawn independently from the space (plain JSON values)."""
    validate(space)
    rng = np.random.default_rng(seed)
    configs: list[dict[str, Any]] = [{} for _ in range(n)]
    for name in sorted(space):
        d = space[name]
        kind = d["type"]
        if kind == "uniform":
            values = rng.uniform(d["low"], d["high"], n).tolist()
        elif kind == "loguniform":
            values = np.exp(rng.uniform(math.log(d["low"]), math.log(d["high"]), n)).tolist()
        elif kind == "int":
            values = rng.integers(d["low"], d["high"], n, endpoint=True).tolist()
        else:
            values = [d["values"][k] for k in rng.integers(0, len(d["values"]), n)]
        for config, value in zip(configs, values):
            config[name] = value
    return configs
