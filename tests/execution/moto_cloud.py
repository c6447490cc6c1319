"""A cloud for tests: moto's server on 127.0.0.1 (EC2, S3, IAM) and what moto leaves out.

moto keeps EC2's books but runs nothing. ``Hypervisor`` plays the rest, as EC2 and cloud-init
would: when an instance is running it reads the instance's user data, serves the instance an
IMDSv2 endpoint with its id, and starts the agent command the user data names (as a real
process, in a session of its own); when the instance stops or terminates it ends that process
group; when the agent exits by itself the user data's ``shutdown -h now`` runs, which here
terminates or stops the instance as its InstanceInitiatedShutdownBehavior says. ``interrupt``
plays a spot interruption: the instance's metadata service serves the notice
(``spot/instance-action``) and the instance is terminated at the notice's time.

Use the ``moto_cloud`` fixture (import it into the test module), or ``cloud`` with a moto server of
your own.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import boto3
import fsspec
import pytest
from moto.server import ThreadedMotoServer

from rubberband_airflow.execution.storage import RunStorage
from tests.served import Served

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
BUCKET = "rubberband-test"


class _ImdsHandler(BaseHTTPRequestHandler):
    server: _Imds

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._send(200, self.server.token)
        else:
            self._send(400, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            self._send(401, "")  # IMDSv2 required: no token, no metadata
        elif self.path == "/latest/meta-data/instance-id":
            self._send(200, self.server.instance_id)
        elif self.path == "/latest/meta-data/spot/instance-action" and self.server.spot_notice:
            self._send(200, self.server.spot_notice)
        else:
            self._send(404, "")

    def _send(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class _Imds(Served):
    """One instance's metadata service: a session token, then its instance id."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.token = secrets.token_urlsafe(16)
        self.spot_notice: str | None = None  # the body of spot/instance-action, once interrupted
        super().__init__(_ImdsHandler)


def agent_args(user_data: str) -> list[str] | None:
    """The arguments of the ``rubberband-agent`` command in a user-data script, if it has one."""
    for line in user_data.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "rubberband-agent":
            return words[1:]
    return None


@dataclass
class _Booted:
    process: subprocess.Popen
    imds: _Imds


