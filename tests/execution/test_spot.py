"""Spot capacity on the execution side: spot launches, the on-demand fallback, interruption notices.

Against moto's server over HTTP, with real agents and trials behind an emulated IMDSv2
(``moto_cloud``). moto never refuses spot capacity: the fallback test answers spot requests with
EC2's own error response before they leave the client (a botocore ``before-send`` handler), so
the backend gets exactly what EC2 sends when it has no spot capacity, and its on-demand request
goes on to moto.
"""

import threading
import time
from urllib.parse import parse_qs

import boto3
import fsspec
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ReadTimeoutError

from rubberband_airflow.execution import prices, recovery, replanning, runner
from rubberband_airflow.execution.backends.base import SPOT_SUFFIX, Market
from rubberband_airflow.execution.backends.ec2 import EC2Backend
from rubberband_airflow.execution.runner import RunPlan, RunSpec, run_sha, scale_out
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.simulator import simulate
from rubberband_airflow.predictions import replan_lines, replan_rows, stage_predictions
from rubberband_airflow.report import build_report, summary_lines
from rubberband_airflow.run_view import read_run, run_view_html, view_data
from rubberband_airflow.search_space import sample
from rubberband_airflow.spec import SpecError, load_spec, parse_spec
from rubberband_airflow.tuning import backend_for
from rubberband_airflow.workloads import synthetic
from tests.execution.conftest import ROOT, agent_processes, plan_json, run_stage
from tests.execution.moto_cloud import REGION, MotoCloud, moto_cloud  # noqa: F401 (the fixture)
from tests.execution.test_ec2_backend import TYPE, _backend

SPOT_PRICE = 0.3  # USD per hour, against g5.xlarge's 1.006 on demand
EPOCHS = 8  # of the interrupted trial, 1 s each (tests.trainables.steady)
ROOT_SPEC = ROOT / "dags" / "nightly_ec2_tuning.yaml"
SYNTHETIC = "rubberband_airflow.workloads.synthetic:train"


def _params(request) -> dict[str, list[str]]:
    """An EC2 query request's parameters."""
    return parse_qs(request.body.decode() if isinstance(request.body, bytes) else request.body or "")


def _run_instances_requests(client) -> list[dict[str, list[str]]]:
    """Record the parameters of every RunInstances request the client sends (as moto receives them)."""
    seen: list[dict[str, list[str]]] = []

    def record(request, **_):
        seen.append(_params(request))

    client.meta.events.register("before-send.ec2.RunInstances", record)
    return seen


def _described(cloud: MotoCloud, ids: list[str]) -> list[dict]:
    pages = cloud.client("ec2").describe_instances(InstanceIds=ids)["Reservations"]
    return [i for r in pages for i in r["Instances"]]


def _cleanup(cloud: MotoCloud, backend: EC2Backend) -> None:
    backend.terminate_all()
    cloud.hypervisor.sync()
    assert cloud.instances(run_id=backend.run_id) == [] and agent_processes(backend.storage) == []


