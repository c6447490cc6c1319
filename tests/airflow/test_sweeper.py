"""Which instances the sweeper terminates: those of runs that ended or no longer exist."""

import shutil

import yaml

from rubberband_airflow.sweeper import airflow_run_state, ec2_accounts, ended_runs_instances
from tests.airflow.conftest import ROOT


def _inst(iid: str, dag_id: str | None, run_id: str | None) -> dict:
    tags = [{"Key": "rubberband:dag_id", "Value": dag_id}] if dag_id else []
    tags += [{"Key": "rubberband:run_id", "Value": run_id}] if run_id else []
    return {"InstanceId": iid, "Tags": tags}


def test_instances_of_ended_or_missing_runs_are_chosen_and_each_run_is_asked_once():
    states = {("d", "running"): "running", ("d", "queued"): "queued", ("d", "ok"): "success", ("d", "bad"): "failed"}
    asked = []

    def run_state(dag_id, run_id):
        asked.append((dag_id, run_id))
        return states.get((dag_id, run_id))

    instances = [_inst("i-1", "d", "running"), _inst("i-2", "d", "queued"), _inst("i-3", "d", "ok"),
                 _inst("i-4", "d", "bad"), _inst("i-5", "d", "deleted"), _inst("i-6", "d", "ok"),
                 _inst("i-7", None, "ok"), _inst("i-8", "d", None)]
    assert sorted(ended_runs_instances(instances, run_state)) == ["i-3", "i-4", "i-5", "i-6"]
    assert len(asked) == len(set(asked)) == 5  # untagged instances are never touched nor asked about


def test_the_sweeper_covers_the_accounts_of_the_ec2_specs_of_its_folder():
    assert ec2_accounts(ROOT / "dags") == [("aws_default", "us-east-1")]


def test_a_bad_spec_file_is_skipped_and_the_others_still_count(tmp_path, caplog):
    for name in ("digits_tuning.yaml", "nightly_ec2_tuning.yaml"):
        shutil.copy(ROOT / "dags" / name, tmp_path / name)
    other = yaml.safe_load((ROOT / "dags" / "nightly_ec2_tuning.yaml").read_text())
    other["backend"]["region"] = "eu-west-1"
    (tmp_path / "z_other_region.yaml").write_text(yaml.safe_dump(other))
    bad_tags = {**other, "tags": 5}  # not a SpecError today: a TypeError deep in the parser
    (tmp_path / "a_tags.yaml").write_text(yaml.safe_dump(bad_tags))
    (tmp_path / "b_broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "c_list.yaml").write_text("- just\n- a list\n")
    assert ec2_accounts(tmp_path) == [("aws_default", "eu-west-1"), ("aws_default", "us-east-1")]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in skipped for name in ("a_tags.yaml", "b_broken.yaml", "c_list.yaml"))


def test_run_states_are_asked_of_the_running_task_instance():
    class TaskInstance:  # the two counts the Task SDK's get_dr_count gives, for runs "live" (queued) and "done"
        def get_dr_count(self, dag_id, run_ids, states=None):
            [run_id] = run_ids
            exists = dag_id == "d" and run_id in ("live", "done")
            return int(exists and (states is None or run_id == "done" and set(states) == {"success", "failed"}))

    run_state = airflow_run_state(TaskInstance())
    assert [run_state("d", r) for r in ("live", "done", "gone")] == ["active", "ended", None]
    assert run_state("other", "live") is None
