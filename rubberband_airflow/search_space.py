"""Search spaces: named distributions over hyperparameters, sampled reproducibly from a seed."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.validation import describe, label

KINDS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "int": ("low", "high"), "choice": ("values",)}

BOUND_LIMIT = 1e15  # |low| and |high| at most this: the draws stay finite and exact enough
VALUE_DEPTH = 8  # how deeply a choice value may nest lists and mappings
INT_LIMIT = 2**63  # a choice value's integers stay within 64 bits


def validate(space: Any, where: str = "search_space") -> dict[str, dict[str, Any]]:
    """Check a search space; errors name the parameter and the field."""
    if not isinstance(space, Mapping) or not space:
        raise ProblemError(where, "must be a non-empty mapping of parameter name to distribution, "
                           f"got {describe(space)}")
    for name, dist in space.items():
        if not isinstance(name, str) or not name.strip():
            raise ProblemError(f"{where}.{label(name)}",
                               f"a parameter name must be a non-empty string, got {describe(name)}")
        _distribution(dist, f"{where}.{name}")
    return dict(space)


def _distribution(dist: Any, at: str) -> None:
    if not isinstance(dist, Mapping):
        raise ProblemError(at, f"must be a mapping such as {{type: uniform, low: 0, high: 1}}, got {describe(dist)}")
    kind_name = dist.get("type")
    if not isinstance(kind_name, str) or kind_name not in KINDS:
        raise ProblemError(f"{at}.type", f"must be one of {', '.join(KINDS)}, got {describe(kind_name)}")
    fields = KINDS[kind_name]
    extra = sorted(label(k) for k in dist if k not in fields and k != "type")
    if extra:
        raise ProblemError(f"{at}.{extra[0]}", f"unknown key for a {kind_name} distribution (allowed: "
                           f"{', '.join(('type', *fields))})")
    for f in fields:
        if f not in dist:
            raise ProblemError(f"{at}.{f}", "is required")
    if kind_name == "choice":
        values = dist["values"]
        if not isinstance(values, list) or not values:
            raise ProblemError(f"{at}.values", f"must be a non-empty list, got {describe(values)}")
        for k, value in enumerate(values):
            plain_value(value, f"{at}.values[{k}]")
        return
    low, high = dist["low"], dist["high"]
    for f, v in (("low", low), ("high", high)):
        _bound(v, f"{at}.{f}", integer=kind_name == "int")
    if not low < high and not (kind_name == "int" and low == high):
        raise ProblemError(f"{at}.high", f"must be greater than low ({low}), got {high}")
    if kind_name == "loguniform" and low <= 0:
        raise ProblemError(f"{at}.low", f"must be positive for a loguniform distribution, got {low}")


def _bound(value: Any, name: str, *, integer: bool) -> None:
    """A finite number within +-1e15 (an integer for an int distribution)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProblemError(name, f"must be a number, got {describe(value)}")
    if integer and not isinstance(value, int):
        raise ProblemError(name, f"must be an integer, got {describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProblemError(name, f"must be finite, got {value!r}")
    if abs(value) > BOUND_LIMIT:
        raise ProblemError(name, f"must be within -1e15 and 1e15, got {describe(value)}")


def plain_value(value: Any, name: str, depth: int = 0) -> None:
    """Check that ``value`` is plain JSON: null, a boolean, a finite number, a string, or lists and
    mappings (string keys) of them. A YAML date is rejected: quoted, it is a string."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) >= INT_LIMIT:
            raise ProblemError(name, f"must be a 64-bit integer, got {describe(value)}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProblemError(name, f"must be finite, got {value!r}")
        return
    if isinstance(value, (datetime.date, datetime.datetime)):
        raise ProblemError(name, f"is a YAML date or timestamp ({value.isoformat()}), not a plain value: "
                           f"quote it ('{value.isoformat()}') to use it as a string")
    if isinstance(value, (list, Mapping)) and depth >= VALUE_DEPTH:
        raise ProblemError(name, f"nests lists and mappings more than {VALUE_DEPTH} deep")
    if isinstance(value, list):
        for k, item in enumerate(value):
            plain_value(item, f"{name}[{k}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProblemError(f"{name}.{label(key)}", f"a mapping key must be a string, got {describe(key)}")
            plain_value(item, f"{name}.{key}", depth + 1)
        return
    raise ProblemError(name, f"must be null, a boolean, a number, a string, or a list or mapping of them, "
                       f"got {describe(value)}")


def sample(space: Mapping[str, Mapping[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations drawn independently from the space (plain JSON values)."""
    validate(space)
    rng = np.random.default_rng(seed)
    configs: list[dict[str, Any]] = [{} for _ in range(n)]
    for name in sorted(space):
        d = space[name]
        kind_name = d["type"]
        if kind_name == "uniform":
            values = rng.uniform(d["low"], d["high"], n).tolist()
        elif kind_name == "loguniform":
            values = np.exp(rng.uniform(math.log(d["low"]), math.log(d["high"]), n)).tolist()
        elif kind_name == "int":
            values = rng.integers(d["low"], d["high"], n, endpoint=True).tolist()
        else:
            values = [d["values"][k] for k in rng.integers(0, len(d["values"]), n)]
        for config, value in zip(configs, values):
            config[name] = value
    return configs
