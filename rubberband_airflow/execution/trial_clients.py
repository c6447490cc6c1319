"""The run storage of a trial's worker, with botocore's service data loaded once per agent.

An S3 client's first request parses botocore's JSON models of S3 (its API, endpoint rules and
partitions): 0.05 CPU-seconds, half of a forked trial's start. The agent's fork server imports
this module, which loads them into ``LOADER``; each trial forked from it makes its client from
that loader's cache instead of parsing them again. Nothing here opens a connection or reads a
credential: a fork inherits no socket, event loop or secret from the server.
"""

from __future__ import annotations

import functools

import botocore.session

from rubberband_airflow.execution.storage import RunStorage


def _loaded() -> object:
    """botocore's data loader (the default one, honouring ``AWS_DATA_PATH``) with S3's models loaded."""
    session = botocore.session.Session()
    # A client made with placeholder keys loads every model a client needs, and resolves no credential.
    session.create_client("s3", region_name="us-east-1", aws_access_key_id="-", aws_secret_access_key="-")
    return session.get_component("data_loader")


LOADER = _loaded()


@functools.cache
def storage(uri: str) -> RunStorage:
    """The run's storage for this process (one filesystem, so one client, per process)."""
    if not uri.startswith("s3://"):
        return RunStorage(uri)
    import aiobotocore.session
    import fsspec

    session = aiobotocore.session.AioSession()
    session.register_component("data_loader", LOADER)
    return RunStorage(uri, fsspec.core.url_to_fs(uri, session=session)[0])
