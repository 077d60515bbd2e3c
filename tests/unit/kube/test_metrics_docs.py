"""docs/metrics.md lists every metric family the code registers, and nothing else.

Every service's families are registered on one registry, as in a process, and compared
with the tables of the document: name, type and labels.
"""

from __future__ import annotations

import re
from pathlib import Path

from dynvol_csi.metrics import CsiMetrics
from dynvol_dmp.metrics import DmpMetrics
from dynvol_kube import Metrics

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"
_ROW = re.compile(r"^\| `(dynvol_[a-z_]+)` \| (counter|gauge|histogram) \|([^|]*)\|")
#: Labels the client library adds itself.
_OWN = {"le"}


def _documented() -> dict[str, tuple[str, frozenset[str]]]:
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            name, kind, labels = match.groups()
            if kind == "counter":
                assert name.endswith("_total"), f"{name}: counters are listed with _total"
                name = name.removesuffix("_total")
            assert name not in rows, f"{name} is listed twice"
            rows[name] = (kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
    return rows


def _registered() -> dict[str, tuple[str, frozenset[str]]]:
    metrics = Metrics()
    CsiMetrics(metrics.registry)
    DmpMetrics.of(metrics, lambda: [])
    found: dict[str, tuple[str, frozenset[str]]] = {}
    # Give every labelled family one child, so that its labels show in its samples.
    for collector in list(metrics.registry._collector_to_names):  # no public listing exists
        names = getattr(collector, "_labelnames", None)
        if names:
            collector.labels(*("x" for _ in names))  # type: ignore[attr-defined]
    for family in metrics.registry.collect():
        labels = frozenset(k for s in family.samples for k in s.labels) - _OWN
        found[family.name] = (family.type, labels)
    return found


def test_every_registered_family_is_documented_and_vice_versa() -> None:
    documented, registered = _documented(), _registered()
    assert len(registered) >= 20  # the check below compares something
    missing = sorted(set(registered) - set(documented))
    stale = sorted(set(documented) - set(registered))
    assert not missing, f"registered but not in docs/metrics.md: {missing}"
    assert not stale, f"in docs/metrics.md but registered nowhere: {stale}"
    wrong = {
        n: (documented[n], registered[n]) for n in registered if documented[n] != registered[n]
    }
    assert not wrong, f"type or labels differ (docs, code): {wrong}"


def test_every_name_has_the_prefix() -> None:
    assert all(name.startswith("dynvol_") for name in _registered())
