"""Reading a process's status endpoint in tests: scrape ``/metrics``, ask the probes.

The same helpers serve the integration tier (processes on 127.0.0.1) and the e2e tier
(pods on the local cluster's pod network).
"""

from __future__ import annotations

import urllib.error
import urllib.request

import attrs
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Scrape", "get", "scrape"]


def get(url: str, *, timeout: float = 10.0) -> tuple[int, str]:
    """GET ``url``; its status and body (an HTTP error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


@attrs.frozen
class Scrape:
    """One scrape of ``/metrics``, parsed."""

    text: str

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` whose labels include ``labels``; None when there is none.

        With several matching samples (labels left out), their sum.
        """
        found: list[float] = []
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    found.append(float(sample.value))
        return sum(found) if found else None

    def get(self, name: str, **labels: str) -> float:
        """Like :meth:`value`, 0 when absent (a counter not yet incremented)."""
        return self.value(name, **labels) or 0.0

    def names(self) -> set[str]:
        """The family names exposed (``_total`` and ``_bucket`` suffixes removed)."""
        return {family.name for family in text_string_to_metric_families(self.text)}


def scrape(base_url: str, *, timeout: float = 10.0) -> Scrape:
    """Scrape ``base_url/metrics``; fails unless it answers 200."""
    status, body = get(base_url.rstrip("/") + "/metrics", timeout=timeout)
    if status != 200:
        raise AssertionError(f"{base_url}/metrics answered {status}: {body[:500]}")
    return Scrape(body)