def test_a_spot_batch_is_a_one_time_spot_request_that_terminates_on_interruption(moto_cloud):
    storage = moto_cloud.storage("tune_digits/spot-1")
    client = moto_cloud.client("ec2")
    requests = _run_instances_requests(client)
    backend = _backend(moto_cloud, storage, client=client, spot_price=SPOT_PRICE)  # on demand unless told

    spot = backend.launch("stage-1", 1, Market.SPOT)
    assert backend.launch("stage-1", 1, Market.SPOT) == spot  # a retry finds the batch: no second request
    on_demand = backend.launch("stage-2", 1)

    first, second = requests
    assert first["InstanceMarketOptions.MarketType"] == ["spot"]
    assert first["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == ["one-time"]
    assert first["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == ["terminate"]
    assert "InstanceMarketOptions.SpotOptions.MaxPrice" not in first  # capped at the on-demand price
    assert first["MetadataOptions.HttpTokens"] == ["required"] and first["ClientToken"] != second["ClientToken"]
    assert not any(k.startswith("InstanceMarketOptions") for k in second)
    [spot_seen], [on_demand_seen] = _described(moto_cloud, spot), _described(moto_cloud, on_demand)
    assert spot_seen["InstanceLifecycle"] == "spot" and "InstanceLifecycle" not in on_demand_seen
    assert spot_seen["MetadataOptions"]["HttpTokens"] == "required"
    assert {t["Key"]: t["Value"] for t in spot_seen["Tags"]}["rubberband:batch"] == "stage-1"

    entries = {e["instance"]: e for e in storage.ledger()}
    assert entries[spot[0]]["market"] == "spot" and entries[spot[0]]["price_per_hour"] == SPOT_PRICE
    assert entries[on_demand[0]]["market"] == "on-demand" and "price_per_hour" not in entries[on_demand[0]]
    _cleanup(moto_cloud, backend)


def _no_spot_capacity(request, **_):
    """EC2's answer to a spot request when no capacity is left in the zone (a server error, HTTP 500)."""
    if _params(request).get("InstanceMarketOptions.MarketType") != ["spot"]:
        return None
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>InsufficientInstanceCapacity'
            b'</Code><Message>We currently do not have sufficient g5.xlarge capacity in the Availability Zone you '
            b'requested.</Message></Error></Errors><RequestID>e0e3bb1b-0000-4000-8000-000000000000</RequestID>'
            b'</Response>')
    return _ec2_answer(request, 500, body)


def _ec2_answer(request, status: int, body: bytes) -> AWSResponse:
    """An EC2 response to ``request``, as the service sends it, that never reaches moto."""
    class Raw:
        def stream(self, **_):
            yield body

    return AWSResponse(request.url, status, {"Content-Type": "text/xml;charset=UTF-8"}, Raw())


def test_no_spot_capacity_in_any_subnet_launches_the_batch_on_demand_and_the_report_says_so(moto_cloud):
    storage = moto_cloud.storage("tune_digits/spot-2")
    client = boto3.client("ec2", endpoint_url=moto_cloud.endpoint, region_name=REGION,
                          config=Config(retries={"total_max_attempts": 1}))  # no retries of the 500s: a fast test
    requests = _run_instances_requests(client)
    client.meta.events.register("before-send.ec2.RunInstances", _no_spot_capacity)
    backend = _backend(moto_cloud, storage, client=client, market=Market.SPOT, spot_price=SPOT_PRICE)

    ids = backend.launch("stage-1-batch-0", 2)  # spot, the backend's market

    assert [r.get("InstanceMarketOptions.MarketType") for r in requests] == [["spot"], ["spot"], None]
    a, b = moto_cloud.subnets
    assert [r["SubnetId"] for r in requests] == [[a], [b], [a]]  # spot in each subnet, then on demand
    assert len(ids) == 2 and all("InstanceLifecycle" not in i for i in _described(moto_cloud, ids))
    refused = f"{a}: InsufficientInstanceCapacity; {b}: InsufficientInstanceCapacity"
    for e in storage.ledger():
        assert e["market"] == "on-demand" and e["spot_refused"] == refused and "price_per_hour" not in e
    report = build_report(storage, "tune_digits")
    [fallback] = report["spot_fallbacks"]
    assert fallback == {"batch": "stage-1-batch-0", "instances": sorted(ids), "refused": refused}  # ledger order
    assert f"Spot refused for batch stage-1-batch-0 ({refused}): its 2 instances ran on demand" \
        in summary_lines(report)
    _cleanup(moto_cloud, backend)


def test_no_spot_capacity_sends_the_rest_of_the_run_on_demand_and_the_re_plan_prices_it_so(moto_cloud):
    storage = moto_cloud.storage("tune_digits/spot-4")
    client = boto3.client("ec2", endpoint_url=moto_cloud.endpoint, region_name=REGION,
                          config=Config(retries={"total_max_attempts": 1}))
    requests = _run_instances_requests(client)
    client.meta.events.register("before-send.ec2.RunInstances", _no_spot_capacity)
    on_demand = prices.lookup(TYPE).price_per_hour
    # A spot-only spec's backend, as backend_for makes it: spot by default, both prices known.
    backend = _backend(moto_cloud, storage, client=client, market=Market.SPOT, spot_price=SPOT_PRICE,
                       price=on_demand)
    plan = plan_json(TYPE + SPOT_SUFFIX, 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=2)
    plan["problem"]["instance_types"][0].update(market="spot", price_per_hour=SPOT_PRICE, interruptions_per_hour=0.05)
    plan["problem"]["deadline_seconds"] = 600
    for s in plan["stages"]:
        s["market"] = "spot"
    configs = [{**c, "epoch_seconds": 0.3, "serial": 0.0} for c in sample(synthetic.SEARCH_SPACE, 4, seed=3)]
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE), configs, plan, 1)

    # Spot is refused in both subnets: stage 1 runs on demand.
    run_stage(storage, backend, RunPlan.from_json(plan), 1, synthetic.MODE, 240)
    assert [r.get("InstanceMarketOptions.MarketType") for r in requests] == [["spot"], ["spot"], None]
    after = replanning.replan_stage(storage, replanning.current_plan(storage, 2), 2)

    # The re-plan goes on demand: the two instances stage 1 got on demand are its fleet, priced on demand.
    assert after["instance_type"] == TYPE and after["stages"][0] == plan["stages"][0]
    assert after["stages"][1]["market"] == "on-demand"
    record = storage.read_json("stages", "2", "replan.json")
    assert record["spot_fallback"]["batches"] == ["stage-1-batch-0"] and "InsufficientInstanceCapacity" in \
        record["spot_fallback"]["refused"] and record["spot_fallback"]["price_per_hour"] == on_demand
    assert len(record["state"]["fleet"]) == 2 and record["state"]["spent_usd"] == 0.0
    revised = RunPlan.from_json(after)
    assert revised.problem.instance_type(TYPE).price_per_hour == on_demand
    assert revised.problem.instance_type(TYPE).interruptions_per_hour == 0
    assert revised.market(2) == Market.ON_DEMAND
    # Priced on demand, the rest of the run costs more than the first plan's whole estimate on spot.
    first = parse_problem(plan["problem"])
    assert after["predicted"]["cost_usd"]["mean"] > simulate(first, parse_plan(plan, first))["cost_usd"]["mean"]

    run_stage(storage, backend, revised, 2, synthetic.MODE, 240)  # on the fleet it has: no spot request, no launch
    assert len(requests) == 3 and len(storage.ledger()) == 2
    backend.terminate_all()
    report = build_report(storage, "tune_digits")
    assert report["best"]["trial"] == synthetic.best_config({t: v["config"] for t, v in report["trials"].items()})
    ledger = storage.ledger()
    billing = parse_problem(plan["problem"]).billing
    bill = sum(on_demand / 3600 * billed_seconds(e["running"], e["terminated"], billing.minimum_seconds,
                                                 billing.increment_seconds) for e in ledger)
    assert report["actual"]["cost_usd"] == pytest.approx(bill, rel=1e-9) and bill > 0
    assert view_data(read_run(storage))["actual"]["cost_usd"] == pytest.approx(bill, rel=1e-6)  # the run view's
    assert any("on demand from here: EC2 had no spot capacity for stage-1-batch-0" in line
               for line in summary_lines(report))
    _cleanup(moto_cloud, backend)


