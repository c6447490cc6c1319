"""Checkpoints record the epoch they were taken at, and resume checks it (real digits training)."""

import pytest

from rubberband_airflow.execution import checkpoint, worker
from rubberband_airflow.execution.runner import RunSpec, start_run
from rubberband_airflow.execution.storage import RunStorage

CONFIG = {"lr": 0.05, "momentum": 0.9, "width": 32, "dropout": 0.1, "batch_size": 64, "weight_decay": 1e-4}


def _storage(tmp_path, name: str) -> RunStorage:
    storage = RunStorage(f"file://{tmp_path}/{name}")
    start_run(storage, RunSpec("rubberband_airflow.workloads.digits:train", "accuracy", "max", seed=5),
              [CONFIG, {**CONFIG, "lr": 0.1}], {"instance_type": "local", "stages": []}, 1)
    return storage


def _run(storage: RunStorage, instance: str, start: int, stop: int, trial: str = "trial-0000",
         stage: int = 1) -> dict:
    storage.write_assignment(stage, instance, [{"trial": trial, "gpus": 1, "start_epoch": start, "stop_epoch": stop}])
    # Each call stands for the trial on another instance after a loss, which leaves no result
    # behind (results are written once): the attempt before it is forgotten.
    storage.delete("trials", trial, f"stage-{stage}.json")
    worker.run_task(storage.uri, trial, stage, instance, [])
    return storage.read_result(trial, stage)


def test_a_trial_resumes_from_its_checkpoints_epoch_inside_the_stage(tmp_path):
    straight, lost = _storage(tmp_path, "straight"), _storage(tmp_path, "lost")
    assert _run(straight, "i0", 0, 4)["state"] == "done"
    # The trial trained 2 of its stage's 4 epochs, then its instance was lost: placed again on
    # another instance with the stage's assignment (0 to 4), it resumes at the checkpoint's epoch 2.
    _run(lost, "i0", 0, 2)
    assert checkpoint.read_info(lost, "trial-0000").epoch == 2
    before = lost.metrics("trial-0000")
    result = _run(lost, "i1", 0, 4)
    assert result["state"] == "done" and result["resumed_from_epoch"] == 2 and result["epoch"] == 4
    after = lost.metrics("trial-0000")
    assert after[:2] == before  # epochs 1 and 2 were not trained again
    assert [m["epoch"] for m in after] == [1, 2, 3, 4]
    for a, b in zip(straight.metrics("trial-0000"), after):  # and 3, 4 went on from the checkpoint
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["accuracy"] == pytest.approx(b["accuracy"])
    info = checkpoint.read_info(lost, "trial-0000")
    assert (info.trial, info.epoch, info.stage) == ("trial-0000", 4, 1)


def test_a_checkpoint_from_after_the_stage_is_a_clear_failure(tmp_path):
    storage = _storage(tmp_path, "future")
    _run(storage, "i0", 0, 4)
    result = _run(storage, "i1", 0, 2, stage=2)
    assert result["state"] == "failed"
    assert result["error"] == ("the checkpoint of trial-0000 was taken at epoch 4, after this stage's last epoch 2: "
                               "a checkpoint from the future is not resumed")


def test_a_corrupt_or_foreign_checkpoint_is_a_clear_failure(tmp_path):
    storage = _storage(tmp_path, "corrupt")
    _run(storage, "i0", 0, 2, trial="trial-0001")
    good = storage.read_bytes("trials", "trial-0001", "checkpoint.pt")
    path = ("trials", "trial-0000", "checkpoint.pt")

    storage.write_bytes(good, *path)  # another trial's checkpoint in this trial's folder
    result = _run(storage, "i1", 2, 4)
    assert result["state"] == "failed" and result["error"] == (
        "the checkpoint in trial-0000's folder belongs to trial-0001: not resumed")

    storage.write_bytes(b"\x80\x02garbage", *path)
    result = _run(storage, "i1", 2, 4)
    assert result["state"] == "failed" and "the checkpoint of trial-0000 is corrupt" in result["error"]

    info, start = checkpoint.decode_header("trial-0001", good)
    storage.write_bytes(checkpoint.encode("trial-0000", 2, 1, good[start:])[:-100], *path)  # truncated
    result = _run(storage, "i1", 2, 4)
    assert result["state"] == "failed" and result["error"].startswith(
        "the checkpoint of trial-0000 (epoch 2) is corrupt: its state is")


def test_a_checkpoint_is_loaded_only_with_a_safe_torch():
    checkpoint.require_safe_torch("2.6.0+cu124")
    checkpoint.require_safe_torch("2.13.0")
    with pytest.raises(checkpoint.CheckpointError, match=r"needs torch >= 2.6 .* this worker has torch 2.5.1"):
        checkpoint.require_safe_torch("2.5.1")
