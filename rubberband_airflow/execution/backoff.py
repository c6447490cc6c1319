"""Trying a call again, backing off, while storage or a metadata service is in bad weather."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Longest pause between tries: the heartbeat, which the runner judges a hung agent by
# (runner.HUNG_SECONDS), never pauses for long while the store is back.
MAX_BACKOFF_SECONDS = 30.0


def transient(e: BaseException) -> bool:
    """Whether an error may pass when tried again: an OSError (s3fs's and urllib's errors are one),
    but not one that says what is or is not there, or may not be touched."""
    return isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError, PermissionError))


def retry(call: Callable[[], T], what: str, patience: float, first_delay: float = 0.5) -> T:
    """``call()``, tried again after a transient error, the pause doubling up to
    ``MAX_BACKOFF_SECONDS``, for ``patience`` seconds; then its error is raised."""
    deadline = time.monotonic() + patience
    delay = first_delay
    while True:
        try:
            return call()
        except OSError as e:
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); trying again in %.1f s", what, e, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_SECONDS)