class Hypervisor:
    """Boots and halts the agents of moto's instances (see the module's docstring)."""

    def __init__(self, endpoint: str, env: dict[str, str], log_dir: Path, poll: float = 0.25) -> None:
        self.ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=REGION)
        self.env = env
        self.log_dir = log_dir
        self.poll = poll
        self.booted: dict[str, _Booted] = {}
        self.done: set[str] = set()  # instances booted once (an instance's user data runs once)
        self.interruptions: dict[str, float] = {}  # instance: when EC2 takes it back (time.time())
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hypervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop watching and end every agent still running."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            for instance in list(self.booted):
                self._halt(instance)

    def interrupt(self, instance: str, notice_seconds: float = 120.0) -> None:
        """A spot interruption: the notice now, the instance terminated ``notice_seconds`` later."""
        when = time.time() + notice_seconds
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
        with self._lock:
            self.booted[instance].imds.spot_notice = json.dumps({"action": "terminate", "time": stamp})
            self.interruptions[instance] = when

    def sync(self) -> None:
        """One look at EC2: boot what runs, halt what stopped or terminated, power off where the agent
        exited, take back interrupted instances whose time has come."""
        with self._lock:
            due = [i for i, when in self.interruptions.items() if when <= time.time()]
            for instance in due:
                del self.interruptions[instance]
                self.ec2.terminate_instances(InstanceIds=[instance])
            pages = self.ec2.get_paginator("describe_instances").paginate()
            for inst in [i for page in pages for r in page["Reservations"] for i in r["Instances"]]:
                instance, state = inst["InstanceId"], inst["State"]["Name"]
                if state == "running" and instance not in self.done:
                    self._boot(instance)
                elif state not in ("pending", "running") and instance in self.booted:
                    self._halt(instance)
            for instance, booted in list(self.booted.items()):
                if booted.process.poll() is not None:  # the script goes on to `shutdown -h now`
                    self._halt(instance)
                    self._power_off(instance)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.sync()
            except Exception as e:  # reported by the fixture at teardown
                self.errors.append(f"{type(e).__name__}: {e}")

    def _boot(self, instance: str) -> None:
        self.done.add(instance)
        attr = self.ec2.describe_instance_attribute(InstanceId=instance, Attribute="userData")
        user_data = base64.b64decode(attr.get("UserData", {}).get("Value", "")).decode()
        args = agent_args(user_data)
        if args is None:
            return  # not a RubberBand instance: nothing to start
        imds = _Imds(instance)
        with open(self.log_dir / f"{instance}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "rubberband_airflow.execution.agent", *args],
                                       env={**self.env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url},
                                       start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.booted[instance] = _Booted(process, imds)

    def _halt(self, instance: str, grace: float = 10.0) -> None:
        """As at an instance's shutdown: SIGTERM every process of the agent, SIGKILL what is left."""
        booted = self.booted.pop(instance)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(booted.process.pid, sig)
                os.killpg(booted.process.pid, signal.SIGCONT)  # a hung (stopped) agent goes down too
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(booted.process.pid):
                booted.process.poll()  # reap the agent itself
                time.sleep(0.05)
            if not _group_alive(booted.process.pid):
                break
        booted.process.wait()
        booted.imds.close()

    def _power_off(self, instance: str) -> None:
        attr = self.ec2.describe_instance_attribute(InstanceId=instance, Attribute="instanceInitiatedShutdownBehavior")
        if attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate":
            self.ec2.terminate_instances(InstanceIds=[instance])
        else:
            self.ec2.stop_instances(InstanceIds=[instance])


def _group_alive(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@dataclass
class MotoCloud:
    endpoint: str
    image_id: str
    subnets: list[str]
    security_group: str
    instance_profile: str  # ARN
    hypervisor: Hypervisor

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION)

    def storage(self, name: str) -> RunStorage:
        return RunStorage(f"s3://{BUCKET}/{name}")

    def instances(self, states: tuple[str, ...] = ("pending", "running"), **tags: str) -> list[dict[str, Any]]:
        """Instances in ``states`` with these tags (keys given without the ``rubberband:`` prefix)."""
        filters = [{"Name": f"tag:rubberband:{k}", "Values": [v]} for k, v in tags.items()]
        filters.append({"Name": "instance-state-name", "Values": list(states)})
        pages = self.client("ec2").get_paginator("describe_instances").paginate(Filters=filters)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def cloud_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the cloud at ``endpoint``: keys and s3fs's endpoint (as an agent on
    an instance has them), and the Airflow connection ``aws_default`` (all the Airflow side needs)."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                                    "extra": {"region_name": REGION, "endpoint_url": endpoint}}),
            "FSSPEC_S3_ENDPOINT_URL": endpoint,  # s3fs's endpoint, through fsspec's config from the environment
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@contextmanager
def cloud(mp: pytest.MonkeyPatch, endpoint: str, log_dir: Path) -> Iterator[MotoCloud]:
    """Set up the account behind a fresh moto server at ``endpoint`` (a VPC, two subnets, a security
    group, an instance profile and a bucket), point this process's environment at it, run a Hypervisor."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        mp.delenv(name, raising=False)
    for name, value in cloud_env(endpoint).items():
        mp.setenv(name, value)
    # This process read fsspec's environment config when it imported fsspec: give it the endpoint too.
    mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})

    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=BUCKET)
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{k}.0/24", AvailabilityZone=f"{REGION}{az}")
               ["Subnet"]["SubnetId"] for k, az in ((1, "a"), (2, "b"))]
    group = ec2.create_security_group(GroupName="rubberband", Description="agents", VpcId=vpc)["GroupId"]
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION)
    iam.create_role(RoleName="rubberband-agent", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                 "Action": "sts:AssumeRole"}]}))
    profile = iam.create_instance_profile(InstanceProfileName="rubberband-agent")["InstanceProfile"]["Arn"]
    iam.add_role_to_instance_profile(InstanceProfileName="rubberband-agent", RoleName="rubberband-agent")
    image = ec2.describe_images()["Images"][0]["ImageId"]

    log_dir.mkdir(parents=True, exist_ok=True)
    hypervisor = Hypervisor(endpoint, dict(os.environ), log_dir)
    hypervisor.start()
    try:
        yield MotoCloud(endpoint, image, subnets, group, profile, hypervisor)
    finally:
        hypervisor.close()
    assert hypervisor.errors == [], hypervisor.errors


@pytest.fixture
def moto_cloud(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MotoCloud]:
    """A moto server in this process, set up by ``cloud``: the AWS connection ``aws_default`` and
    s3:// storage point at it."""
    werkzeug = logging.getLogger("werkzeug")  # moto's server logs every request
    monkeypatch.setattr(werkzeug, "level", logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto's state lives in this process and outlives a server: start from an empty cloud.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    try:
        with cloud(monkeypatch, endpoint, tmp_path / "agents") as c:
            yield c
    finally:
        server.stop()


def airflow_side(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the ambient AWS keys and s3fs endpoint: Airflow must reach the cloud through its connection."""
    return {k: v for k, v in env.items() if not k.startswith(("AWS_", "FSSPEC_"))}
