"""A synthetic workload for scale and fidelity runs: its epochs sleep, they do not compute.

An epoch of a trial on ``g`` GPUs sleeps ``epoch_seconds * (serial + (1 - serial) / g)`` (the
scaling curve t(g) = a + b / g the planner fits), times the trial's straggler factor: a
log-normal draw with sigma ``noise`` fixed by the trial's seed, the same in every stage (the
planning model's straggler noise). The loss is the squared distance of the configuration
``(x, y)`` to ``OPTIMUM`` plus a term that shrinks with the epochs trained, so successive
halving ranks trials the same way in every stage and the best configuration of a run is known
in advance: the sampled one nearest ``OPTIMUM`` (``best_config``). It saves a real checkpoint
after every epoch (the trial's checkpoint object, header and all, so the worker resumes it as
any other) and resumes from it; its state is JSON, so a trial runs without torch (an import of
seconds of CPU and hundreds of MB, too much for hundreds of trials on one machine).

The curve's parameters are module defaults; a spec may fix them per run with one-value
``choice`` parameters (``epoch_seconds``, ``serial``, ``noise``) in its search space. Two more
make the workload deviate from its profile mid-run, as a real one may: from stage
``slowdown_from_stage`` (default 2) on, every epoch takes ``slowdown`` times as long (default 1;
1.5 is 50% slower, 0.5 twice as fast).
``COMPUTES = False`` lets a local backend declare more slots than the machine has cores for it
(``backend.oversubscribe``): a sleeping trial does not slow the others down.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

from rubberband_airflow.execution import checkpoint
from rubberband_airflow.trainable import TrialContext, TrialFailed, patiently

SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "x": {"type": "uniform", "low": 0.0, "high": 1.0},
    "y": {"type": "uniform", "low": 0.0, "high": 1.0},
}
METRIC, MODE = "loss", "min"
OPTIMUM = {"x": 0.3, "y": 0.7}
EPOCH_SECONDS = 1.0  # one epoch on one GPU
SERIAL = 0.2  # the part of an epoch more GPUs do not shorten
NOISE = 0.0  # sigma of the log-normal straggler factor per trial
COMPUTES = False


def curve(config: dict[str, Any]) -> tuple[float, float, float]:
    """``(epoch_seconds, serial, noise)`` of a configuration: its fixed values or the defaults."""
    return (float(config.get("epoch_seconds", EPOCH_SECONDS)), float(config.get("serial", SERIAL)),
            float(config.get("noise", NOISE)))


def slowdown(config: dict[str, Any], stage: int) -> float:
    """The factor on a stage's epoch times: ``slowdown`` from stage ``slowdown_from_stage`` on, else 1."""
    factor = float(config.get("slowdown", 1.0))
    if not math.isfinite(factor) or factor <= 0:
        raise TrialFailed(f"slowdown must be a positive number, got {config.get('slowdown')!r}")
    return factor if stage >= int(config.get("slowdown_from_stage", 2)) else 1.0


def epoch_seconds(gpus: int, epoch_1: float = EPOCH_SECONDS, serial: float = SERIAL) -> float:
    """Seconds of one epoch on ``gpus`` GPUs, before the straggler factor."""
    return epoch_1 * (serial + (1.0 - serial) / gpus)


def distance(config: dict[str, Any]) -> float:
    """Squared distance of a configuration to ``OPTIMUM``: what its loss converges to."""
    return sum((float(config[k]) - v) ** 2 for k, v in OPTIMUM.items())


def loss(config: dict[str, Any], epoch: int) -> float:
    """The loss after ``epoch`` epochs: falls with the epochs, ranked by the distance at every epoch."""
    return distance(config) + 1.0 / (1.0 + epoch)


def best_config(configs: dict[str, dict[str, Any]]) -> str:
    """The trial (of ``{trial: config}``) a run must find: the one nearest ``OPTIMUM`` (ties by id)."""
    return min(sorted(configs), key=lambda t: distance(configs[t]))


def train(ctx: TrialContext) -> None:
    """Sleep through epochs ``ctx.start_epoch`` to ``ctx.stop_epoch``, reporting and checkpointing each."""
    epoch_1, serial, noise = curve(ctx.config)
    straggler = math.exp(random.Random(ctx.seed).gauss(0.0, noise)) if noise > 0 else 1.0
    per_epoch = epoch_seconds(ctx.world_size, epoch_1, serial) * straggler * slowdown(ctx.config, ctx.stage)
    if ctx.start_epoch > 0:
        state = load_state(ctx)
        if state is None or int(state["epoch"]) != ctx.start_epoch:
            raise TrialFailed(f"trial {ctx.trial_id} should resume at epoch {ctx.start_epoch}, its checkpoint "
                              f"holds {state}")
    for epoch in range(ctx.start_epoch, ctx.stop_epoch):
        time.sleep(per_epoch)
        ctx.report(epoch + 1, **{METRIC: loss(ctx.config, epoch + 1)}, epoch_seconds=per_epoch)
        save_state(ctx, {"epoch": epoch + 1, "x": float(ctx.config["x"]), "y": float(ctx.config["y"])})


def save_state(ctx: TrialContext, state: dict[str, Any]) -> None:
    """The trial's checkpoint at ``state["epoch"]``, its state as JSON (rank 0 only)."""
    if ctx.is_chief:
        payload = json.dumps(state, sort_keys=True).encode()
        data = checkpoint.encode(ctx.trial_id, int(state["epoch"]), ctx.stage, payload)
        patiently(lambda: ctx.storage.write_bytes(data, *checkpoint.path(ctx.trial_id)), "writing the checkpoint")


def load_state(ctx: TrialContext) -> dict[str, Any] | None:
    """The state of the trial's last checkpoint (checked whole), or None if it has none."""
    try:
        found = checkpoint.read(ctx.storage, ctx.trial_id)
    except checkpoint.CheckpointError as e:
        raise TrialFailed(str(e)) from None
    return None if found is None else json.loads(found[1])


def profile(gpus: int, epoch_1: float = EPOCH_SECONDS, serial: float = SERIAL, noise: float = NOISE, *,
            trial_overhead_seconds: float, stage_overhead_seconds: float, instance_type: str = "local-sleep",
            pending_seconds: float = 0.0, boot_seconds: float = 0.0) -> dict[str, Any]:
    """The profile (docs/profiling.md) of this workload on ``gpus``-slot instances: its epoch
    times are known rather than measured; the overheads are this deployment's, measured."""
    g, measured = 1, {}
    while g <= gpus:
        measured[str(g)] = epoch_seconds(g, epoch_1, serial)
        g *= 2
    return {"trainable": "rubberband_airflow.workloads.synthetic:train", "metric": METRIC,
            "epoch_seconds_measured": measured, "scaling_fit": {"a": epoch_1 * serial, "b": epoch_1 * (1 - serial),
                                                                "model": "a + b / g"},
            "trial_overhead_seconds": trial_overhead_seconds, "straggler_sigma": noise, "checkpoint_gb": 0.0,
            "stage_overhead_seconds": stage_overhead_seconds,
            "instance_type": {"name": instance_type, "gpus": gpus, "pending_seconds": pending_seconds,
                              "boot_seconds": boot_seconds, "pending_sigma": 0.0}}
