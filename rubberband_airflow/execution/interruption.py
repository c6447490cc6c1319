"""A trial's side of a spot interruption: the agent's SIGUSR1 asks it to stop at its next checkpoint.

The worker (and each of its rank processes) calls ``install`` before the trainable runs. After
the signal, ``TrialContext.interrupted`` is true (a trainable that checkpoints only now and then
checkpoints at its next epoch) and ``TrialContext.save_checkpoint`` raises ``TrialInterrupted``
once the checkpoint is written; the worker then exits without a result, and the trial resumes
from that checkpoint on another instance.
"""

from __future__ import annotations

import signal
from typing import Any

SIGNAL = signal.SIGUSR1
_requested = False


class TrialInterrupted(BaseException):
    """The instance is being interrupted and the trial's progress is checkpointed: stop here.

    A BaseException, so that a trainable's ``except Exception`` does not swallow it."""


def install() -> None:
    """Note the agent's request to stop at the next checkpoint, instead of dying of the signal."""
    signal.signal(SIGNAL, _on_signal)


def _on_signal(*_: Any) -> None:
    global _requested
    _requested = True


def requested() -> bool:
    """Whether this process was asked to stop at its next checkpoint."""
    return _requested
