"""Coarse-to-fine instance counts, for problems where the exact programme is too large (section 5).

The coarse grid keeps, per stage and GPU option, the counts where the stage's makespan steps
down (the fewest instances that run its trials in w waves, for every w), a geometric ladder for
carrying instances between stages, and every small count. The fine pass adds every count near
the coarse plan's. Grid sizes grow with the square root of the trials and the logarithm of the
quota, not with their product.
"""

from __future__ import annotations

import numpy as np

from rubberband_airflow.planning.bounds import UsableInstances
from rubberband_airflow.planning.frontier import Counts
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import InstanceType, Problem

# Every count up to this one is in the coarse grid.
_SMALL = 16
# Ratio of the geometric ladder of the coarse grid.
_LADDER = 1.08
# The fine pass adds every count within this factor of the coarse plan's count of each stage.
_NEAR = 1.25


def coarse_counts(problem: Problem, itype: InstanceType, bounds: UsableInstances) -> Counts:
    """Per stage and GPU option: wave counts, a geometric ladder and small counts, within the bounds."""
    top = int(bounds.live.max())
    ladder = np.unique(np.round(_LADDER ** np.arange(int(np.log(max(top, 2)) / np.log(_LADDER)) + 2)))
    base = np.union1d(np.arange(1, _SMALL + 1), ladder.astype(np.int64))
    later = np.zeros(0, dtype=np.int64)  # wave counts of the later stages, worth carrying into them
    stages = []
    for i in range(len(bounds.per_option) - 1, -1, -1):
        n = problem.sha.trials(bounds.first + i + 1)
        waves = np.unique(np.concatenate([-(-n // (np.arange(1, -(-n // s) + 1) * s))
                                          for s in (itype.gpus // g for g in bounds.gpus)]))
        later = np.union1d(later, waves)
        stages.append([_within(np.union1d(base, later), int(cap)) for cap in bounds.per_option[i]])
    return stages[::-1]


def refined_counts(coarse: Counts, bounds: UsableInstances, plan: Plan) -> Counts:
    """The coarse counts plus every count near the plan's counts (of any stage, so that instances
    can be carried between stages), for every stage and GPU option."""
    near = np.unique(np.concatenate([np.arange(max(1, int(s.instances / _NEAR)), int(np.ceil(s.instances * _NEAR)) + 2)
                                     for s in plan.stages[bounds.first:]]))
    return [[_within(np.union1d(counts, near), int(cap)) for counts, cap in zip(coarse[i], bounds.per_option[i])]
            for i in range(len(coarse))]


def _within(counts: np.ndarray, cap: int) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    return counts[(counts >= 1) & (counts <= cap)]
