"""Run storage as the Airflow side reaches it: through an Airflow connection.

Tasks, the triggerer and the UI page read and write run files with the connection's
credentials and endpoint (Airflow's ObjectStoragePath: for s3:// the amazon provider's S3
filesystem). The instances' agents reach the same files with their instance profile.

There is no hook class of its own: ``ObjectStoragePath`` looks the connection up and builds the
filesystem with the provider that owns its type (the amazon provider's ``aws`` for ``s3://``).
"""

from __future__ import annotations

import json
from typing import Any

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.spec import TuningSpec
from rubberband_airflow.tuning import storage_conn_id


def run_storage(uri: str, conn_id: str | None) -> RunStorage:
    """
    Reach the run storage at ``uri`` through an Airflow connection.

    Local paths, and no connection, use fsspec's own filesystem and credentials.

    :param uri: the storage root, ``file://...`` or ``s3://bucket/prefix``
    :param conn_id: the Airflow connection to reach it through, or None
    """
    if conn_id is None or "://" not in uri or uri.startswith("file://"):
        return RunStorage(uri)
    from airflow.sdk import ObjectStoragePath

    return RunStorage(uri, ObjectStoragePath(uri, conn_id=conn_id).fs)


def read_text(uri: str, conn_id: str | None) -> str:
    """
    Read a whole text file (a profile, say) through an Airflow connection.

    :param uri: the file's path or URL
    :param conn_id: the Airflow connection to reach it through, or None for fsspec's own
    """
    storage = run_storage(uri, conn_id)
    with storage.fs.open(storage.root, "r") as f:
        return f.read()


def storage_for(spec: TuningSpec, uri: str) -> RunStorage:
    """
    Reach storage under a spec's ``storage`` (or its profile) through the spec's connection.

    :param spec: the tuning spec whose connection to use (its EC2 backend's ``aws_conn_id``; none for local)
    :param uri: the storage root, under the spec's ``storage``
    """
    return run_storage(uri, storage_conn_id(spec))


def load_profile(spec: TuningSpec) -> dict[str, Any]:
    """
    Read the workload profile a spec names (a local path or any fsspec URL) through its connection.

    A missing profile is a ``ProblemError`` that says how to make it.

    :param spec: the tuning spec whose ``profile`` to read
    """
    try:
        return json.loads(read_text(spec.profile, storage_conn_id(spec)))
    except FileNotFoundError:
        raise ProblemError("profile", f"{spec.profile} does not exist: run `rubberband profile --out "
                           f"{spec.profile}` first") from None