def test_after_a_spot_refusal_the_re_plans_go_on_demand_then_back_to_spot_once_the_refusal_is_old(storage):
    """A re-plan soon after EC2 refused spot capacity plans on demand; one SPOT_RETRY_SECONDS after
    the latest refusal plans the run's spot offer again. Both count every live instance of the
    type, spot or on demand, as the fleet."""
    plan = plan_json(TYPE + SPOT_SUFFIX, 1, [(1, 2), (1, 1), (1, 1)], num_trials=4, eta=2, min_epochs=1)
    plan["problem"]["instance_types"][0].update(market="spot", price_per_hour=SPOT_PRICE, interruptions_per_hour=0.05)
    for s in plan["stages"]:
        s["market"] = "spot"
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE),
                     sample(synthetic.SEARCH_SPACE, 4, seed=1), plan, 1)
    t0 = storage.read_json("run.json")["started"]
    entry = {"type": TYPE, "slots": 1, "requested": t0, "running": t0 + 10, "ready": t0 + 40, "terminated": None}
    # Stage 1's first batch got spot; its second was refused spot in every subnet and went on demand.
    storage.write_ledger({**entry, "instance": "i-spot", "batch": "stage-1-batch-0", "market": "spot",
                          "price_per_hour": SPOT_PRICE})
    storage.write_ledger({**entry, "instance": "i-od", "batch": "stage-1-batch-1", "market": "on-demand",
                          "requested": t0 + 1, "spot_refused": "subnet-a: InsufficientInstanceCapacity"})

    soon, record = replanning.revise(storage, plan, 2, now=t0 + 100)
    assert soon["instance_type"] == TYPE and [s["market"] for s in soon["stages"][1:]] == ["on-demand"] * 2
    assert record["spot_fallback"]["batches"] == ["stage-1-batch-1"] and "spot_retry" not in record
    assert len(record["state"]["fleet"]) == 2
    # Before stage 3, still within SPOT_RETRY_SECONDS of the refusal: on demand, both instances its fleet.
    still, record = replanning.revise(storage, soon, 3, now=t0 + 1 + replanning.SPOT_RETRY_SECONDS - 1)
    assert still["instance_type"] == TYPE and still["stages"][2]["market"] == "on-demand"
    assert len(record["state"]["fleet"]) == 2
    # Later, spot again: the run's spot offer at its price, new instances spot; the stages run keep theirs.
    back, record = replanning.revise(storage, soon, 3, now=t0 + 1 + replanning.SPOT_RETRY_SECONDS + 1)
    assert back["instance_type"] == TYPE + SPOT_SUFFIX and back["stages"][:2] == soon["stages"][:2]
    assert back["stages"][2]["market"] == "spot" and RunPlan.from_json(back).market(3) == Market.SPOT
    assert RunPlan.from_json(back).problem.instance_type(TYPE + SPOT_SUFFIX).price_per_hour == SPOT_PRICE
    assert record["spot_retry"]["batches"] == ["stage-1-batch-1"] and "spot_fallback" not in record
    assert record["state"]["buy_markets"] == ["spot"]  # the spec offers spot only: nothing bought on demand
    assert len(record["state"]["fleet"]) == 2
    [line] = replan_lines({"replans": replan_rows([record], t0)})  # the report's line of this re-plan
    assert line.endswith(f"; back on spot: EC2 last refused spot capacity "
                         f"{replanning.SPOT_RETRY_SECONDS + 1:.1f} s before (stage-1-batch-1)")


