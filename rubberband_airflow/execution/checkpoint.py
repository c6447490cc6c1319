"""A trial's checkpoint: one object, ``trials/<trial>/checkpoint.pt``, that says which trial and
epoch it was taken at, ahead of the state itself.

Layout: a magic line, one line of JSON (trial, epoch, stage, time, the state's size and SHA-256),
then the state as ``torch.save`` wrote it. The header is written with the state in one atomic
write, so the epoch it names is always the state's own; it is read without torch (a range
read of the first bytes), which is how the runner tells from which epoch a lost trial resumes.
A state is loaded with ``torch.load(weights_only=True)``, which is safe on torch >= 2.6 only.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from rubberband_airflow.execution.storage import RunStorage

MAGIC = b"RUBBERBAND-CHECKPOINT 1\n"
HEADER_MAX = 4096  # bytes: the magic line and the JSON header fit in this
MIN_TORCH = (2, 6)  # torch.load(weights_only=True) is safe from this version on


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: unreadable, corrupt, another trial's, or from the future."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says."""

    trial: str
    epoch: int  # epochs trained in total when it was taken
    stage: int
    time: float
    size: int
    sha256: str


def path(trial: str) -> tuple[str, ...]:
    return ("trials", trial, "checkpoint.pt")


def encode(trial: str, epoch: int, stage: int, payload: bytes) -> bytes:
    """The checkpoint object: header and state."""
    header = {"trial": trial, "epoch": int(epoch), "stage": int(stage), "time": time.time(), "size": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode_header(trial: str, data: bytes) -> tuple[CheckpointInfo, int]:
    """The header of a checkpoint object (or its first bytes), and where the state starts."""
    if not data.startswith(MAGIC):
        raise CheckpointError(f"the checkpoint of {trial} is corrupt or not RubberBand's: it lacks the header "
                              f"a checkpoint starts with")
    end = data.find(b"\n", len(MAGIC))
    try:
        if end < 0:
            raise ValueError("the header line does not end")
        raw = json.loads(data[len(MAGIC):end])
        info = CheckpointInfo(str(raw["trial"]), int(raw["epoch"]), int(raw["stage"]), float(raw["time"]),
                              int(raw["size"]), str(raw["sha256"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the checkpoint of {trial} is corrupt: its header is unreadable ({e})") from None
    if info.trial != trial:
        raise CheckpointError(f"the checkpoint in {trial}'s folder belongs to {info.trial}: not resumed")
    return info, end + 1


def read_info(storage: RunStorage, trial: str) -> CheckpointInfo | None:
    """The header of a trial's checkpoint (its first bytes only), or None if it has none."""
    try:
        data = storage.fs.cat_file(storage.path(*path(trial)), start=0, end=HEADER_MAX)
    except FileNotFoundError:
        return None
    return decode_header(trial, data)[0]


def read(storage: RunStorage, trial: str) -> tuple[CheckpointInfo, bytes] | None:
    """A trial's checkpoint header and its state's bytes, checked whole; None if it has none."""
    data = storage.read_bytes(*path(trial))
    if data is None:
        return None
    info, start = decode_header(trial, data)
    payload = data[start:]
    if len(payload) != info.size or hashlib.sha256(payload).hexdigest() != info.sha256:
        raise CheckpointError(f"the checkpoint of {trial} (epoch {info.epoch}) is corrupt: its state is "
                              f"{len(payload)} bytes that do not match the {info.size} its header records")
    return info, payload


def resume_epoch(info: CheckpointInfo | None, trial: str, start: int, stop: int) -> int:
    """The epoch a trial's stage starts from: its checkpoint's, which must lie between the
    assignment's ``start`` and ``stop`` epochs (inside the stage when the trial was interrupted);
    ``start`` for a trial without one (a trainable that keeps no state must start from it)."""
    if info is None:
        return start
    if info.epoch > stop:
        raise CheckpointError(f"the checkpoint of {trial} was taken at epoch {info.epoch}, after this stage's last "
                              f"epoch {stop}: a checkpoint from the future is not resumed")
    if info.epoch < start:
        raise CheckpointError(f"the checkpoint of {trial} was taken at epoch {info.epoch}, before this stage's "
                              f"first epoch {start}: the stage before did not save its last epoch")
    return info.epoch


def require_safe_torch(version: str) -> None:
    """Refuse to load a checkpoint with a torch whose ``torch.load`` is not safe (before 2.6)."""
    parts = version.split("+")[0].split(".")
    try:
        found = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        raise CheckpointError(f"cannot tell torch's version from {version!r}: loading a checkpoint needs torch "
                              f">= {MIN_TORCH[0]}.{MIN_TORCH[1]}") from None
    if found < MIN_TORCH:
        raise CheckpointError(f"loading a checkpoint needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (a safe "
                              f"torch.load); this worker has torch {version}")


def load_state(payload: bytes, device: str, torch: Any) -> Any:
    """The state a checkpoint holds, loaded safely (tensors, numbers, strings, lists and dicts only)."""
    import io

    require_safe_torch(str(torch.__version__))
    try:
        return torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad pickle
        raise CheckpointError(f"the checkpoint's state cannot be loaded safely: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
