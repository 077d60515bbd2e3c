"""Which failed requests the client retries, and after how long."""

from __future__ import annotations

import pytest

from dynvol_kube import APIError
from dynvol_kube.client import _RETRIES, _RETRY_CAP, _retry_delay
from dynvol_kube.errors import error_for_status


def _error(status: int | None, retry_after: float | None = None) -> APIError:
    error = error_for_status(status, "boom")
    error.retry_after = retry_after
    return error


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_a_429_is_retried_for_every_verb_after_its_retry_after(method: str) -> None:
    for _ in range(50):
        delay = _retry_delay(method, _error(429, retry_after=2), 0)
        assert delay is not None
        assert 2 <= delay <= 2.5  # the server's word, spread a little


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_5xx_is_retried_for_reads_only(status: int) -> None:
    for attempt in range(_RETRIES):
        delay = _retry_delay("GET", _error(status), attempt)
        assert delay is not None
        assert 0 <= delay <= _RETRY_CAP
    # A write that timed out may have landed: the caller decides, not the client.
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert _retry_delay(method, _error(status), 0) is None


@pytest.mark.parametrize("status", [None, 400, 403, 404, 409, 410, 422])
def test_other_failures_are_not_retried(status: int | None) -> None:
    assert _retry_delay("GET", _error(status), 0) is None


def test_retries_stop_after_the_last_attempt() -> None:
    assert _retry_delay("GET", _error(429, retry_after=1), _RETRIES) is None
    assert _retry_delay("GET", _error(503), _RETRIES) is None


def test_a_huge_retry_after_is_capped() -> None:
    delay = _retry_delay("POST", _error(429, retry_after=3600), 0)
    assert delay is not None
    assert delay <= _RETRY_CAP + 1


def test_retry_after_is_read_from_our_transports_status_error() -> None:
    """The answer's headers reach the error (names in lower case); a date or junk is no
    number of seconds, and no headers at all is none."""
    from dynvol_kube.client import _retry_after_of
    from dynvol_kube.http import StatusError

    assert _retry_after_of(StatusError(429, "Too Many Requests", {"retry-after": "3"})) == 3.0
    assert _retry_after_of(StatusError(429, "", {"retry-after": "-5"})) == 0.0
    assert _retry_after_of(StatusError(503, "", {"retry-after": "Wed, 21 Oct 2026"})) is None
    assert _retry_after_of(StatusError(429, "")) is None
    assert _retry_after_of(None) is None
