"""bench/plots.py draws its PNGs from a results file, and skips what is not measured."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench"
PNG = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


def _samples(rng: random.Random, centre: float, n: int) -> dict[str, object]:
    return {"samples": [rng.lognormvariate(0, 0.3) * centre for _ in range(n)]}


def _run(results: Path, out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "plots.py"), "--results", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout


def test_every_plot_is_drawn_from_the_recorded_samples(tmp_path: Path) -> None:
    rng = random.Random(14)
    results = tmp_path / "latest.json"
    goals = load_script("goals_for_plots", BENCH / "goals.py")
    goals.record(
        {"e2e.warm.p50": 0.3},
        benchmark="bench_e2e",
        extra={
            "floor": _samples(rng, 0.1, 20),
            "warm_per_pod": _samples(rng, 0.3, 40),
            "cold_per_pod": _samples(rng, 6.0, 40),
            "cold20": _samples(rng, 9.0, 20),
            "repair": {k: _samples(rng, 1.0, 5) for k in ("fuse", "crash", "delete")},
        },
        path=results,
    )
    goals.record(
        {"scale.nodes": 300},
        benchmark="bench_controllers",
        extra={
            "sizes": [
                {"nodes": n, "converged_seconds": n / 10, "writes_per_mount": 1.1}
                for n in (100, 300)
            ]
        },
        path=results,
    )
    out = tmp_path / "images"
    printed = _run(results, out)
    assert "skipped" not in printed
    for name in ("visible-times.png", "repairs.png", "scale-curve.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG), name
        assert len(data) > 10_000, name


def test_a_benchmark_not_run_yet_is_skipped(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    results.write_text(json.dumps({"csi.publish.p99_ms": 4.0}))
    out = tmp_path / "images"
    printed = _run(results, out)
    assert printed.count("skipped") == 3
    assert list(out.iterdir()) == []
