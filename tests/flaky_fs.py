"""A local filesystem that fails like a store in bad weather, for an agent under test.

``flaky:///path`` is the local path. While the file named by ``RUBBERBAND_TEST_STORM`` exists,
every operation of an agent or worker process with that variable raises an OSError, as s3fs
does for a burst of S3 errors, and appends a line (its pid and ``agent.py`` or ``worker.py``) to
``<storm file>.hits``. The test itself is spared. A process gets the protocol from the
``sitecustomize`` that ``storm_env`` writes (fsspec's own plugin registration).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

STORM = "RUBBERBAND_TEST_STORM"


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
        if storm and os.path.exists(storm) and role in ("agent.py", "worker.py"):
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
        return super().link(*args, **kwargs)

    def mv(self, *args: Any, **kwargs: Any) -> Any:
        self._weather()
        return super().mv(*args, **kwargs)


def register() -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def storm_env(folder: Path, env: dict[str, str]) -> dict[str, str]:
    """An environment whose processes reach ``flaky://`` and feel the storm file ``folder/storm``."""
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text("from tests.flaky_fs import register\nregister()\n")
    path = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return {**env, "PYTHONPATH": path, STORM: str(folder / "storm")}
