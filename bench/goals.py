"""The benchmarks' shared results file and the goal of each figure (issue 14).

Every benchmark records its figures with :func:`record`, which merges them into
``bench/results/latest.json``: a benchmark run on its own updates only the keys it
measured, so ``make bench`` and separate ``make bench-*`` runs end in the same file.
:data:`GOALS` is the one table of the published keys: unit, goal, the benchmark that
produces each. Each benchmark declares the keys it writes in a module-level ``KEYS``
tuple (checked against this table by ``tests/unit/test_bench_goals.py``) and prints
each figure beside its goal with :func:`verdict`.

Extra figures (raw samples, breakdowns, the per-size scale rows) go under
``extra.<benchmark>`` in the same file, never under a published key.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Goal:
    """One published figure: ``value <= limit`` (``at_least``: ``value >= limit``)."""

    key: str
    unit: str
    limit: float | None
    benchmark: str
    what: str
    at_least: bool = False

    def met(self, value: float) -> bool | None:
        """Whether ``value`` meets the goal; None when the figure has no goal of its own."""
        if self.limit is None:
            return None
        if isinstance(value, float) and math.isnan(value):
            return False
        return value >= self.limit if self.at_least else value <= self.limit

    def describe(self) -> str:
        if self.limit is None:
            return "reference, no goal"
        sign = ">=" if self.at_least else "<="
        return f"goal {sign} {_fmt(self.limit, self.unit)}"


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s"
    if unit in ("MiB", "ms"):
        return f"{value:.1f} {unit}"
    if unit == "count":
        return f"{value:g}"
    return f"{value:.2f} {unit}".rstrip()


GOALS: tuple[Goal, ...] = (
    Goal("e2e.warm.p50", "s", 0.100, "bench_e2e", "claim -> data in every pod, DMP running"),
    Goal("e2e.warm.p99", "s", 0.200, "bench_e2e", "claim -> data in every pod, DMP running"),
    Goal("e2e.floor.p50", "s", None, "bench_e2e", "bare s3fs mount on the host -> readable"),
    Goal("e2e.cold.p50", "s", 1.5, "bench_e2e", "claim -> data, no DMP yet, 2 pods"),
    Goal("e2e.cold.p99", "s", 2.5, "bench_e2e", "claim -> data, no DMP yet, 2 pods"),
    Goal("e2e.cold20.p99", "s", 5.0, "bench_e2e", "claim -> data, 20 pods on one node at once"),
    Goal("e2e.repair_fuse.p99", "s", 1.0, "bench_e2e", "kill -9 of s3fs -> readable again"),
    Goal("e2e.repair_dmp.p99", "s", 3.0, "bench_e2e", "DMP crashed or deleted -> readable"),
    Goal("mem.dmp_agent_mib", "MiB", 40, "bench_e2e", "DMP agent VmRSS with 10 mounts"),
    Goal("mem.node_plugin_mib", "MiB", 80, "bench_controllers", "dynvol node, 200 pods on it"),
    Goal("mem.controller_mib", "MiB", 120, "bench_controllers", "controller at 10,000 pods"),
    Goal("scale.nodes", "count", 1000, "bench_controllers", "nodes reached", at_least=True),
    Goal("scale.pods", "count", 20000, "bench_controllers", "pods reached", at_least=True),
    Goal("scale.converged_s", "s", 90, "bench_controllers", "first claim -> every mount"),
    Goal("scale.writes_per_mount", "count", 2, "bench_controllers", "apiserver writes / mount"),
    Goal("csi.publish.p99_ms", "ms", 20, "bench_csi", "NodePublishVolume p99"),
)

BY_KEY: Mapping[str, Goal] = {g.key: g for g in GOALS}


def keys_of(benchmark: str) -> tuple[str, ...]:
    """The published keys a benchmark produces, by the table."""
    return tuple(g.key for g in GOALS if g.benchmark == benchmark)


def formatted(key: str, value: float) -> str:
    """``value`` in the key's unit, as the verdict lines print it."""
    return _fmt(value, BY_KEY[key].unit)


def verdict(key: str, value: float) -> str:
    """``e2e.warm.p50  0.290 s  goal <= 0.100 s: MISSED`` for the key's goal."""
    goal = BY_KEY[key]
    met = goal.met(value)
    state = "" if met is None else (": met" if met else ": MISSED")
    return f"{key:<24} {_fmt(value, goal.unit):>12}   {goal.describe()}{state}"


def load(path: Path = RESULTS) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def record(
    figures: Mapping[str, float],
    *,
    benchmark: str,
    extra: Mapping[str, Any] | None = None,
    path: Path = RESULTS,
) -> dict[str, Any]:
    """Merge ``figures`` (published keys only) and ``extra`` into the results file.

    Keys this call does not name keep their values, so benchmarks run separately add up.
    The file is replaced atomically (a crash leaves the old file, never half a new one).

    :raises KeyError: for a key not in :data:`GOALS` or one another benchmark produces.
    """
    for key in figures:
        goal = BY_KEY.get(key)
        if goal is None:
            raise KeyError(f"{key!r} is not a published key (bench/results.py GOALS)")
        if goal.benchmark != benchmark:
            raise KeyError(f"{key!r} is produced by {goal.benchmark}, not {benchmark}")
    data = load(path)
    for key, value in figures.items():
        data[key] = None if isinstance(value, float) and math.isnan(value) else value
    stamps = data.setdefault("measured_at", {})
    stamps[benchmark] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if extra is not None:
        # Shallow merge: a partial run (one part of a benchmark) keeps the other parts.
        data.setdefault("extra", {}).setdefault(benchmark, {}).update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latest-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


def print_verdicts(figures: Mapping[str, float]) -> None:
    for key, value in figures.items():
        print(verdict(key, value), flush=True)
