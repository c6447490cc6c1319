"""The billing rule of docs/planning-model.md section 2, shared by the simulator and the run's ledger.

An instance is billed from running to termination, rounded up to the increment, at least the
minimum; one terminated before it was running costs nothing. Predicted and actual cost apply
this one function, so they can differ only by what happened, never by rule.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# Float tolerance when rounding billed seconds up to the increment: 120.0000000001 s is 120 s.
_ROUNDING_EPS = 1e-9


def billed_seconds(running: ArrayLike, terminated: ArrayLike, minimum: float, increment: float) -> np.ndarray:
    """Billed seconds per instance (elementwise): termination minus running, rounded up, at least ``minimum``."""
    life = np.asarray(terminated, dtype=float) - np.asarray(running, dtype=float)
    steps = np.ceil(life / increment - _ROUNDING_EPS * np.maximum(1.0, life / increment))
    return np.where(life > 0, np.maximum(minimum, steps * increment), 0.0)