def test_a_spot_instance_interrupted_mid_trial_loses_no_epoch_and_the_run_completes(moto_cloud):
    storage = moto_cloud.storage("tune_digits/spot-3")
    backend = _backend(moto_cloud, storage, spot_price=SPOT_PRICE)  # on demand unless the plan says spot
    plan = plan_json(TYPE, 1, [(1, 1)], num_trials=1, eta=2, min_epochs=EPOCHS)
    plan["stages"][0]["market"] = "spot"  # the plan's market wins over the backend's
    spec = RunSpec("tests.trainables:steady", "accuracy", "max", seed=1)
    interrupted: list[str] = []
    # The watcher looks through a filesystem of its own: s3fs caches the listing of a folder's parent
    # when the folder is missing (metrics/ before the first epoch), which would hide the trial's
    # result, written later beside it, from the orchestrator's reads in this process.
    watched = RunStorage(storage.uri, filesystem=fsspec.filesystem("s3", skip_instance_cache=True))

    def interrupt_mid_trial() -> None:
        """Once the trial has reported its first epoch, its instance gets a two-minute notice (which
        its agent sees within 5 s: the trial, at 1 s an epoch, is far from done)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if watched.metrics("trial-0000"):
                [entry] = watched.ledger()
                moto_cloud.hypervisor.interrupt(entry["instance"], notice_seconds=120)
                interrupted.append(entry["instance"])
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=interrupt_mid_trial, daemon=True)
    watcher.start()
    out = run_sha(storage, backend, spec, [{"lr": 0.1}], plan, stage_timeout=240)
    watcher.join()

    [lost] = interrupted
    assert out["stages"][0]["failed"] == [] and out["best"]["trial"] == "trial-0000"
    metrics = storage.metrics("trial-0000")
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))  # no epoch trained twice, none skipped
    first = [m for m in metrics if m["pid"] == metrics[0]["pid"]]
    resumed = [m for m in metrics if m["pid"] != metrics[0]["pid"]]
    assert 1 <= len(first) < EPOCHS and {m["started_from"] for m in resumed} == {len(first)}
    [record] = recovery.records(storage, 1)
    assert record["lost"] == lost and "spot interruption notice (terminate at " in record["reason"]
    assert record["trials"][0]["from_epoch"] == len(first)

    ledger = storage.ledger()
    assert len(ledger) == 2 and all(e["market"] == "spot" and e["price_per_hour"] == SPOT_PRICE for e in ledger)
    assert moto_cloud.instances(run_id=backend.run_id) == []
    moto_cloud.hypervisor.sync()
    assert agent_processes(storage) == []
    billing = parse_problem(plan["problem"]).billing
    spot_bill = sum(SPOT_PRICE / 3600 * billed_seconds(e["running"], e["terminated"], billing.minimum_seconds,
                                                       billing.increment_seconds) for e in ledger)
    report = build_report(storage, "tune_digits")
    assert report["actual"]["cost_usd"] == pytest.approx(spot_bill, rel=1e-9) and spot_bill > 0
    [loss] = report["recoveries"]
    assert loss["lost"] == lost and loss["extra_usd"] == pytest.approx(SPOT_PRICE / 3600 * loss["extra_seconds"])


# --- how a spot choice reaches the backend: the spec, and the plan's stage allocation over it ----


def _ec2_spec(**instance_type) -> dict:
    import yaml

    data = yaml.safe_load(ROOT_SPEC.read_text())
    data["backend"]["instance_types"] = [{"name": TYPE, "max_instances": 4, **instance_type}]
    return data


def test_the_spec_gives_an_instance_types_market_and_spot_price_to_its_backend(tmp_path):
    spec = parse_spec(_ec2_spec(market="spot", spot_price_per_hour=SPOT_PRICE), "spot.yaml")
    client = boto3.client("ec2", region_name=REGION)  # made, never called
    storage = RunStorage(f"file://{tmp_path}/run")
    backend = backend_for(spec, storage, "tune", "run-1", TYPE, client)
    assert isinstance(backend, EC2Backend) and backend.market == Market.SPOT and backend.spot_price == SPOT_PRICE
    assert backend.price == prices.lookup(TYPE).price_per_hour  # what an on-demand fallback is billed at
    assert parse_spec(spec.to_dict(), spec.path) == spec  # a run's snapshot of its spec keeps them
    plain = backend_for(load_spec(ROOT_SPEC), storage, "tune", "run-1", "g5.xlarge", client)
    assert plain.market == Market.ON_DEMAND and plain.spot_price is None  # the default: on demand


@pytest.mark.parametrize("field,value,message", [
    ("market", "cheap", "backend.instance_types[0].market: must be 'spot' or 'on-demand', got string 'cheap'"),
    ("market", True, "backend.instance_types[0].market: must be 'spot' or 'on-demand'"),
    ("spot_price_per_hour", 0, "backend.instance_types[0].spot_price_per_hour"),
    ("spot_price_per_hour", "low", "backend.instance_types[0].spot_price_per_hour"),
])
def test_a_bad_market_or_spot_price_is_an_error_naming_the_field(field, value, message):
    with pytest.raises(SpecError) as e:
        parse_spec(_ec2_spec(**{field: value}), "bad.yaml")
    assert str(e.value).startswith(f"bad.yaml: {message}")


def test_a_stage_allocations_market_in_the_plan_json_reaches_the_launch(tmp_path):
    plan = plan_json(TYPE, 1, [(1, 2), (1, 3)], num_trials=4, eta=2, min_epochs=1)
    plan["stages"][1]["market"] = "spot"
    run_plan = RunPlan.from_json(plan)
    assert run_plan.market(1) is None and run_plan.market(2) == Market.SPOT
    assert RunPlan.from_json(run_plan.to_json()) == run_plan

    class NoFleet:  # scale_out asks the backend for its live fleet, and its storage for the stage's trials
        storage = RunStorage(f"file://{tmp_path}/run")

        def adopt(self):
            return []

        def live(self):
            return []

    [batch] = scale_out(NoFleet(), run_plan, 2, 8)
    assert batch.market == Market.SPOT and batch.to_json() == {"batch": "stage-2-batch-0", "count": 3,
                                                               "market": "spot"}
    assert type(batch).from_json(batch.to_json()) == batch
    assert scale_out(NoFleet(), run_plan, 1, 8)[0].market is None  # the backend's own market

    plan["stages"][0]["market"] = "reserved"
    with pytest.raises(ProblemError, match=r"plan.stages\[0\].market: must be 'spot' or 'on-demand', got string"):
        RunPlan.from_json(plan)


def _refuse_spot_in(subnet: str):
    """A ``before-send`` handler: no spot capacity in ``subnet`` (elsewhere, the request goes on)."""
    def handler(request, **kwargs):
        return _no_spot_capacity(request, **kwargs) if _params(request).get("SubnetId") == [subnet] else None
    return handler


def _lagging_describe(times: int):
    """A ``before-send`` handler: EC2's describe, eventually consistent, lists no instance ``times`` times."""
    left = [times]

    def handler(request, **_):
        if left[0] == 0:
            return None
        left[0] -= 1
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/'
                b'doc/2016-11-15/"><requestId>e0e3bb1b-0000-4000-8000-000000000001</requestId><reservationSet/>'
                b'</DescribeInstancesResponse>')
        return _ec2_answer(request, 200, body)
    return handler


