"""Trying a call again, backing off, while storage or a metadata service is in bad weather."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import aiohttp
from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError, SSLError as BotoSSLError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Longest pause between tries: the heartbeat, which the runner judges a hung agent by
# (runner.HUNG_SECONDS), never pauses for long while the store is back.
MAX_BACKOFF_SECONDS = 30.0


# What storage raises: s3fs translates S3's error responses into OSErrors, and lets botocore's
# and aiohttp's own errors for a connection that failed, broke or timed out through.
STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, HTTPClientError, BotoConnectionError,
                                                   aiohttp.ClientError)

# The errors of a store or network in bad weather: I/O (s3fs: an error code it does not know),
# remote I/O (S3's InternalError), busy (SlowDown, 503), and the network's own.
TRANSIENT_ERRNOS = frozenset({errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY, errno.EAGAIN,
                              errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                              errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH})


def transient(e: BaseException) -> bool:
    """Whether a storage error may pass when tried again: a timeout, a failed or broken connection
    (not a TLS error), or an OSError whose errno is in ``TRANSIENT_ERRNOS``; not one that says what
    is or is not there, may not be touched, or is asked wrongly (a wrong region, a bad argument or
    URL: trying again cannot help)."""
    if isinstance(e, BotoSSLError):  # a certificate or TLS setting: not weather
        return False
    if isinstance(e, (TimeoutError, ConnectionError, HTTPClientError, BotoConnectionError,
                      aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return True
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


def retry(call: Callable[[], T], what: str, patience: float, first_delay: float = 0.5,
          may_pass: Callable[[BaseException], bool] = transient) -> T:
    """``call()``, tried again after an error that ``may_pass`` (default: a transient storage
    error), the pause doubling up to ``MAX_BACKOFF_SECONDS``, for ``patience`` seconds from the
    first error; then its error is raised."""
    deadline: float | None = None
    delay = first_delay
    while True:
        try:
            return call()
        except STORAGE_ERRORS as e:
            deadline = time.monotonic() + patience if deadline is None else deadline
            if not may_pass(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); trying again in %.1f s", what, e, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_SECONDS)
