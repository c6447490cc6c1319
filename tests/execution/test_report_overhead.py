"""The stage overhead a report measures is h of the planning model: from the last result of a
stage to the first trial an agent starts in the next, scaling and placement included."""

import pytest

from rubberband_airflow.execution import observe, runner
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.report import build_report, summary_lines
from rubberband_airflow.tuning import measured_stage_overhead


def _result(t0: float, spawned: float, finished: float) -> dict:
    return {"state": "done", "metric": 0.5, "instance": "i-1", "spawned": t0 + spawned,
            "started": t0 + spawned + 0.5, "finished": t0 + finished}


def _stage_1_ran(tmp_path) -> tuple[RunStorage, float]:
    """A run of two trials whose stage 1 ended 12 s in (its first trial spawned 3 s in), trial-0001 promoted."""
    storage = RunStorage(f"file://{tmp_path}/run")
    plan = {"instance_type": "local-1", "stages": [{"gpus_per_trial": 1, "instances": 1, "epochs": 1},
                                                   {"gpus_per_trial": 1, "instances": 1, "epochs": 2}]}
    runner.start_run(storage, runner.RunSpec("m:f", "accuracy", "max", 0), [{"x": 1}, {"x": 2}], plan, 1)
    t0 = storage.read_json("run.json")["started"]
    storage.write_json({"stage": 1, "time": t0 + 1.0}, "stages", "1", "start.json")
    storage.write_result("trial-0000", 1, _result(t0, 3.0, 10.0))
    storage.write_result("trial-0001", 1, _result(t0, 3.5, 12.0))
    storage.write_json({"stage": 1, "time": t0 + 12.5}, "stages", "1", "end.json")
    storage.write_json({"trials": ["trial-0001"]}, "stages", "2", "trials.json")
    return storage, t0


def test_overhead_runs_from_the_last_result_to_the_next_stages_first_trial(tmp_path):
    storage, t0 = _stage_1_ran(tmp_path)
    # Stage 2's scaling task starts 1 s after the last result; its trial starts 6 s after it.
    storage.write_json({"stage": 2, "time": t0 + 13.0}, "stages", "2", "start.json")
    storage.write_result("trial-0001", 2, _result(t0, 18.0, 30.0))
    storage.write_json({"stage": 2, "time": t0 + 30.5}, "stages", "2", "end.json")

    report = build_report(storage, "dag")
    assert report["stage_overhead_seconds"] == [pytest.approx(3.0), pytest.approx(6.0)]
    assert report["actual"]["jct_seconds"] == pytest.approx(30.0)


@pytest.mark.parametrize("tries, overhead, said", [
    # (try, seconds from the run's start, first try of its clear, continuation of the attempt)
    # Its start failed at night and was cleared an hour later (each the first try of its clear).
    ([(1, 13.0, True, 0), (2, 3613.0, True, 1)], 6.0, "Stage 2 started 3600.0 s late: its start was tried again"),
    # Airflow's retry 5 s after a try that failed 10 s in, then a try whose host was gone (no record).
    ([(1, 13.0, True, 0), (3, 3613.0, False, 0)], 6.0, "Stage 2 started 3600.0 s late"),
    # Its first try's host was gone before its body began: the wait is unknown.
    ([(2, 3613.0, False, 0)], None, "Stage 2 started late: its start was tried again after a try that recorded"),
    # Its tries at night left no record (storage out), the morning's clear ran it: unknown too.
    ([(3, 3613.0, True, 1)], None, "Stage 2 started late: its start was tried again after a try that recorded"),
    # It first ran before the stage before it ended (a trial of it failed at night and ran again in the
    # morning, 12 s in here): the wait counts from that end, not from the first try.
    ([(1, 5.0, True, 0), (2, 3613.0, True, 1)], 5.0, "Stage 2 started 3601.0 s late"),
])
def test_a_start_tried_again_leaves_its_wait_out_of_the_measured_overhead(tmp_path, tries, overhead, said):
    """The stage overhead a report and a re-plan measure, and the next runs plan with, is the
    orchestrator's: a start that waited an hour to be tried again does not make it an hour."""
    storage, t0 = _stage_1_ran(tmp_path)
    storage.write_json([{"try": k, "time": t0 + t, "first_of_clear": first, "continued": c}
                        for k, t, first, c in tries], "stages", "2", "start-tries.json")
    storage.write_json({"stage": 2, "time": t0 + 3613.0}, "stages", "2", "start.json")
    storage.write_result("trial-0001", 2, _result(t0, 3618.0, 3630.0))
    storage.write_json({"stage": 2, "time": t0 + 3630.5}, "stages", "2", "end.json")

    report = build_report(storage, "dag")
    assert report["stage_overhead_seconds"] == [pytest.approx(3.0), pytest.approx(overhead) if overhead else None]
    assert any(line.startswith(said) for line in summary_lines(report)), summary_lines(report)
    # What the next runs of the DAG plan with (stage 2 on), and what a re-plan before stage 3 counts.
    assert measured_stage_overhead([report]) == (pytest.approx(overhead) if overhead else None)
    measured = observe.observed(storage, 3)["stage_overhead_seconds"]
    assert measured == pytest.approx((3.0 + overhead) / 2 if overhead else 3.0)


