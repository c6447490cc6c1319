"""Trainables for tests: ones that misbehave, and a probe of data-parallel training."""

import os
import time

from rubberband_airflow.trainable import TrialContext
from rubberband_airflow.workloads import digits


def raises(ctx: TrialContext) -> None:
    raise ValueError("the learning rate is not a learning rate")


def killed(ctx: TrialContext) -> None:
    """Killed as the kernel's out-of-memory killer kills a process: SIGKILL, no word."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def nan_metric(ctx: TrialContext) -> None:
    ctx.report(ctx.stop_epoch, loss=float("nan"), accuracy=0.1)


def hangs(ctx: TrialContext) -> None:
    time.sleep(3600)


def no_metric(ctx: TrialContext) -> None:
    ctx.report(ctx.stop_epoch, loss=1.0)


def ddp_probe(ctx: TrialContext) -> None:
    """Train the digits model, then record this rank's process and a checksum of its weights."""
    import torch
    import torch.distributed as dist

    digits.train(ctx)
    state = ctx.load_checkpoint() if ctx.is_chief else None
    model = digits._model(int(ctx.config["width"]), float(ctx.config["dropout"]))
    # Each rank rebuilds the same model after training through DDP: compare ranks' gradients
    # on one batch to see that they are synchronised.
    torch.manual_seed(ctx.rank)
    net = torch.nn.parallel.DistributedDataParallel(model)
    x, y = digits._data()[0][ctx.rank * 8:(ctx.rank + 1) * 8], digits._data()[1][ctx.rank * 8:(ctx.rank + 1) * 8]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(grad) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, grad)
    ctx.storage.write_json({"pid": os.getpid(), "rank": ctx.rank, "world_size": ctx.world_size,
                            "initialized": dist.is_initialized(), "backend": dist.get_backend(),
                            "grads_equal": all(torch.allclose(g, gathered[0]) for g in gathered),
                            "checkpoint_epoch": state["epoch"] if state else None},
                           "trials", ctx.trial_id, f"probe-rank-{ctx.rank}.json")


def slow(ctx: TrialContext) -> None:
    """Outlasts a short liveness window, then finishes."""
    time.sleep(float(os.environ.get("RUBBERBAND_TEST_SLOW_SECONDS", "15")))
    ctx.report(ctx.stop_epoch, loss=1.0, accuracy=0.5)


def chatty(ctx: TrialContext) -> None:
    """Writes far more to stderr than a pipe holds (warnings, progress bars), then finishes."""
    import sys

    for k in range(4000):
        print(f"warning {k}: " + "x" * 100, file=sys.stderr)
    ctx.report(ctx.stop_epoch, loss=1.0, accuracy=0.5)


def plain(ctx: TrialContext) -> None:
    """Plain Python (no torch): each epoch's accuracy follows from the learning rate."""
    for epoch in range(ctx.start_epoch + 1, ctx.stop_epoch + 1):
        ctx.report(epoch, loss=1.0 / epoch, accuracy=1.0 - float(ctx.config["lr"]) / epoch)


def steady(ctx: TrialContext) -> None:
    """A checkpointed trainable whose epochs take RUBBERBAND_TEST_EPOCH_SECONDS each: its state
    (one tensor) evolves deterministically, so a resumed trial's metrics equal an uninterrupted one's.
    Each epoch also reports the epoch its stage started from and the process that trained it."""
    import torch

    w = torch.tensor([1.0])
    if ctx.start_epoch > 0:
        w = ctx.load_checkpoint()["w"]
    for epoch in range(ctx.start_epoch, ctx.stop_epoch):
        time.sleep(float(os.environ.get("RUBBERBAND_TEST_EPOCH_SECONDS", "1")))
        w = w * (1.0 - float(ctx.config["lr"]))
        ctx.report(epoch + 1, loss=float(w), accuracy=1.0 - float(w), started_from=ctx.start_epoch,
                   pid=os.getpid())
        ctx.save_checkpoint({"w": w})


def sleepy(ctx: TrialContext) -> None:
    """Trains RUBBERBAND_TEST_EPOCH_SECONDS per epoch (a later stage takes longer); hangs if the config says so."""
    if ctx.config.get("hang"):
        time.sleep(3600)
    per_epoch = float(os.environ.get("RUBBERBAND_TEST_EPOCH_SECONDS", "1"))
    for epoch in range(ctx.start_epoch + 1, ctx.stop_epoch + 1):
        time.sleep(per_epoch)
        ctx.report(epoch, loss=1.0 / epoch, accuracy=float(ctx.config["x"]) + epoch / 100)


def fails_first_try(ctx: TrialContext) -> None:
    """Plain Python, like ``plain``, but a trial fails the first RUBBERBAND_TEST_FAILS times (default 1)
    it runs a stage in RUBBERBAND_TEST_FAIL_STAGES (a marker file per trial, stage and failure in
    RUBBERBAND_TEST_MARKERS): a fault that is gone when the trial runs again. Each epoch it trains
    is logged to ``trained.log`` there, so that a test sees what was trained how often."""
    from pathlib import Path

    markers = Path(os.environ["RUBBERBAND_TEST_MARKERS"])
    stages = [int(s) for s in os.environ.get("RUBBERBAND_TEST_FAIL_STAGES", "").split(",") if s.strip()]
    if ctx.stage in stages:
        for k in range(int(os.environ.get("RUBBERBAND_TEST_FAILS", "1"))):
            marker = markers / f"{ctx.trial_id}-stage-{ctx.stage}-failure-{k}"
            if not marker.exists():
                marker.touch()
                raise RuntimeError(f"injected failure {k} of {ctx.trial_id} in stage {ctx.stage}")
    for epoch in range(ctx.start_epoch + 1, ctx.stop_epoch + 1):
        with open(markers / "trained.log", "a") as f:
            f.write(f"{ctx.trial_id} {epoch}\n")
        ctx.report(epoch, loss=1.0 / epoch, accuracy=1.0 - float(ctx.config["lr"]) / epoch)
