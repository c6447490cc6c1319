"""The planning problem of docs/planning-model.md section 2: models and validation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.start import LiveInstance, Start
from rubberband_airflow.planning.validation import Reader, gpu_count, kind, number


@dataclass(frozen=True)
class SHA:
    """Synchronous successive halving: n1 trials, reduction factor eta, r1 epochs in stage 1."""

    num_trials: int
    eta: int
    min_epochs: int
    num_stages: int | None = None
    done: int = 0  # stages already run: a re-plan's stages 1.. are the job's stages done+1..

    @property
    def stages(self) -> int:
        """Stages still to run (all S of section 1 unless some are ``done``)."""
        total = self.num_stages if self.num_stages is not None else max_stages(self.num_trials, self.eta)
        return total - self.done

    def trials(self, i: int) -> int:
        """Trials in stage i (1-based, counted after the ``done`` stages)."""
        return max(1, self.num_trials // self.eta ** (i + self.done - 1))

    def epochs(self, i: int) -> int:
        """Cumulative epochs at the end of stage i (1-based, after the ``done`` stages); r_0 = 0."""
        return 0 if i + self.done == 0 else self.min_epochs * self.eta ** (i + self.done - 1)

    def new_epochs(self, i: int) -> int:
        """Epochs each trial trains in stage i: d_i = r_i - r_(i-1)."""
        return self.epochs(i) - self.epochs(i - 1)


def max_stages(num_trials: int, eta: int) -> int:
    """Largest S with floor(n1 / eta^(S-1)) >= 1."""
    s = 1
    while num_trials // eta**s >= 1:
        s += 1
    return s


@dataclass(frozen=True)
class Workload:
    epoch_seconds: dict[int, float]
    trial_overhead_seconds: float
    stage_overhead_seconds: float
    straggler_sigma: float = 0.0
    checkpoint_gb: float = 0.0
    teardown_seconds: float = 0.0  # the last result to the termination of the instances still live


MARKETS = ("on-demand", "spot")
# A spot offer of an instance type named X is named X + SPOT_SUFFIX; the two are one family, and a
# plan on either may launch a stage's instances in the other market (section 3).
SPOT_SUFFIX = ":spot"


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpus: int
    price_per_hour: float
    pending_seconds: float
    boot_seconds: float
    pending_sigma: float = 0.0
    max_instances: int = 16
    market: str = "on-demand"  # "spot": its instances may be interrupted (section 4.1)
    interruptions_per_hour: float = 0.0  # per spot instance-hour

    def interruption_seconds(self, epoch_seconds: float, trial_overhead_seconds: float) -> float:
        """What one interruption costs a trial on it: the work since its last checkpoint (half an
        epoch on average; trials checkpoint every epoch), its restart, and a replacement's launch."""
        return epoch_seconds / 2.0 + trial_overhead_seconds + self.pending_seconds + self.boot_seconds

    def interrupted_seconds(self, seconds: float, epoch_seconds: float, trial_overhead_seconds: float) -> float:
        """The expected duration of a trial of ``seconds`` on it, interruptions included (section 4.1)."""
        per = self.interruption_seconds(epoch_seconds, trial_overhead_seconds)
        return seconds * (1.0 + self.interruptions_per_hour / 3600.0 * per)


@dataclass(frozen=True)
class Billing:
    minimum_seconds: float = 60.0
    increment_seconds: float = 1.0
    data_price_per_gb: float = 0.0


# Samples by default where an instance type is interruptible: interruptions are rare, and the
# cheapest of many plans judged on 256 samples meets the quantile on those but 1 to 4 points less
# often on others (docs/benchmarks.md, "Spot against on-demand").
SPOT_SAMPLES = 1024


