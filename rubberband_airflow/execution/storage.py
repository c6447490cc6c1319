"""One tuning run's files in object storage (fsspec: file:// locally, s3:// on AWS).

A tuning DAG's folder is ``<storage>/<dag_id>``; each attempt of a DAG run has a folder of its
own under it: ``<run_id>`` for the first, ``<run_id>.attempt-<n>`` for a later one, n being one
more than the run's clear number (Airflow's count of its clears) when its ``start_run`` ran. A
clear that re-runs start_run starts a new attempt in a new folder (which may keep copies of what
an earlier one finished, marked as such); a clear of later tasks only continues the attempt
named in start_run's XCom. So a report never mixes attempts.
``best_config.json`` beside them is the DAG's latest published best configuration.

Layout under the run (attempt) prefix:

    spec.json                            the run's own copy of its spec, the form's values, attempt, deployment
    run.json                             trainable, metric, mode, seed, start time
    plan.json                            the plan being executed
    trials/<trial>/config.json           hyperparameters (JSON, never a shell argument)
    trials/<trial>/metrics/<epoch>.json  one record per epoch, written by rank 0
    trials/<trial>/checkpoint.pt         the latest checkpoint, headed by its trial and epoch
    trials/<trial>/stage-<i>.json        the trial's result in stage i: done or failed, and why (written once)
    trials/<trial>/stage-<i>.try-<k>.json  its result in the k-th try of stage i (a failed trial run again)
    stages/<i>/start-tries/<try>.json    when a try of the stage's start began (written once per try)
    stages/<i>/placement.json            the stage's placement (written once: a retried place reuses it)
    stages/<i>/<instance>.json           the trials assigned to an instance in stage i, in order
    stages/<i>/recovery/<instance>.json  where the trials of an instance lost in stage i went
    stages/<i>/retries/<k>.json          the k-th try (k >= 2) of the stage's failed trials, after a clear
    stages/<i>/promoted.json             the stage's outcome and every trial's result in it, once promote succeeded
    carried.json                         what this attempt kept of an earlier one's results, or why nothing
    stages/<i>/plan.json                 the plan stages i on execute, re-planned before stage i (written once)
    stages/<i>/replan.json               the re-plan before stage i: time, state, observed, the plan before and after
    instances/<instance>/heartbeat.json  the agent's latest heartbeat (its first one marks ready)
    instances/<instance>/stop            asks the agent to stop
    ledger/<instance>.json               request, running, ready and termination times
    report.json                          the run's report
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_READ_TRIES = 4


@dataclass(frozen=True)
class RunStorage:
    """Reads and writes the files of one run under ``uri`` (a directory URL).

    ``filesystem`` is the fsspec filesystem to reach it with; by default fsspec's for the URL,
    with the process's own credentials (an agent's instance profile). The Airflow side passes
    one made from its connection (``rubberband_airflow.hooks.storage``).
    """

    uri: str
    filesystem: fsspec.AbstractFileSystem | None = field(default=None, compare=False, repr=False)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.filesystem if self.filesystem is not None else fsspec.core.url_to_fs(self.uri)[0]

    @property
    def root(self) -> str:
        if self.filesystem is not None:
            return self.filesystem._strip_protocol(self.uri).rstrip("/")
        return fsspec.core.url_to_fs(self.uri)[1].rstrip("/")

    def child(self, *parts: str) -> RunStorage:
        """The storage of a folder under this one, reached the same way."""
        return RunStorage(self.url(*parts), self.filesystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])

    # --- plain objects ---
    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write atomically where the store allows it (a temporary name, then a rename on file://)."""
        fs, path = self.fs, self.path(*parts)
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        if _is_local(fs):
            tmp = f"{path}.tmp-{time.monotonic_ns()}"
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        else:
            with fs.open(path, "wb") as f:
                f.write(data)

    def create_bytes(self, data: bytes, *parts: str) -> bool:
        """Write only where nothing is yet: True if this call wrote it, False if something was there.

        Create-only, so that of two writers exactly one wins: on file:// a complete temporary file
        is hard-linked to the name (which fails if the name exists), on S3 a conditional PUT
        (``If-None-Match: *``) that S3 refuses with 412 when the object exists.
        """
        fs, path = self.fs, self.path(*parts)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if _is_local(fs):
            tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            with fs.open(tmp, "wb") as f:
                f.write(data)
            try:
                fs.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                fs.rm_file(tmp)
            return True
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read_bytes(self, *parts: str) -> bytes | None:
        """The object's content, or None if it does not exist.

        Heartbeats and ledgers are rewritten while others read them: on S3 an object replaced
        between a read's requests fails it (precondition failed), so such a read is tried again.
        """
        return self._read(self.path(*parts))

    def _small(self) -> dict[str, Any]:
        """What reads a small object in one request: s3fs (and adlfs) first ask an object's size, to
        read a large one (a checkpoint) in concurrent ranges; that doubled every read of a result."""
        return {"max_concurrency": 1} if getattr(self.fs, "max_concurrency", 1) > 1 else {}

    def _read(self, path: str, **kwargs: Any) -> bytes | None:
        for attempt in range(_READ_TRIES):
            try:
                return self.fs.cat_file(path, **kwargs)
            except FileNotFoundError:
                return None
            except OSError:
                if attempt == _READ_TRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        return None

    def read_json_many(self, paths: list[tuple[str, ...]]) -> list[Any]:
        """Several JSON objects (None where one does not exist), fetched together: on S3 the GETs
        run concurrently, so a ledger of hundreds of instances is one round of requests."""
        if not paths:
            return []
        full = [self.path(*parts) for parts in paths]
        if any(c in self.root for c in "*?["):  # fsspec would take the paths for glob patterns
            return [self.read_json(*parts) for parts in paths]
        got = self.fs.cat(full, on_error="return", **self._small())
        out: list[Any] = []
        for parts, path in zip(paths, full):
            data = got.get(path) if isinstance(got, dict) else None
            if isinstance(data, FileNotFoundError):
                out.append(None)
            elif not isinstance(data, bytes):  # an error (e.g. replaced mid-read), or not returned: on its own
                out.append(self.read_json(*parts))
            else:
                out.append(json.loads(data))
        return out

    def write_json(self, value: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=1, sort_keys=True).encode(), *parts)

    def create_json(self, value: Any, *parts: str) -> bool:
        """Write a JSON object only where none is yet (see ``create_bytes``)."""
        return self.create_bytes(json.dumps(value, indent=1, sort_keys=True).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        data = self._read(self.path(*parts), **self._small())
        return None if data is None else json.loads(data)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def delete(self, *parts: str) -> None:
        try:
            self.fs.rm(self.path(*parts))
        except FileNotFoundError:
            pass

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under a folder (empty if it does not exist)."""
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(*parts))

    def subfolders(self, *parts: str) -> list[str]:
        """Names of the folders directly under a folder (on S3: the common prefixes)."""
        entries = self._ls(*parts)
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def _ls(self, *parts: str) -> list[dict[str, Any]]:
        """A fresh listing of a folder, left out of fsspec's listings cache: s3fs lists the parent of
        an empty folder and would answer a later read of a new file beside it from that listing,
        as not found (the same process polling a trial's metrics, then its result)."""
        path = self.path(*parts)
        try:
            return list(self.fs.ls(path, detail=True, refresh=True))
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(path)

    def _find(self, *parts: str) -> list[str]:
        """Every file under a folder, from one listing (on S3 a flat one, a request per 1000 objects),
        left out of fsspec's cache: s3fs caches the listing of every folder it saw, and would answer
        later reads under it from that listing (a result written since: not found)."""
        path = self.path(*parts)
        try:
            return list(self.fs.find(path))
        except FileNotFoundError:
            return []
        finally:
            self._forget(path)

    def modified(self, *parts: str) -> dict[str, float]:
        """When each file under a folder was last written (Unix time, by the store's clock), by its
        path below the folder, from one listing (as ``_find``)."""
        path = self.path(*parts)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        finally:
            self._forget(path)
        out = {}
        for name, info in found.items():
            when = written_time(info)
            if when is not None:
                out[name[len(path):].lstrip("/")] = when
        return out

    def written(self, *parts: str) -> float | None:
        """When a file was last written (Unix time, by the store's clock), or None if it is not there."""
        path = self.path(*parts)
        try:
            return written_time(self.fs.info(path))
        except FileNotFoundError:
            return None
        finally:
            self.fs.invalidate_cache(path)

    def _forget(self, path: str) -> None:
        """Drop what fsspec's caches hold of a folder and everything under it."""
        cache = getattr(self.fs, "dircache", None)
        for key in [k for k in list(cache or {}) if k == path or k.startswith(path + "/")]:
            cache.pop(key, None)  # type: ignore[union-attr]
        self.fs.invalidate_cache(path)

    # --- the run's records ---
    def write_config(self, trial: str, config: dict[str, Any]) -> None:
        self.write_json(config, "trials", trial, "config.json")

    def read_config(self, trial: str) -> dict[str, Any]:
        config = self.read_json("trials", trial, "config.json")
        if config is None:
            raise FileNotFoundError(f"no config for trial {trial} in {self.uri}")
        return config

    def metrics(self, trial: str) -> list[dict[str, Any]]:
        """The trial's per-epoch records, by epoch."""
        names = [n for n in self.listdir("trials", trial, "metrics") if n.endswith(".json")]
        records = [r for r in self.read_json_many([("trials", trial, "metrics", n) for n in names]) if r]
        if not records:  # a run written before metrics were one object per epoch
            data = self.read_bytes("trials", trial, "metrics.jsonl")
            records = [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data else []
        return sorted(records, key=lambda r: r.get("epoch", 0))

    def metrics_many(self, trials: list[str]) -> dict[str, list[dict[str, Any]]]:
        """``metrics`` of many trials: one listing of the run's trials (on S3 a flat listing, a
        request per 1000 objects) and their records read together, not two requests per trial."""
        wanted = set(trials)
        found = self._find("trials")
        paths: list[tuple[str, ...]] = []
        for name in found:
            parts = name.rstrip("/").rsplit("/", 3)[-3:]  # <trial>/metrics/<epoch>.json
            if len(parts) == 3 and parts[0] in wanted and parts[1] == "metrics" and parts[2].endswith(".json"):
                paths.append(("trials", *parts))
        out: dict[str, list[dict[str, Any]]] = {t: [] for t in trials}
        for path, record in zip(paths, self.read_json_many(paths)):
            if record:
                out[path[1]].append(record)
        for t, records in out.items():
            # a run written before metrics were one object per epoch
            out[t] = sorted(records, key=lambda r: r.get("epoch", 0)) if records else self.metrics(t)
        return out

    def append_metrics(self, trial: str, record: dict[str, Any]) -> None:
        """Add one epoch's record, an object of its own (no read-modify-write to race); a record for
        an epoch already there is replaced (a retried epoch)."""
        self.write_json(record, "trials", trial, "metrics", f"{int(record.get('epoch', 0)):06d}.json")

    def write_result(self, trial: str, stage: int, result: dict[str, Any], try_number: int | None = None) -> bool:
        """Record the trial's result in a try of a stage (None: its newest try), once: False (and
        nothing written) if one is there."""
        k = self.current_try(trial, stage) if try_number is None else try_number
        return self.create_json(result, "trials", trial, result_name(stage, k))

    def read_result(self, trial: str, stage: int, try_number: int | None = None) -> dict[str, Any] | None:
        """The trial's result in a try of a stage (None: its newest try, which is what counts)."""
        k = self.current_try(trial, stage) if try_number is None else try_number
        return self.read_json("trials", trial, result_name(stage, k))

    def read_results(self, stage: int, trials: list[str]) -> dict[str, dict[str, Any] | None]:
        """Each trial's result in its newest try of a stage (None: no result yet), read together."""
        tries = self.result_tries(stage)
        paths: list[tuple[str, ...]] = [("trials", t, result_name(stage, tries.get(t, 1))) for t in trials]
        return dict(zip(trials, self.read_json_many(paths)))

    def retries(self, stage: int) -> list[dict[str, Any]]:
        """The records of a stage's later tries (``stages/<i>/retries/<k>.json``), by try."""
        names = [n for n in self.listdir("stages", str(stage), "retries") if n.endswith(".json")]
        found = [r for r in self.read_json_many([("stages", str(stage), "retries", n) for n in names]) if r]
        return sorted(found, key=lambda r: int(r["try"]))

    def result_tries(self, stage: int, records: list[dict[str, Any]] | None = None) -> dict[str, int]:
        """The newest try of each trial of a stage that was tried more than once (others: 1)."""
        out: dict[str, int] = {}
        for record in self.retries(stage) if records is None else records:
            for trial in record.get("trials") or []:
                out[trial] = max(out.get(trial, 1), int(record["try"]))
        return out

    def current_try(self, trial: str, stage: int) -> int:
        """The trial's newest try of a stage: 1 unless its failure was run again after a clear."""
        return self.result_tries(stage).get(trial, 1)

    def stage_results(self, stage: int) -> set[str]:
        """The trials that have a result for (the newest try of) a stage (``stage_result_tries``)."""
        return set(self.stage_result_tries(stage))

    def stage_result_tries(self, stage: int) -> dict[str, int]:
        """The trials that have a result for the newest try of a stage, each with that try: from one
        listing of ``trials/`` (on S3 one request per 1000 objects, however many trials there are),
        left out of fsspec's cache, and one of the stage's retries."""
        path, name = self.path("trials"), f"stage-{stage}.json"
        found = self._find("trials")
        tries = self.result_tries(stage)  # one listing of the stage's retries (none: no try after a clear)
        out = {}
        for p in found:
            parts = p[len(path) + 1:].split("/")
            # a trial run again after a clear counts by its newest try's result
            if len(parts) == 2 and parts[1] == (result_name(stage, tries[parts[0]]) if parts[0] in tries else name):
                out[parts[0]] = tries.get(parts[0], 1)
        return out

    def write_assignment(self, stage: int, instance: str, tasks: list[dict[str, Any]]) -> None:
        self.write_json({"stage": stage, "tasks": tasks}, "stages", str(stage), f"{instance}.json")

    def assignments(self, instance: str) -> Iterator[dict[str, Any]]:
        """Every task assigned to this instance, stage by stage, in order: the stage's placement,
        then the trials of lost instances placed here again (``stages/<i>/recovery/*.json``), then
        later tries of failed trials (``stages/<i>/retries/*.json``; such a task has its ``try``)."""
        for stage in sorted(self.listdir("stages"), key=_stage_key):
            data = self.read_json("stages", stage, f"{instance}.json")
            if data:
                for task in data["tasks"]:
                    yield {**task, "stage": data["stage"]}
            moved = [n for n in self.listdir("stages", stage, "recovery") if n.endswith(".json")]
            for record in self.read_json_many([("stages", stage, "recovery", n) for n in moved]):
                for task in (record or {}).get("placement", {}).get(instance, []):
                    yield {**task, "stage": record["stage"]}
            if stage.isdigit():
                for record in self.retries(int(stage)):
                    for task in record.get("placement", {}).get(instance, []):
                        yield {**task, "stage": record["stage"]}

    def heartbeat(self, instance: str) -> dict[str, Any] | None:
        return self.read_json("instances", instance, "heartbeat.json")

    def ledger(self) -> list[dict[str, Any]]:
        """Every instance's ledger entry, with its ready time from the agent's first heartbeat."""
        entries = [e for e in self.read_json_many([("ledger", n) for n in self.listdir("ledger")]) if e is not None]
        unready = [e for e in entries if e.get("ready") is None]
        beats = self.read_json_many([("instances", e["instance"], "heartbeat.json") for e in unready])
        for entry, beat in zip(unready, beats):
            if beat:
                entry["ready"] = beat.get("ready")
        return sorted(entries, key=lambda e: (e.get("requested") or 0, e["instance"]))

    def write_ledger(self, entry: dict[str, Any]) -> None:
        self.write_json(entry, "ledger", f"{entry['instance']}.json")


def written_time(info: dict[str, Any]) -> float | None:
    """When a file whose fsspec ``info`` this is was last written (Unix time), where the store says:
    local ``mtime``, S3 ``LastModified``, Azure ``last_modified``, GCS ``updated``."""
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        when = info.get(key)
        if isinstance(when, datetime):
            return when.timestamp()
        if isinstance(when, str):
            try:
                return datetime.fromisoformat(when).timestamp()
            except ValueError:
                continue
        if isinstance(when, (int, float)):
            return float(when)
    return None


def result_name(stage: int, try_number: int = 1) -> str:
    """The name of a trial's result file for a try of a stage: ``stage-<i>.json`` for the first,
    ``stage-<i>.try-<k>.json`` for the k-th."""
    return f"stage-{stage}.json" if try_number <= 1 else f"stage-{stage}.try-{try_number}.json"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _stage_key(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 30