def test_a_retried_launch_sends_the_request_whose_reply_was_lost_again_before_any_other(moto_cloud):
    """Spot was refused in the first subnet and launched in the second, but the reply never came,
    and EC2 does not list the batch yet when the task retries, by which time the first subnet has
    capacity again. The retry must not launch the batch there: it sends the lost request again, to
    the same subnet and market with the same ClientToken, which EC2 answers with the instances it
    launched (moto ignores ClientToken and launches them anew; the test checks the request)."""
    storage = moto_cloud.storage("tune_digits/spot-lost-reply")
    client = boto3.client("ec2", endpoint_url=moto_cloud.endpoint, region_name=REGION,
                          config=Config(retries={"total_max_attempts": 1}))
    requests = _run_instances_requests(client)
    a, b = moto_cloud.subnets
    refuse = _refuse_spot_in(a)
    client.meta.events.register("before-send.ec2.RunInstances", refuse)
    backend = _backend(moto_cloud, storage, client=client, market=Market.SPOT, spot_price=SPOT_PRICE)

    def lose_the_reply(parsed, **_):
        if parsed.get("Instances"):  # launched: the reply is lost on its way back
            raise ReadTimeoutError(endpoint_url=moto_cloud.endpoint)

    client.meta.events.register("after-call.ec2.RunInstances", lose_the_reply)
    with pytest.raises(ReadTimeoutError):
        backend.launch("stage-1-batch-0", 2)
    lost = requests[-1]
    assert [r["SubnetId"] for r in requests] == [[a], [b]] and lost["InstanceMarketOptions.MarketType"] == ["spot"]
    assert storage.ledger() == []

    client.meta.events.unregister("after-call.ec2.RunInstances", lose_the_reply)
    client.meta.events.unregister("before-send.ec2.RunInstances", refuse)  # capacity is back in subnet a
    client.meta.events.register("before-send.ec2.DescribeInstances", _lagging_describe(1))
    ids = backend.launch("stage-1-batch-0", 2)

    [again] = requests[2:]  # one request: the lost one, again
    assert again["SubnetId"] == [b] and again["ClientToken"] == lost["ClientToken"]
    assert again["InstanceMarketOptions.MarketType"] == ["spot"]
    entries = {e["instance"]: e for e in storage.ledger()}
    assert sorted(entries) == sorted(ids) and all(e["market"] == "spot" and "spot_refused" not in e
                                                  for e in entries.values())
    assert storage.read_json("launches", "stage-1-batch-0.json") is None  # recorded: nothing left to resend
    _cleanup(moto_cloud, backend)