@dataclass(frozen=True)
class PlannerSettings:
    jct_quantile: float = 0.95
    samples: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Problem:
    sha: SHA
    workload: Workload
    instance_types: tuple[InstanceType, ...]
    deadline_seconds: float
    billing: Billing = field(default_factory=Billing)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    start: Start | None = None  # a run in flight (section 7); None: the job starts at 0 with no fleet

    @property
    def num_stages(self) -> int:
        return self.sha.stages

    @property
    def deterministic(self) -> bool:
        """True when no noise is modelled: every Monte Carlo sample is the same run."""
        return self.workload.straggler_sigma == 0 and all(
            t.pending_sigma == 0 and t.interruptions_per_hour == 0 for t in self.instance_types)

    def instance_type(self, name: str) -> InstanceType:
        for t in self.instance_types:
            if t.name == name:
                return t
        raise ProblemError("instance_type", f"unknown instance type {name!r}; the problem has "
                           f"{', '.join(t.name for t in self.instance_types)}")

    def twin(self, itype: InstanceType) -> InstanceType | None:
        """The same instance type in the other market (X and X:spot, with the same GPUs), if offered."""
        name = itype.name[:-len(SPOT_SUFFIX)] if itype.name.endswith(SPOT_SUFFIX) else itype.name + SPOT_SUFFIX
        other = next((t for t in self.instance_types if t.name == name), None)
        return other if other is not None and other.gpus == itype.gpus and other.market != itype.market else None

    def offer(self, itype: InstanceType, market: str | None) -> InstanceType:
        """The offer a stage of a plan on ``itype`` launches in: itself, or its twin in ``market``."""
        if market is None or market == itype.market:
            return itype
        other = self.twin(itype)
        if other is None:
            raise ProblemError("market", f"the problem offers no {market} {itype.name.removesuffix(SPOT_SUFFIX)}")
        return other

    def buys(self, market: str) -> bool:
        """Whether new instances may be bought in the market (a run in flight may say not: EC2
        refused its spot capacity)."""
        return self.start is None or self.start.buy is None or market in self.start.buy

    def family(self, itype: InstanceType) -> tuple[str, ...]:
        """The names of the instance type and its twin: a plan on it keeps the live instances of both."""
        other = self.twin(itype)
        return (itype.name,) if other is None else (itype.name, other.name)

    def gpu_options(self, itype: InstanceType) -> list[int]:
        """GPUs per trial allowed on this instance type: profiled g that fit on one instance."""
        return sorted(g for g in self.workload.epoch_seconds if g <= itype.gpus)

    def data_cost(self) -> float:
        """Data movement cost: every promoted trial restores its checkpoint once per later stage."""
        restores = sum(self.sha.trials(i) for i in range(max(1, 2 - self.sha.done), self.num_stages + 1))
        return self.billing.data_price_per_gb * self.workload.checkpoint_gb * restores

    def carried(self, itype: InstanceType) -> tuple[LiveInstance, ...]:
        """The live instances of this type a plan on it starts with, oldest first."""
        names = self.family(itype)
        return () if self.start is None else tuple(x for x in self.start.live if x.instance_type in names)

    def fixed_cost(self, itype: InstanceType) -> float:
        """Cost every plan on this type pays whatever it does: what a run in flight spent, and its
        live instances of other types (not of its family), billed until they are released at the
        first stage's start."""
        if self.start is None:
            return 0.0
        release = self.start.elapsed_seconds + self.workload.stage_overhead_seconds
        names = self.family(itype)
        others = [(self.instance_type(x.instance_type).price_per_hour, x.running_at_seconds)
                  for x in self.start.live if x.instance_type not in names]
        billed = [price / 3600.0 * float(billed_seconds(running, release, self.billing.minimum_seconds,
                                                        self.billing.increment_seconds))
                  for price, running in others]
        return self.start.spent_usd + sum(billed)

    def to_dict(self) -> dict[str, Any]:
        w = self.workload
        return {
            "sha": {"num_trials": self.sha.num_trials, "eta": self.sha.eta, "min_epochs": self.sha.min_epochs,
                    "num_stages": self.sha.num_stages},
            "workload": {"epoch_seconds": {str(g): s for g, s in sorted(w.epoch_seconds.items())},
                         "trial_overhead_seconds": w.trial_overhead_seconds,
                         "stage_overhead_seconds": w.stage_overhead_seconds,
                         "straggler_sigma": w.straggler_sigma, "checkpoint_gb": w.checkpoint_gb,
                         **({"teardown_seconds": w.teardown_seconds} if w.teardown_seconds else {})},
            "instance_types": [_type_dict(t) for t in self.instance_types],
            "billing": dict(self.billing.__dict__),
            "deadline_seconds": self.deadline_seconds,
            "planner": dict(self.planner.__dict__),
        }


def _type_dict(t: InstanceType) -> dict[str, Any]:
    """An instance type's JSON; the market fields only for a spot type (on-demand problems read as before)."""
    out = dict(t.__dict__)
    if t.market == "on-demand":
        del out["market"], out["interruptions_per_hour"]
    return out


