"""The ``ec2`` backend: GPU instances launched through a boto3 EC2 client.

The backend takes the client it is given (the Airflow side hands it ``EC2Hook``'s, so it acts
with the spec's AWS connection) and imports nothing of Airflow.

Every instance carries the run's tags (``rubberband:deployment``, ``rubberband:dag_id``,
``rubberband:run_id``, ``rubberband:attempt``, ``rubberband:batch``), which is how a batch is
found again (a retried launch returns the batch this attempt launched before, never another
attempt's or another deployment's) and how a sweeper finds what a run left behind even
without its ledger. Instances require IMDSv2, and their user data only starts the agent with the run's
storage URI, its slot count and the trial timeout: hyperparameters stay in storage. When the
agent exits, the instance powers off, and powering off terminates it.

A batch may be launched as spot (one-time requests, terminated on interruption); when no subnet
has spot capacity for it, it is launched on demand instead, and its ledger entries say so.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from rubberband_airflow.execution.backends.base import ComputeBackend, Market, refuse_if_superseded
from rubberband_airflow.execution.storage import RunStorage

log = logging.getLogger(__name__)

# Launch errors after which the next subnet (another availability zone) is tried.
RETRYABLE_LAUNCH_ERRORS: frozenset[str] = frozenset({"InsufficientInstanceCapacity", "Unsupported"})
# Spot launch errors after which the next subnet is tried, and once every subnet refused, the
# batch is launched on demand: no spot capacity, the spot price above the on-demand price (the
# default maximum), the account's spot quota reached, spot not offered for the type there.
SPOT_CAPACITY_ERRORS: frozenset[str] = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "UnfulfillableCapacity", "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded", "Unsupported"})
# One-time spot requests: an interrupted instance is terminated, never stopped or requested again
# (its trials resume elsewhere from their checkpoints).
SPOT_OPTIONS = {"MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
# States in which an instance may still bill (compute or its volumes): what the sweeper terminates.
BILLABLE_STATES = ("pending", "running", "stopping", "stopped")
TAG_VALUE_MAX = 256  # characters, EC2's limit
# Keeps two Airflow deployments in one AWS account apart: each touches only instances with its name.
DEPLOYMENT_TAG = "rubberband:deployment"
DEFAULT_DEPLOYMENT = "default"
_FILTER_VALUES_MAX = 200  # instance ids per describe filter


class LaunchError(RuntimeError):
    """EC2 refused to launch a batch."""


class CapacityError(LaunchError):
    """No subnet had capacity for the batch."""

    def __init__(self, message: str, refused: list[str]) -> None:
        super().__init__(message)
        self.refused = refused  # "subnet: error code", one per subnet tried


class EC2Backend(ComputeBackend):
    def __init__(self, storage: RunStorage, instance_type: str, image_id: str, subnets: Sequence[str],
                 security_groups: Sequence[str], instance_profile: str, dag_id: str, run_id: str, slots: int,
                 trial_timeout: float = 3600.0, key_name: str | None = None, *, client: Any,
                 idle_timeout: float | None = None, attempt: int = 1, deployment: str = DEFAULT_DEPLOYMENT,
                 market: Market = Market.ON_DEMAND, spot_price: float | None = None,
                 price: float | None = None) -> None:
        """``client`` is a boto3 EC2 client; ``subnets`` are tried in order; ``instance_profile`` is
        a name or an ARN; ``slots`` is the GPUs per instance; ``attempt`` is the attempt of the DAG
        run (1, then one more per clear) and ``deployment`` the Airflow deployment's name;
        ``market`` is where a launch that names none buys its instances, ``spot_price`` the hourly
        price a spot instance is billed at in the ledger (None: its type's on-demand price), ``price``
        the on-demand one (None: the planning problem's for the type)."""
        if not subnets:
            raise ValueError("at least one subnet is needed")
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        for name, value in (("dag_id", dag_id), ("run_id", run_id), ("deployment", deployment)):
            _check_tag_value(name, value)
        if attempt < 1:
            raise ValueError(f"attempt must be at least 1, got {attempt}")
        self.storage = storage
        self.instance_type = instance_type
        self.image_id = image_id
        self.subnets = list(subnets)
        self.security_groups = list(security_groups)
        self.instance_profile = instance_profile
        self.dag_id = dag_id
        self.run_id = run_id
        self.attempt = attempt
        self.deployment = deployment
        self.slots = slots
        self.trial_timeout = trial_timeout
        # An agent with nothing to run this long exits and its instance terminates: a backstop for
        # a run whose orchestrator is gone (runner.RunPlan.agent_idle_seconds; by default twice the
        # trial timeout).
        self.idle_timeout = idle_timeout if idle_timeout is not None else 2 * trial_timeout
        self.key_name = key_name
        self.market = Market(market)
        if spot_price is not None and not spot_price > 0:
            raise ValueError(f"spot_price must be positive, got {spot_price!r}")
        self.spot_price = spot_price
        self.price = price
        self._recorded: set[tuple[str, str]] = set()  # (instance, ledger key) already set
        self.client = client

    # --- what an instance is launched with ---
    def user_data(self) -> str:
        """The cloud-init script: run the agent, then power off (which terminates the instance)."""
        agent = ["rubberband-agent", "--run", self.storage.uri, "--instance", "imds", "--slots", str(self.slots),
                 "--trial-timeout", str(self.trial_timeout), "--idle-timeout", str(self.idle_timeout)]
        return "\n".join([
            "#!/bin/bash",
            "# RubberBand instance agent. No secret and no hyperparameter here: trials come from the run's storage.",
            "exec >>/var/log/rubberband-agent.log 2>&1",
            shlex.join(agent),
            "shutdown -h now",
            "",
        ])

    def run_tags(self) -> dict[str, str]:
        """The tags of every instance of the run, whatever its attempt."""
        return {DEPLOYMENT_TAG: self.deployment, "rubberband:dag_id": self.dag_id, "rubberband:run_id": self.run_id}

    def attempt_tags(self) -> dict[str, str]:
        """The tags of every instance of this attempt of the run."""
        return {**self.run_tags(), "rubberband:attempt": str(self.attempt)}

    def tags(self, batch: str) -> dict[str, str]:
        """Instance and volume tags; the informational ones are cut to EC2's 256 characters."""
        return {**self.attempt_tags(), "rubberband:batch": batch, "rubberband:run": self.storage.uri[:TAG_VALUE_MAX],
                "Name": f"rubberband {self.dag_id} {batch}"[:TAG_VALUE_MAX]}

    def client_token(self, batch: str, subnet: str, market: Market = Market.ON_DEMAND) -> str:
        """EC2's idempotency token for one launch request (64 characters, EC2's limit): one per
        deployment, run, attempt, batch, subnet and market (an on-demand request after a refused
        spot one is another request)."""
        key = [self.deployment, self.dag_id, self.run_id, str(self.attempt), batch, subnet]
        if market == Market.SPOT:
            key.append(str(market))
        return hashlib.sha256("\n".join(key).encode()).hexdigest()[:64]

    def request(self, batch: str, count: int, subnet: str, market: Market = Market.ON_DEMAND) -> dict[str, Any]:
        """The ``run_instances`` arguments for ``count`` instances of ``batch`` in ``subnet`` and ``market``."""
        tags = [{"Key": k, "Value": v} for k, v in self.tags(batch).items()]
        profile = {"Arn" if self.instance_profile.startswith("arn:") else "Name": self.instance_profile}
        out: dict[str, Any] = {
            "ImageId": self.image_id, "InstanceType": self.instance_type, "MinCount": count, "MaxCount": count,
            "ClientToken": self.client_token(batch, subnet, market), "SubnetId": subnet,
            "SecurityGroupIds": self.security_groups, "IamInstanceProfile": profile,
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "InstanceInitiatedShutdownBehavior": "terminate", "UserData": self.user_data(),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags}],
        }
        if self.key_name:
            out["KeyName"] = self.key_name
        if market == Market.SPOT:
            out["InstanceMarketOptions"] = SPOT_OPTIONS
        return out

    # --- the backend interface ---
    def launch(self, batch: str, count: int, market: Market | None = None) -> list[str]:
        """Launch the batch in ``market`` (None: the backend's). A spot batch that no subnet has
        spot capacity for is launched on demand; its ledger entries record the refusals
        (``spot_refused``)."""
        _check_tag_value("batch", batch)
        refuse_if_superseded(self.storage)
        market = Market(market or self.market)
        found = self._instances(("pending", "running"), {**self.attempt_tags(), "rubberband:batch": batch})
        if found:  # a retry: EC2 already has this batch (moto ignores ClientToken, so look by tags)
            self._adopt([i for i in found if self._entry(i["InstanceId"]) is None])
            return [i["InstanceId"] for i in found]
        requested = time.time()
        # A request an earlier try of this launch sent without recording its instances (its reply
        # lost, or the task killed) is sent first again, with the same ClientToken: EC2 answers it
        # with the instances it launched then, which its describe may not list yet.
        in_flight = self.storage.read_json("launches", f"{batch}.json")
        refused: list[str] = list(in_flight["refused"]) if in_flight else []
        first = in_flight["subnet"] if in_flight else None
        launched = None
        if market == Market.SPOT and not (in_flight and in_flight["market"] == Market.ON_DEMAND):
            try:
                launched = self._run_instances(batch, count, Market.SPOT, first)
            except CapacityError as e:
                refused = e.refused
                log.warning("no spot capacity for batch %s (%s): launching it on demand", batch, "; ".join(refused))
        if launched is None:
            market = Market.ON_DEMAND
            launched = self._run_instances(batch, count, market, first, refused)
        ids = [i["InstanceId"] for i in launched]
        for instance in ids:
            self._write_new_entry(instance, batch, requested, market, refused)
        self.storage.delete("launches", f"{batch}.json")
        return ids

    def adopt(self) -> list[str]:
        """This attempt's pending and running instances that EC2 lists and the ledger lacks get
        their entries (batch and market from their tags and lifecycle, requested at launch)."""
        known = {e["instance"] for e in self.storage.ledger()}
        lost = [i for i in self._instances(("pending", "running"), self.attempt_tags()) if i["InstanceId"] not in known]
        if lost:
            log.warning("adopting instances EC2 runs for this run that its ledger lacks: %s",
                        ", ".join(i["InstanceId"] for i in lost))
        self._adopt(lost)
        return [i["InstanceId"] for i in lost]

    def _adopt(self, instances: list[dict[str, Any]]) -> None:
        """Ledger entries for instances EC2 describes (launched, but the ledger was not written);
        an entry the launcher wrote meanwhile wins."""
        for i in instances:
            tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
            bought = Market.SPOT if i.get("InstanceLifecycle") == "spot" else Market.ON_DEMAND
            entry = self._new_entry(i["InstanceId"], tags.get("rubberband:batch", "?"),
                                    i["LaunchTime"].timestamp(), bought)
            self.storage.create_json(entry, "ledger", f"{i['InstanceId']}.json")

    def describe(self, instances: list[str]) -> dict[str, str]:
        """pending, running or terminated. Shutting-down, stopping and stopped count as terminated
        (no agent runs there), and so does an instance EC2 no longer lists after it was seen running.
        Records in the ledger when an instance is first seen running, and when it is first seen gone."""
        return self._observe(instances, self._states(instances))

    def _observe(self, instances: list[str], raw: dict[str, tuple[str, float]]) -> dict[str, str]:
        now = time.time()
        out = {}
        for instance in instances:
            if instance in raw:
                name, launched = raw[instance]
                state = name if name in ("pending", "running") else "terminated"
            else:  # not listed yet (EC2 is eventually consistent), or long gone
                entry = self._entry(instance)
                state, launched = ("terminated" if entry and entry.get("running") is not None else "pending"), None
            if state == "pending":
                self._record(instance, "seen_pending", now)
            else:
                self._record_running(instance, now, launched)
                if state == "terminated":
                    self._record(instance, "terminated", now)
            out[instance] = state
        return out

    def terminate(self, instances: list[str]) -> None:
        """Every id goes to EC2 (one EC2 does not list yet too) before the ledger is written, so a
        storage error cannot keep an instance running."""
        raw = self._states(instances)
        terminate_instances(self.client, instances)
        self._observe(instances, raw)  # the ledger learns when each instance started to bill
        now = time.time()
        for instance in instances:
            self._record(instance, "terminated", now)

    def terminate_run(self) -> list[str]:
        """Terminate every instance with this run's deployment, DAG and run tags that may still bill,
        of any attempt, ledger or not."""
        ids = [i["InstanceId"] for i in self._instances(BILLABLE_STATES, self.run_tags())]
        if ids:
            self.terminate(ids)
        return ids

    def terminate_all(self) -> list[str]:
        """Terminate what the ledger lists, then sweep the run's tags for anything it missed (also
        when the ledger cannot be read)."""
        ids: list[str] = []
        try:
            ids = super().terminate_all()
        finally:
            ids += [i for i in self.terminate_run() if i not in ids]
        return ids

    # --- helpers ---
    def _run_instances(self, batch: str, count: int, market: Market, first: str | None = None,
                       spot_refused: Sequence[str] = ()) -> list[dict[str, Any]]:
        """One ``run_instances`` per subnet in order (``first`` first) until one launches the batch
        in ``market``. Each request is recorded before it is sent (``launches/<batch>.json``, with
        the spot refusals before it), so that a retry can send it again."""
        retryable = SPOT_CAPACITY_ERRORS if market == Market.SPOT else RETRYABLE_LAUNCH_ERRORS
        what = f"{count} {self.instance_type}" + (" spot" if market == Market.SPOT else "")
        refused = []
        for subnet in sorted(self.subnets, key=lambda s: s != first):
            self.storage.write_json({"subnet": subnet, "market": str(market), "refused": list(spot_refused)},
                                    "launches", f"{batch}.json")
            try:
                return self.client.run_instances(**self.request(batch, count, subnet, market))["Instances"]
            except ClientError as e:
                error = e.response.get("Error", {})
                code, message = error.get("Code", "?"), error.get("Message", "")
                if code not in retryable:
                    raise LaunchError(f"EC2 refused to launch {what} for batch {batch!r} "
                                      f"in subnet {subnet}: {code}: {message}") from e
                refused.append(f"{subnet}: {code}")
        raise CapacityError(f"no capacity for {what} for batch {batch!r} in any of the "
                            f"subnets {', '.join(self.subnets)} ({'; '.join(refused)}); try other subnets "
                            f"(availability zones), another instance type, or later", refused)

    def _instances(self, states: Iterable[str], want: Mapping[str, str]) -> list[dict[str, Any]]:
        """The instances in ``states`` that carry the tags ``want``, oldest first."""
        return tagged_instances(self.client, states, want)

    def _states(self, instances: list[str]) -> dict[str, tuple[str, float]]:
        """EC2's state name and launch time of each listed instance (unlisted ones are left out)."""
        out = {}
        for chunk in _chunks(instances):
            for i in describe_instances(self.client, [{"Name": "instance-id", "Values": chunk}]):
                out[i["InstanceId"]] = (i["State"]["Name"], i["LaunchTime"].timestamp())
        return out

    def _entry(self, instance: str) -> dict[str, Any] | None:
        return self.storage.read_json("ledger", f"{instance}.json")

    def _record(self, instance: str, key: str, when: Any) -> None:
        """Set a ledger field of an instance (``terminated``, ``seen_pending``) unless it is set."""
        if (instance, key) in self._recorded:
            return
        entry = self._entry(instance)
        if entry is not None and entry.get(key) is None:
            entry[key] = when
            self.storage.write_ledger(entry)
        self._recorded.add((instance, key))

    def _record_running(self, instance: str, now: float, launched: float | None) -> None:
        """When the instance started to bill. Seen pending before: the first look that finds it
        running, or its agent's ready time if earlier. Never seen pending: EC2's launch time, which
        is up to the pending time early, so the bill is overestimated, never under."""
        if (instance, "running") in self._recorded:
            return
        entry = self._entry(instance)
        if entry is not None and entry.get("running") is None:
            if entry.get("seen_pending") or launched is None:
                ready = (self.storage.heartbeat(instance) or {}).get("ready")
                entry["running"] = min(now, ready) if ready is not None else now
            else:  # EC2 gives whole seconds: never before the request
                entry["running"] = max(launched, entry.get("requested") or launched)
            self.storage.write_ledger(entry)
        self._recorded.add((instance, "running"))

    def _write_new_entry(self, instance: str, batch: str, requested: float, market: Market,
                         spot_refused: list[str] | None = None) -> None:
        """Create-only: an entry already there (adopted meanwhile, and perhaps terminated since) stands."""
        self.storage.create_json(self._new_entry(instance, batch, requested, market, spot_refused),
                                 "ledger", f"{instance}.json")

    def _new_entry(self, instance: str, batch: str, requested: float, market: Market,
                   spot_refused: list[str] | None = None) -> dict[str, Any]:
        """A launched instance's ledger entry with its hourly price where the backend knows it (a
        spot one without a spot price is billed on demand); one launched on demand after spot was
        refused records the refusals."""
        entry: dict[str, Any] = {"instance": instance, "batch": batch, "type": self.instance_type,
                                 "slots": self.slots, "market": str(market), "requested": requested,
                                 "running": None, "ready": None, "terminated": None}
        price = self.spot_price if market == Market.SPOT and self.spot_price is not None else self.price
        if price is not None:
            entry["price_per_hour"] = price
        if spot_refused:
            entry["spot_refused"] = "; ".join(spot_refused)
        return entry


