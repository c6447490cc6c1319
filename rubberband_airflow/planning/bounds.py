"""How many instances a stage can use: the bounds that keep the planner's search small (section 5).

A stage of n trials on slots of g GPUs (floor(G / g) per instance) starts every trial in its first
wave on ceil(n / floor(G / g)) instances; more instances only idle, unless they are carried into
a later stage that can use them. On the noise-free model, cutting a plan's counts down to these
bounds keeps every stage's duration (the cut instances are the youngest, which are ready last and
take no trial) and never launches more, so no plan above the bounds beats the one cut to them.

The bounds of the stages from ``first`` on depend only on those stages, so a re-planning of the
remaining stages of a run uses the same bounds, entering its live fleet through ``fold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rubberband_airflow.planning.problem import InstanceType, Problem


@dataclass(frozen=True)
class UsableInstances:
    """Per stage (from ``first``), the most instances worth having live."""

    first: int  # 0-based index of the first stage these bounds cover
    gpus: list[int]  # GPU options per trial on the instance type
    per_option: np.ndarray  # (stages, len(gpus)): most instances stage i uses with option k, carrying included
    live: np.ndarray  # (stages + 1,): most instances worth keeping live into stage i; 0 after the last
    overhead: float  # stage overhead h: what each surplus instance costs before it is released

    def fold(self, stage: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """States for instances live after ``stage`` (relative index), and the instance-seconds the surplus costs.

        Instances beyond what the later stages can use are released at the next stage's start,
        after its overhead, whatever the plan; so such states share a future, and only their
        extra cost tells them apart. After the last stage nothing is folded (final counts are
        told apart by the simulator's billing).
        """
        counts = np.asarray(counts, dtype=np.int64)
        if stage + 1 >= len(self.per_option):
            return counts, np.zeros(counts.shape)
        cap = int(self.live[stage + 1])
        return np.minimum(counts, cap), np.maximum(counts - cap, 0) * self.overhead


def usable_instances(problem: Problem, itype: InstanceType, first: int = 0) -> UsableInstances:
    """The bounds for the stages ``first``.. of the problem on one instance type."""
    gpus = problem.gpu_options(itype)
    slots = np.array([itype.gpus // g for g in gpus], dtype=np.int64)
    stages = problem.num_stages - first
    trials = np.array([problem.sha.trials(first + i + 1) for i in range(stages)], dtype=np.int64)
    occupy = -(-trials[:, None] // slots[None, :])
    if first == 0:  # a re-plan's first stage may add instances ready before live ones still booting
        occupy[0] += _waiting(problem, itype)
    occupy = np.minimum(occupy, itype.max_instances)
    live = np.zeros(stages + 1, dtype=np.int64)
    per_option = np.empty_like(occupy)
    for i in range(stages - 1, -1, -1):
        per_option[i] = np.maximum(occupy[i], live[i + 1])
        live[i] = per_option[i].max()
    return UsableInstances(first, gpus, per_option, live, problem.workload.stage_overhead_seconds)


def _waiting(problem: Problem, itype: InstanceType) -> int:
    """The live instances of a run in flight (section 7), if any of them is not ready when its first
    stage starts: new instances (requested after all of them) may then be ready first."""
    if problem.start is None:
        return 0
    start = problem.start.elapsed_seconds + problem.workload.stage_overhead_seconds
    carried = problem.carried(itype)
    return len(carried) if any(x.ready_at_seconds > start for x in carried) else 0