def test_the_wait_runs_to_the_try_that_placed_the_trials_whatever_the_agents_clock(tmp_path):
    """The agent's clock 2 s behind the worker's: its first trial seems to spawn before the try that
    placed it began; the placement names that try, so the night still is not overhead."""
    storage, t0 = _stage_1_ran(tmp_path)
    storage.write_json([{"try": 1, "time": t0 + 13.0, "first_of_clear": True, "continued": 0},
                        {"try": 2, "time": t0 + 3613.0, "first_of_clear": True, "continued": 1}],
                       "stages", "2", "start-tries.json")
    storage.write_json({"stage": 2, "placement": {}, "clear": 1, "start_try": 2}, "stages", "2", "placement.json")
    storage.write_json({"stage": 2, "time": t0 + 3613.0}, "stages", "2", "start.json")
    storage.write_result("trial-0001", 2, _result(t0, 3612.0, 3630.0))
    storage.write_json({"stage": 2, "time": t0 + 3630.5}, "stages", "2", "end.json")
    report = build_report(storage, "dag")
    assert report["stages"][1]["start_retry_wait_seconds"] == pytest.approx(3600.0)
    assert report["stage_overhead_seconds"][1] == 0.0


def test_two_live_tries_of_a_start_both_keep_their_record(tmp_path):
    """A zombie try of a start and the try that replaced it record at the same moment: neither
    record is lost (each try has its own file), and a try's body run again keeps its first time."""
    import threading

    storage, t0 = _stage_1_ran(tmp_path)
    go = threading.Barrier(8)

    def note(k: int) -> None:
        go.wait()
        runner.note_start_try(storage, 2, k, first_of_clear=k == 1)

    threads = [threading.Thread(target=note, args=(k,)) for k in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = {t["try"]: t["time"] for t in runner.start_tries(storage, 2)}
    assert sorted(first) == list(range(1, 9))
    runner.note_start_try(storage, 2, 3, first_of_clear=False)  # try 3's body again, after a storage burst
    assert {t["try"]: t["time"] for t in runner.start_tries(storage, 2)} == first
    # A run recorded before each try had its own file still reads, with the new records beside it.
    storage.write_json([{"try": 20, "time": t0 - 100.0, "first_of_clear": True, "continued": 0},
                        {"try": 3, "time": t0 - 50.0, "first_of_clear": False, "continued": 0}],
                       "stages", "2", "start-tries.json")
    both = runner.start_tries(storage, 2)
    assert [t["try"] for t in both][0] == 20 and sorted(t["try"] for t in both) == [*range(1, 9), 20]
    assert next(t for t in both if t["try"] == 3)["time"] == first[3]  # a try in both counts once, by its file