def test_a_plan_that_releases_its_spot_fleet_runs_its_last_stage_on_demand(moto_cloud):
    """Stage 1 on two spot instances; stage 2 buys one on-demand instance and releases the spot
    ones, as the planner plans a long last stage under frequent interruptions."""
    storage = moto_cloud.storage("tune_digits/spot-release")
    on_demand = prices.lookup(TYPE).price_per_hour
    backend = _backend(moto_cloud, storage, market=Market.SPOT, spot_price=SPOT_PRICE, price=on_demand)
    plan = plan_json(TYPE + SPOT_SUFFIX, 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=2)
    spot_type = plan["problem"]["instance_types"][0]
    spot_type.update(market="spot", price_per_hour=SPOT_PRICE, interruptions_per_hour=1.0)
    plan["problem"]["instance_types"].append({**spot_type, "name": TYPE, "market": "on-demand",
                                              "price_per_hour": on_demand, "interruptions_per_hour": 0})
    plan["stages"][0]["market"] = "spot"
    plan["stages"][1].update(market="on-demand", release="spot")
    run_plan = RunPlan.from_json(plan)
    assert run_plan.allocation(2).release == "spot" and run_plan.market(2) == Market.ON_DEMAND
    configs = [{**c, "epoch_seconds": 0.3, "serial": 0.0} for c in sample(synthetic.SEARCH_SPACE, 4, seed=5)]
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE), configs, plan, 1)

    run_stage(storage, backend, run_plan, 1, synthetic.MODE, 240)
    spot = sorted(backend.live())
    run_stage(storage, backend, run_plan, 2, synthetic.MODE, 240)

    entries = {e["instance"]: e for e in storage.ledger()}
    [demand] = [i for i in entries if i not in spot]
    assert [entries[i]["market"] for i in spot] == ["spot", "spot"] and entries[demand]["market"] == "on-demand"
    stage_2 = storage.read_json("stages", "2", "start.json")["time"]
    assert all(entries[i]["terminated"] is not None and entries[i]["terminated"] >= stage_2 for i in spot)
    assert entries[demand]["requested"] >= stage_2
    assert list(storage.read_json("stages", "2", "placement.json")["placement"]) == [demand]
    [described] = _described(moto_cloud, [demand])
    assert "InstanceLifecycle" not in described  # bought on demand
    report = build_report(storage, "tune_digits")
    assert report["complete"] and report["best"] is not None and [s["failed"] for s in report["stages"]] == [[], []]
    assert "Markets: stage 1 spot, stage 2 on-demand (spot released)" in summary_lines(report)
    page = run_view_html(storage, "tune_digits")  # the run's page in the Airflow UI
    assert "2 spot → 1 on-demand, spot released" in page
    _cleanup(moto_cloud, backend)