def describe_instances(client: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every instance the EC2 ``client`` lists under ``filters``, all pages read."""
    pages = client.get_paginator("describe_instances").paginate(Filters=filters)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def tagged_instances(client: Any, states: Iterable[str], want: Mapping[str, str]) -> list[dict[str, Any]]:
    """The instances in ``states`` that carry exactly the tags ``want``, oldest first."""
    filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in want.items()]
    filters.append({"Name": "instance-state-name", "Values": list(states)})
    # Tag filters treat * and ? as wildcards: keep only exact matches.
    found = [i for i in describe_instances(client, filters)
             if want.items() <= {t["Key"]: t["Value"] for t in i.get("Tags", [])}.items()]
    return sorted(found, key=lambda i: (i["LaunchTime"], i.get("AmiLaunchIndex", 0), i["InstanceId"]))


def terminate_tagged(client: Any, tags: Mapping[str, str]) -> list[str]:
    """Terminate every instance that may still bill and carries exactly ``tags``, with no ledger
    (teardown's last net); returns their ids."""
    ids = [i["InstanceId"] for i in tagged_instances(client, BILLABLE_STATES, tags)]
    terminate_instances(client, ids)
    return ids


def terminate_instances(client: Any, instances: list[str]) -> None:
    """Terminate ``instances`` through the EC2 ``client``, at most 200 a request. Should EC2 not
    know an id yet (it is eventually consistent), the others of its request are sent one by one."""
    for chunk in _chunks(instances):
        log.info("Terminating instances: %s", chunk)
        try:
            client.terminate_instances(InstanceIds=chunk)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound" or len(chunk) == 1:
                raise
            for instance in chunk:
                try:
                    client.terminate_instances(InstanceIds=[instance])
                except ClientError as one:
                    if one.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                        raise
                    log.warning("EC2 does not know instance %s (yet): not terminated", instance)


def _check_tag_value(name: str, value: str) -> None:
    if not value or len(value) > TAG_VALUE_MAX:
        raise ValueError(f"{name} must be 1 to {TAG_VALUE_MAX} characters to be an EC2 tag, got {len(value)}")


def _chunks(items: list[str], size: int = _FILTER_VALUES_MAX) -> list[list[str]]:
    return [items[k:k + size] for k in range(0, len(items), size)]