def parse_problem(data: Any) -> Problem:
    """Build a Problem from its JSON form, raising ProblemError naming the first bad field."""
    top = Reader(data, "")

    r = Reader(top.raw("sha"), "sha")
    num_trials = r.integer("num_trials", minimum=1)
    eta = r.integer("eta", minimum=2)
    min_epochs = r.integer("min_epochs", minimum=1)
    limit = max_stages(num_trials, eta)
    num_stages = r.integer("num_stages", None, minimum=1, maximum=limit, nullable=True)
    r.done()
    sha = SHA(num_trials, eta, min_epochs, num_stages)

    r = Reader(top.raw("workload"), "workload")
    raw_curve = r.raw("epoch_seconds")
    if not isinstance(raw_curve, Mapping) or not raw_curve:
        raise ProblemError("workload.epoch_seconds", f"must be a non-empty object of GPU count to seconds, "
                           f"got {kind(raw_curve)}")
    curve: dict[int, float] = {}
    for key, seconds in raw_curve.items():
        name = f"workload.epoch_seconds.{key}"
        g = gpu_count(key, name)
        if g in curve:
            raise ProblemError(name, f"GPU count {g} is given twice")
        curve[g] = number(seconds, name, positive=True)
    workload = Workload(
        epoch_seconds=dict(sorted(curve.items())),
        trial_overhead_seconds=r.number("trial_overhead_seconds"),
        stage_overhead_seconds=r.number("stage_overhead_seconds"),
        straggler_sigma=r.number("straggler_sigma", 0.0, at_most=5.0),
        checkpoint_gb=r.number("checkpoint_gb", 0.0),
        teardown_seconds=r.number("teardown_seconds", 0.0),
    )
    r.done()

    raw_types = top.raw("instance_types")
    if not isinstance(raw_types, list) or not raw_types:
        raise ProblemError("instance_types", f"must be a non-empty list, got {kind(raw_types)}")
    types: list[InstanceType] = []
    for k, raw in enumerate(raw_types):
        r = Reader(raw, f"instance_types[{k}]")
        t = InstanceType(
            name=r.string("name"),
            gpus=r.integer("gpus", minimum=1, maximum=1024),
            price_per_hour=r.number("price_per_hour", positive=True),
            pending_seconds=r.number("pending_seconds"),
            boot_seconds=r.number("boot_seconds"),
            pending_sigma=r.number("pending_sigma", 0.0, at_most=5.0),
            max_instances=r.integer("max_instances", 16, minimum=1, maximum=4096),
            market=r.string("market", "on-demand"),
            interruptions_per_hour=r.number("interruptions_per_hour", 0.0, at_most=3600.0),
        )
        r.done()
        if t.market not in MARKETS:
            raise ProblemError(f"instance_types[{k}].market", f"must be 'on-demand' or 'spot', got {t.market!r}")
        if t.interruptions_per_hour > 0 and t.market != "spot":
            raise ProblemError(f"instance_types[{k}].interruptions_per_hour",
                               "only a spot instance type is interrupted: set market to 'spot'")
        if any(t.name == other.name for other in types):
            raise ProblemError(f"instance_types[{k}].name", f"instance type {t.name!r} is listed twice")
        types.append(t)
    if not any(g <= t.gpus for t in types for g in workload.epoch_seconds):
        raise ProblemError("workload.epoch_seconds", "no profiled GPU count fits on any instance type "
                           f"(smallest g is {min(workload.epoch_seconds)}, largest instance has "
                           f"{max(t.gpus for t in types)} GPUs)")

    deadline = top.number("deadline_seconds", positive=True)

    billing = parse_billing(top.raw("billing", {}))
    spot = any(t.interruptions_per_hour > 0 for t in types)
    planner = parse_planner(top.raw("planner", {}), samples=SPOT_SAMPLES if spot else PlannerSettings.samples)
    top.done()
    return Problem(sha, workload, tuple(types), deadline, billing, planner)


def parse_billing(data: Any, where: str = "billing") -> Billing:
    """The billing settings (each field may be left out for its default); errors name the field."""
    r = Reader(data, where)
    billing = Billing(
        minimum_seconds=r.number("minimum_seconds", 60.0),
        increment_seconds=r.number("increment_seconds", 1.0, positive=True),
        data_price_per_gb=r.number("data_price_per_gb", 0.0),
    )
    r.done()
    return billing


def parse_planner(data: Any, where: str = "planner", samples: int = PlannerSettings.samples) -> PlannerSettings:
    """The planner settings (each field may be left out for its default, ``samples`` that of the
    samples); errors name the field."""
    r = Reader(data, where)
    planner = PlannerSettings(
        jct_quantile=r.number("jct_quantile", 0.95, positive=True, at_most=1.0),
        samples=r.integer("samples", samples, minimum=1, maximum=100_000),
        seed=r.integer("seed", 0, minimum=0),
    )
    r.done()
    return planner
