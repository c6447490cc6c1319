"""The trainable API: what a user writes to train one trial, and what it is given.

A trainable is a plain function ``train(ctx: TrialContext) -> None`` named by its import path,
for example ``"rubberband_airflow.workloads.digits:train"``. For one stage of one trial it is
called once per worker process (``ctx.world_size`` of them, co-located on one instance), and it:

1. reads its hyperparameters from ``ctx.config``;
2. restores ``ctx.load_checkpoint()`` when ``ctx.start_epoch > 0``;
3. trains epochs ``ctx.start_epoch`` up to (not including) ``ctx.stop_epoch``, calling
   ``ctx.report(epoch, **metrics)`` after each one and ``ctx.save_checkpoint(state)`` to keep
   its progress (the checkpoint records the epoch last reported);
4. returns. Raising, or reporting a NaN metric, fails the trial with the reason recorded.

With ``world_size > 1`` the process group is already set up (gloo on CPU, nccl on GPU);
``ctx.device`` is this worker's device. Only rank 0's reports and checkpoints are stored.

``ctx.start_epoch`` is where the trial's last checkpoint was taken: the stage's first epoch, or
an epoch inside the stage when the trial resumes after its instance was lost. The worker checks
the checkpoint before the trainable runs (this trial's, not from after the stage, intact), so
"resume from ``start_epoch``" is all a trainable does.

On a spot instance about to be interrupted, ``ctx.interrupted`` turns true and the next
``ctx.save_checkpoint`` ends the trial's run there (it resumes from that checkpoint elsewhere):
a trainable that checkpoints only every few epochs should also checkpoint when it is true.
"""

from __future__ import annotations

import importlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rubberband_airflow.execution import backoff, checkpoint, interruption
from rubberband_airflow.execution.storage import RunStorage

# How long a trial's process tries a read or write of run storage again before the trial fails
# (its time limit, which the agent enforces, may end it sooner).
STORAGE_PATIENCE_SECONDS = 300.0
T = TypeVar("T")


def patiently(call: Callable[[], T], what: str) -> T:
    """``call()``, tried again through a storage error burst (see ``backoff.retry``)."""
    return backoff.retry(call, what, STORAGE_PATIENCE_SECONDS)


class TrialFailed(RuntimeError):
    """The trial cannot go on (for example a NaN metric); the message is recorded as the reason."""


@dataclass
class TrialContext:
    trial_id: str
    config: dict[str, Any]
    start_epoch: int
    stop_epoch: int
    rank: int
    world_size: int
    device: str
    seed: int
    stage: int
    storage: RunStorage = field(repr=False)
    reports: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def interrupted(self) -> bool:
        """Whether the instance is about to be interrupted: checkpoint now, the trial resumes elsewhere."""
        return interruption.requested()

    def load_checkpoint(self) -> Any | None:
        """The state of this trial's last checkpoint (taken at ``start_epoch`` when the stage
        begins), or None if it has none. Loaded with ``torch.load(weights_only=True)``: torch >= 2.6."""
        import torch

        try:
            found = patiently(lambda: checkpoint.read(self.storage, self.trial_id), "reading the checkpoint")
            if found is None:
                return None
            info, payload = found
            checkpoint.resume_epoch(info, self.trial_id, 0, self.stop_epoch)  # never one from the future
            return checkpoint.load_state(payload, self.device, torch)
        except checkpoint.CheckpointError as e:
            raise TrialFailed(str(e)) from None

    def save_checkpoint(self, state: Any, epoch: int | None = None) -> None:
        """Store the trial's state (tensors, numbers, dicts) after ``epoch`` epochs in total (by
        default the epoch last reported), so the trial resumes from it: when promoted, or when its
        instance is lost mid-stage. Once the instance is about to be interrupted, the trial's run
        stops here (``interruption.TrialInterrupted``), its state saved."""
        if epoch is None:
            if not self.reports:
                raise TrialFailed("save_checkpoint needs the epoch it is taken at: report the epoch first, "
                                  "or pass epoch=")
            epoch = int(self.reports[-1]["epoch"])
        if not self.start_epoch <= epoch <= self.stop_epoch:
            raise TrialFailed(f"a checkpoint at epoch {epoch} is outside this stage's epochs "
                              f"{self.start_epoch} to {self.stop_epoch}")
        if self.is_chief:
            import torch

            buf = io.BytesIO()
            torch.save(state, buf)
            data = checkpoint.encode(self.trial_id, epoch, self.stage, buf.getvalue())
            patiently(lambda: self.storage.write_bytes(data, *checkpoint.path(self.trial_id)),
                      "writing the checkpoint")
        if self.interrupted and epoch < self.stop_epoch:
            raise interruption.TrialInterrupted(f"{self.trial_id} stopped at its checkpoint of epoch {epoch}: "
                                                "the instance is being interrupted")

    def report(self, epoch: int, **metrics: float) -> None:
        """Record the metrics after ``epoch`` epochs in total; a NaN or infinite value fails the trial."""
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise TrialFailed(f"metric {bad[0]} is {values[bad[0]]} at epoch {epoch}")
        record = {"epoch": int(epoch), "stage": self.stage, "time": time.time(), **values}
        self.reports.append(record)
        if self.is_chief:
            patiently(lambda: self.storage.append_metrics(self.trial_id, record), "writing the metrics")


def computes(ref: str) -> bool:
    """Whether a trainable computes: True unless its module sets ``COMPUTES = False`` (or cannot be
    imported here, where nothing tells it does not). One that does not needs no core of its own,
    nor torch in its worker."""
    try:
        module = importlib.import_module(ref.partition(":")[0])
    except Exception:  # noqa: BLE001 - a module that fails to import here is assumed to compute
        return True
    return getattr(module, "COMPUTES", True) is not False


def load_trainable(ref: str) -> Callable[[TrialContext], Any]:
    """Import ``"package.module:function"``; errors say what is wrong with the reference."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"trainable must look like 'package.module:function', got {ref!r}")
    module = importlib.import_module(module_name)
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"trainable {ref!r}: module {module_name} has no {attr}") from None
    if not callable(fn):
        raise ValueError(f"trainable {ref!r} is not callable")
    return fn
