"""The planner's memory budget: large arrays are sized before they are made.

A problem that would need more is an input error (exit 2) naming the field to reduce, never a
MemoryError or a process killed for memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from rubberband_airflow.planning.errors import ProblemError

# What the planner's own large arrays may take, on top of the interpreter and numpy.
DEFAULT_BYTES = 1 << 30
# Bytes one candidate of the Pareto programme takes while its stage is expanded (about a dozen
# float and index arrays, and the sorts of the pruning).
CANDIDATE_BYTES = 160


@dataclass(frozen=True)
class MemoryBudget:
    bytes: int = DEFAULT_BYTES

    def check(self, nbytes: float, field: str, what: str) -> None:
        """Raise ProblemError naming ``field`` when ``nbytes`` for ``what`` do not fit."""
        if nbytes > self.bytes:
            raise ProblemError(field, f"planning would need about {_gb(nbytes)} for {what}, more than the "
                               f"planner's memory budget of {_gb(self.bytes)}; reduce this field")

    def candidates(self, share: float = 0.25) -> int:
        """How many candidates one chunk of the Pareto programme may hold."""
        return max(1024, int(self.bytes * share / CANDIDATE_BYTES))


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"