def _interrupted_spot_run(storage: RunStorage) -> tuple[dict, float]:
    """A run started on a spot plan of three stages, offered on demand too, whose spot instances
    are interrupted 1800 times an hour against a 30 s deadline; and when it started."""
    plan = plan_json(TYPE + SPOT_SUFFIX, 1, [(1, 2), (1, 1), (1, 1)], num_trials=4, eta=2, min_epochs=1)
    spot_type = plan["problem"]["instance_types"][0]
    spot_type.update(market="spot", price_per_hour=SPOT_PRICE, interruptions_per_hour=1800.0)
    plan["problem"]["instance_types"].append({**spot_type, "name": TYPE, "market": "on-demand",
                                              "price_per_hour": 1.0, "interruptions_per_hour": 0})
    plan["problem"]["deadline_seconds"] = 30
    for s in plan["stages"]:
        s["market"] = "spot"
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE),
                     sample(synthetic.SEARCH_SPACE, 4, seed=1), plan, 1)
    t0 = storage.read_json("run.json")["started"]
    return plan, t0


def _ledger_backend(storage: RunStorage):
    """What ``stage_targets`` reads of a backend: its storage's ledger."""
    class Fleet:
        pass

    backend = Fleet()
    backend.storage = storage
    return backend


def test_a_re_plan_counts_the_spot_fleet_as_spot_and_may_move_the_rest_of_the_run_on_demand(storage):
    """A run on spot, offered on demand too, whose spot instances are interrupted all the time
    (1800 times an hour) against a tight deadline (30 s): the re-plan before stage 2 sees its two live
    spot instances as spot, and moves the rest of the run on demand, releasing them, at a stage
    of its choosing."""
    plan, t0 = _interrupted_spot_run(storage)
    for k in range(2):
        storage.write_ledger({"instance": f"i-spot-{k}", "batch": "stage-1-batch-0", "type": TYPE, "slots": 1,
                              "market": "spot", "price_per_hour": SPOT_PRICE, "requested": t0, "running": t0 + 1,
                              "ready": t0 + 2, "terminated": None})

    after, record = replanning.revise(storage, plan, 2, now=t0 + 10)
    assert [f["instance_type"] for f in record["state"]["fleet"]] == [TYPE + SPOT_SUFFIX] * 2
    markets = [s["market"] for s in after["stages"]]
    assert markets[0] == "spot" and markets[-1] == "on-demand", after["stages"]
    switch = markets.index("on-demand")
    assert after["stages"][switch]["release"] == "spot" and after["predicted"]["jct_seconds"]["quantile"] <= 30
    revised = RunPlan.from_json(after)
    assert revised.market(switch + 1) == Market.ON_DEMAND and revised.allocation(switch + 1).release == "spot"


