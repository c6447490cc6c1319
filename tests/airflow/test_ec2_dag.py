"""The tuning DAG on the ec2 backend: moto's server over HTTP, instances emulated by real agents. Airflow
reaches EC2 and S3 through its connection only; the agents with their own (instance) credentials."""

import json
import shutil
import sys

import fsspec
import yaml

from rubberband_airflow.execution import replanning
from rubberband_airflow.execution.backends.base import billed_cost
from rubberband_airflow.execution.prices import lookup
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.problem import parse_billing
from rubberband_airflow.workloads import synthetic
from tests.airflow.conftest import BIN, ROOT, airflow_env, run
from tests.execution.moto_cloud import BUCKET, REGION, airflow_side, moto_cloud  # noqa: F401 (the fixture)


def _synthetic_dag(moto_cloud, tmp_path, name: str, instance_types: list[dict] | None = None,
                   **changes) -> tuple[dict, RunStorage]:
    """Run a tuning DAG of the sleeping synthetic workload (8 trials, eta 2) on moto's EC2 with
    ``airflow dags test``; its spec (``changes`` over the defaults; by default two g5.xlarge on
    demand) and its run's storage."""
    spec = yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text())
    spec.update(name=name, storage=f"s3://{BUCKET}/rubberband", profile=f"s3://{BUCKET}/profiles/g5.xlarge.json",
                trainable="rubberband_airflow.workloads.synthetic:train", metric=synthetic.METRIC, mode=synthetic.MODE,
                search_space={**synthetic.SEARCH_SPACE, "epoch_seconds": {"type": "choice", "values": [0.5]}},
                sha={"num_trials": 8, "eta": 2, "min_epochs": 1},
                backend={"type": "ec2", "aws_conn_id": "aws_default", "region": REGION, "ami": moto_cloud.image_id,
                         "subnets": moto_cloud.subnets, "security_groups": [moto_cloud.security_group],
                         "instance_profile": moto_cloud.instance_profile,
                         "instance_types": instance_types or [{"name": "g5.xlarge", "max_instances": 2}]})
    spec.update(changes)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(ROOT / "dags" / "digits_tuning.py", dags / f"{name}.py")
    with fsspec.open(spec["profile"], "w") as f:  # the workload's profile, kept in the bucket
        f.write(json.dumps(synthetic.profile(1, 0.5, trial_overhead_seconds=0.5, stage_overhead_seconds=2.0,
                                             instance_type="g5.xlarge", pending_seconds=1.0, boot_seconds=1.0)))

    home = tmp_path / "home"
    env = airflow_side(airflow_env(home, dags))  # no ambient AWS keys: everything through the connection
    assert run([str(BIN / "airflow"), "db", "migrate"], env, timeout=300).returncode == 0
    r = run([str(BIN / "airflow"), "dags", "test", name], env, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    root = RunStorage(f"s3://{BUCKET}/rubberband/{name}")
    [run_name] = [n for n in root.listdir() if n.startswith("manual__")]
    return spec, RunStorage(root.url(run_name))


def test_a_tuning_dag_runs_on_ec2_and_bills_what_the_ledger_says(airflow_home, moto_cloud, tmp_path):
    # The sleeping synthetic workload (real training on EC2 instances: the full-stack tests' digits_ec2).
    spec, storage = _synthetic_dag(moto_cloud, tmp_path, "synthetic_ec2")
    rep = storage.read_json("report.json")
    assert rep["best"]["trial"] == synthetic.best_config({t: v["config"] for t, v in rep["trials"].items()})
    assert [s["trials"] for s in rep["stages"]] == [8, 4, 2, 1]
    assert all(r["state"] == "done" for t in rep["trials"].values() for r in t["results"].values())
    # Afterwards no instance of the DAG is pending or running, and every agent is gone.
    assert moto_cloud.instances(dag_id="synthetic_ec2") == []
    moto_cloud.hypervisor.sync()
    assert moto_cloud.hypervisor.booted == {}
    # The report's cost is the ledger's bill at the price table's g5.xlarge price, by the spec's billing.
    ledger = storage.ledger()
    assert ledger and all(e["running"] is not None and e["terminated"] is not None for e in ledger)
    assert all(e["instance"].startswith("i-") for e in ledger)
    bill = billed_cost(ledger, {"g5.xlarge": lookup("g5.xlarge").price_per_hour}, parse_billing(spec["billing"]))
    assert abs(rep["actual"]["cost_usd"] - bill) < 1e-9 and bill > 0
    published = json.loads(RunStorage(f"s3://{BUCKET}/rubberband/synthetic_ec2").read_bytes("best_config.json"))
    assert published["config"] == rep["best"]["config"]


def test_a_plan_buying_spot_then_on_demand_runs_so_on_ec2(airflow_home, moto_cloud, tmp_path):
    """Offered g5.xlarge spot at $0.30 an hour, interrupted once a minute, with a deadline met at
    the 99th percentile only by buying spot for stage 1 and on demand later: the DAG's plan says
    so; each instance is bought in the market its stage's executed plan gives (the re-plans before
    stages 2 on choose each stage's market again, from what the run measured), a stage that
    releases spot ends the spot fleet before it buys on demand, and the report bills each at its price."""
    spot = {"name": "g5.xlarge", "max_instances": 2, "spot_price_per_hour": 0.3, "interruptions_per_hour": 60}
    spec, storage = _synthetic_dag(moto_cloud, tmp_path, "mixed_ec2", [spot], deadline_seconds=25,
                                   planner={"jct_quantile": 0.99})
    plan = storage.read_json("plan.json")
    markets = [s["market"] for s in plan["stages"]]
    assert markets[0] == "spot" and markets[-1] == "on-demand", plan["stages"]
    switch = markets.index("on-demand")
    assert plan["stages"][switch]["release"] == "spot"
    rep = storage.read_json("report.json")
    assert rep["complete"] and all(r["state"] == "done" for t in rep["trials"].values() for r in t["results"].values())
    ledger = storage.ledger()
    assert {e["market"] for e in ledger} == {"spot", "on-demand"}
    executed = {i: replanning.current_plan(storage, i)["stages"][i - 1] for i in range(1, len(rep["stages"]) + 1)}
    for e in ledger:  # each batch (stage-<i>-batch-<k>, -prewarm, stage-<i>-recover-<id>) in its stage's market
        stage = int(e["batch"].split("-")[1])
        # a pre-warmed batch is requested during the stage before, by the plan that stage runs
        market = (replanning.current_plan(storage, stage - 1)["stages"][stage - 1] if e["batch"].endswith("-prewarm")
                  else executed[stage])["market"]
        assert e["market"] == market, (e, market)
        assert e["price_per_hour"] == 0.3 or market == "on-demand", e
    for stage, alloc in executed.items():  # a stage that releases spot ends the spot fleet, then buys on demand
        if alloc.get("release") == "spot":
            bought = [e["requested"] for e in ledger if e["batch"].startswith(f"stage-{stage}-")
                      and e["market"] == "on-demand"]
            start = storage.read_json("stages", str(stage), "start.json")["time"]
            live = [e for e in ledger if e["market"] == "spot" and e["requested"] < start
                    and (e["terminated"] is None or e["terminated"] > start)]
            assert all(e["terminated"] <= min(bought, default=start) + 5 for e in live), (stage, live)
    assert moto_cloud.instances(dag_id="mixed_ec2") == []
    bill = billed_cost(ledger, {"g5.xlarge": lookup("g5.xlarge").price_per_hour, "g5.xlarge:spot": 0.3},
                       parse_billing(spec["billing"]))
    assert abs(rep["actual"]["cost_usd"] - bill) < 1e-9


# Test setup, not what is tested: put a DAG run in the state a user's "mark success" leaves it in.
MARK_SUCCESS = """
import sys
from airflow.models import DagRun
from airflow.utils.session import create_session
with create_session() as session:
    run = session.query(DagRun).filter_by(dag_id=sys.argv[1], run_id=sys.argv[2]).one()
    run.state = "success"
"""


def test_sweeper_terminates_instances_of_ended_and_deleted_runs_and_keeps_live_ones(airflow_home, moto_cloud, tmp_path):
    from rubberband_airflow.execution.backends.ec2 import EC2Backend

    spec = yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text())
    spec.update(name="digits_ec2", storage=f"s3://{BUCKET}/rubberband", backend={
        "type": "ec2", "aws_conn_id": "aws_default", "region": REGION, "ami": moto_cloud.image_id,
        "subnets": moto_cloud.subnets, "security_groups": [moto_cloud.security_group],
        "instance_profile": moto_cloud.instance_profile, "instance_types": [{"name": "g5.xlarge"}]})
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "digits_ec2.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(ROOT / "dags" / "digits_tuning.py", dags / "digits_ec2.py")
    shutil.copy(ROOT / "dags" / "rubberband_sweeper.py", dags / "rubberband_sweeper.py")
    env = airflow_side(airflow_env(tmp_path / "home", dags))
    for cmd in (["db", "migrate"], ["dags", "reserialize"], ["dags", "trigger", "digits_ec2", "-r", "live_run"],
                ["dags", "trigger", "digits_ec2", "-r", "done_run"]):
        r = run([str(BIN / "airflow"), *cmd], env, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # done_run ended (as if a user marked it success while its stages ran, so teardown was skipped).
    r = run([sys.executable, "-c", MARK_SUCCESS, "digits_ec2", "done_run"], env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]

    # Spec files that do not load sit beside the good one: the sweep goes on.
    (dags / "bad_tags.yaml").write_text(yaml.safe_dump({**spec, "name": "bad_tags", "tags": 5}))
    (dags / "broken.yaml").write_text("name: [unclosed\n")

    def launch(dag_id: str, run_id: str, deployment: str = "default") -> list[str]:
        backend = EC2Backend(RunStorage(f"s3://{BUCKET}/rubberband/{dag_id}/{run_id}"), "g5.xlarge",
                             moto_cloud.image_id, moto_cloud.subnets, [moto_cloud.security_group],
                             moto_cloud.instance_profile, dag_id=dag_id, run_id=run_id, slots=1,
                             client=moto_cloud.client("ec2"), deployment=deployment)
        return backend.launch("stage-1", 2)

    live, deleted, renamed = launch("digits_ec2", "live_run"), launch("digits_ec2", "deleted_run"), \
        launch("a_spec_since_renamed", "live_run")
    foreign = launch("digits_ec2", "done_run", deployment="another-airflow")  # same account, same DAG and run
    ended = launch("digits_ec2", "done_run")
    r = run([str(BIN / "airflow"), "dags", "test", "rubberband_sweeper"], env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    running = {i["InstanceId"] for i in moto_cloud.instances()}
    assert not set(deleted) & running  # the run is gone from Airflow: its instances are terminated
    assert not set(ended) & running  # the run ended: so must its fleet
    assert not set(renamed) & running  # its DAG is gone, so are its runs: found by the deployment's tag
    assert set(live) <= running  # a queued run keeps its fleet
    assert set(foreign) <= running  # the sweeper touches only its own deployment's instances
    moto_cloud.client("ec2").terminate_instances(InstanceIds=live + foreign)
