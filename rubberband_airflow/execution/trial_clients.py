"""The run storage of a trial's worker, with botocore's service data loaded once per agent.

An S3 client's first request parses botocore's JSON models of S3 (its API, endpoint rules and
partitions): 0.05 CPU-seconds, half of a forked trial's start. The agent's fork server imports
this module, which loads them into ``LOADER``; each trial forked from it makes its client from
that loader's cache instead of parsing them again. Only data files are read here: no session, no
configuration or credential, no connection; a fork inherits no socket, event loop or secret.
"""

from __future__ import annotations

import functools
import logging
import os

import botocore.loaders

from rubberband_airflow.execution.storage import RunStorage

log = logging.getLogger(__name__)


def _loaded() -> botocore.loaders.Loader | None:
    """botocore's data loader (its search path, ``AWS_DATA_PATH`` included) with the models an S3
    client loads; None if they cannot be loaded here (each trial then loads its own)."""
    try:
        loader = botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))
        for name in ("endpoints", "sdk-default-configuration", "partitions", "_retry"):
            loader.load_data(name)
        for kind in ("service-2", "endpoint-rule-set-1"):
            loader.load_service_model("s3", kind)
        return loader
    except Exception as e:  # noqa: BLE001 - never stop the fork server: the trials load their own
        log.warning("botocore's S3 models could not be preloaded: %s: %s", type(e).__name__, e)
        return None


LOADER = _loaded()


def storage(uri: str) -> RunStorage:
    """The run's storage for this process: one filesystem, so one client, per process."""
    return _storage(uri, os.getpid())


@functools.cache
def _storage(uri: str, pid: int) -> RunStorage:  # by pid: a fork makes its own
    if LOADER is None or not uri.startswith("s3://"):
        return RunStorage(uri)
    import aiobotocore.session
    import fsspec

    session = aiobotocore.session.AioSession()
    session.register_component("data_loader", LOADER)
    return RunStorage(uri, fsspec.core.url_to_fs(uri, session=session)[0])
