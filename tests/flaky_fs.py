"""Stores that fail like a store in bad weather, for agents and workers under test.

``S3Storm`` stands between the instances' agents and moto's S3: while it rages, every request
is answered with S3's ``500 InternalError``.

``flaky:///path`` is the local path. While the file named by ``RUBBERBAND_TEST_STORM`` exists,
every operation of an agent or worker process with that variable raises an OSError, as s3fs
does for a burst of S3 errors, and appends a line (its pid and ``agent.py`` or ``worker.py``) to
``<storm file>.hits``. A process that creates a file whose path ends with
``RUBBERBAND_TEST_STORM_AFTER`` starts the storm itself (creates the storm file) right after. The
test itself is spared, unless ``RUBBERBAND_TEST_STORM_HERE`` is set
in it too (the storm then reaches code under test in the test's process: triggers). A process
gets the protocol from the ``sitecustomize`` that ``storm_env`` writes (fsspec's own plugin
registration), or from ``register``.
"""

from __future__ import annotations

import http.client
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tests.served import Served

STORM = "RUBBERBAND_TEST_STORM"
STORM_HERE = "RUBBERBAND_TEST_STORM_HERE"
STORM_AFTER = "RUBBERBAND_TEST_STORM_AFTER"  # a path suffix: the process that creates it starts the storm at once


class FlakyFileSystem(LocalFileSystem):
    protocol = ("flaky",)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return super()._strip_protocol(path)

    def _weather(self) -> None:
        storm = os.environ.get(STORM)
        role = os.path.basename(sys.argv[0])
        if storm and os.path.exists(storm) and (role in ("agent.py", "worker.py") or os.environ.get(STORM_HERE)):
            with open(f"{storm}.hits", "a") as f:
                f.write(f"{os.getpid()} {role}\n")
            raise OSError(5, "injected storage error (a storm)")

    def _open(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super()._open(*args, **kwargs)

    def ls(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super().ls(*args, **kwargs)

    def info(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super().info(*args, **kwargs)

    def cat_file(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super().cat_file(*args, **kwargs)

    def makedirs(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super().makedirs(*args, **kwargs)

    def link(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        out = super().link(*args, **kwargs)  # how a file is created only where none is (RunStorage.create_bytes)
        after, storm = os.environ.get(STORM_AFTER), os.environ.get(STORM)
        if after and storm and str(args[1] if len(args) > 1 else kwargs.get("dst", "")).endswith(after):
            Path(storm).touch()  # this process's next operation is in the storm, with no watcher's delay
        return out

    def mv(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super().mv(*args, **kwargs)

    def rm(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super().rm(*args, **kwargs)


def register() -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def storm_env(folder: Path, env: dict[str, str]) -> dict[str, str]:
    """An environment whose processes reach ``flaky://`` and feel the storm file ``folder/storm``."""
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text("from tests.flaky_fs import register\nregister()\n")
    path = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return {**env, "PYTHONPATH": path, STORM: str(folder / "storm")}


class _StormHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Expect: 100-continue, as botocore uses them
    server: S3Storm

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.raging.is_set():
            self.server.hits += 1
            self._answer(500, {"Content-Type": "application/xml"},
                         b"<Error><Code>InternalError</Code><Message>injected (a storm)</Message></Error>")
            return
        up = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
            up.request(self.command, self.path, body=body or None, headers=headers)
            r = up.getresponse()
            data = r.read()
            self._answer(r.status, {k: v for k, v in r.getheaders()
                                    if k.lower() not in ("transfer-encoding", "connection", "content-length")},
                         data)
        finally:
            up.close()

    def _answer(self, code: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    def log_message(self, *args: Any) -> None:
        pass


class S3Storm(Served):
    """An S3 endpoint that relays to ``endpoint`` (moto's server) and, while ``raging`` is set,
    answers every request with 500 InternalError; ``hits`` counts the requests it refused."""

    def __init__(self, endpoint: str) -> None:
        self.upstream = urlsplit(endpoint).netloc
        self.raging = threading.Event()
        self.hits = 0
        super().__init__(_StormHandler)