def test_a_retried_start_releases_only_what_earlier_stages_bought(storage):
    """Stage 2 releases on-demand instances and buys spot; its first try launched a batch that
    EC2 refused spot and bought on demand. Its retry keeps that batch (the stage's own) and
    releases only stage 1's on-demand instance."""
    plan = plan_json(TYPE, 1, [(1, 1), (1, 2)], num_trials=2, eta=2, min_epochs=1)
    own = plan["problem"]["instance_types"][0]
    plan["problem"]["instance_types"].append({**own, "name": TYPE + SPOT_SUFFIX, "market": "spot",
                                              "price_per_hour": SPOT_PRICE, "interruptions_per_hour": 1.0})
    plan["stages"][0]["market"] = "on-demand"
    plan["stages"][1].update(market="spot", release="on-demand")
    run_plan = RunPlan.from_json(plan)
    entry = {"type": TYPE, "slots": 1, "market": "on-demand", "terminated": None}
    storage.write_ledger({**entry, "instance": "i-stage-1", "batch": "stage-1-batch-0"})
    storage.write_ledger({**entry, "instance": "i-stage-2", "batch": "stage-2-batch-0",
                          "spot_refused": "subnet-a: InsufficientInstanceCapacity"})
    backend = _ledger_backend(storage)
    assert runner.stage_targets(backend, run_plan, 2, ["i-stage-1", "i-stage-2"], 2) == (1, ["i-stage-1"])


def test_a_plan_on_demand_that_buys_a_stage_spot_goes_on_demand_after_a_refusal(storage):
    """The planner may return a plan on the on-demand offer whose first stage buys spot: EC2's
    refusal of that spot batch sends the re-plans on demand all the same."""
    plan = plan_json(TYPE, 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=1)
    own = plan["problem"]["instance_types"][0]
    plan["problem"]["instance_types"].append({**own, "name": TYPE + SPOT_SUFFIX, "market": "spot",
                                              "price_per_hour": SPOT_PRICE, "interruptions_per_hour": 0.05})
    plan["stages"][0]["market"] = "spot"
    plan["stages"][1]["market"] = "spot"
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE),
                     sample(synthetic.SEARCH_SPACE, 4, seed=1), plan, 1)
    t0 = storage.read_json("run.json")["started"]
    storage.write_ledger({"instance": "i-od", "batch": "stage-1-batch-0", "type": TYPE, "slots": 1,
                          "market": "on-demand", "requested": t0, "running": t0 + 1, "ready": t0 + 2,
                          "terminated": None, "spot_refused": "subnet-a: InsufficientInstanceCapacity"})
    after, record = replanning.revise(storage, plan, 2, now=t0 + 100)
    assert record["spot_fallback"]["batches"] == ["stage-1-batch-0"]
    assert after["stages"][1]["market"] == "on-demand"


def test_after_a_spot_refusal_the_re_plan_buys_on_demand_and_may_release_the_spot_instances(storage):
    """Stage 1 got one spot instance and, EC2 refusing spot for its second batch, one on-demand
    one. The spot instance is interrupted all the time against a tight deadline: the re-plan
    before stage 2 sees it as spot, buys nothing spot, and releases it, where keeping the oldest
    instance (LIFO) would have kept it."""
    plan, t0 = _interrupted_spot_run(storage)
    entry = {"type": TYPE, "slots": 1, "running": t0 + 2, "ready": t0 + 3, "terminated": None}
    storage.write_ledger({**entry, "instance": "i-spot", "batch": "stage-1-batch-0", "market": "spot",
                          "price_per_hour": SPOT_PRICE, "requested": t0})
    storage.write_ledger({**entry, "instance": "i-od", "batch": "stage-1-batch-1", "market": "on-demand",
                          "price_per_hour": 1.0, "requested": t0 + 1,
                          "spot_refused": "subnet-a: InsufficientInstanceCapacity"})

    after, record = replanning.revise(storage, plan, 2, now=t0 + 10)
    assert "spot_fallback" in record and record["state"]["buy_markets"] == ["on-demand"]
    assert [f["instance_type"] for f in record["state"]["fleet"]] == [TYPE + SPOT_SUFFIX, TYPE]
    assert [s["market"] for s in after["stages"][1:]] == ["on-demand", "on-demand"]
    run_plan = RunPlan.from_json(after)
    backend = _ledger_backend(storage)
    missing, terminated = runner.stage_targets(backend, run_plan, 2, ["i-spot", "i-od"],
                                               run_plan.allocation(2).instances)
    assert "i-spot" in terminated and "i-od" not in terminated
    # The report's predictions of the stage ends count that re-plan too (its fleet of both markets).
    predicted = stage_predictions(plan, [{**record, "after": after}], {1: 5.0, 2: 20.0})
    assert [p["plan"] for p in predicted] == ["first plan", "re-plan before stage 2"]
