"""The benchmarks' results file (bench/goals.py) and the key table behind it."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench"

#: The keys issue 14 asks ``make bench`` to write to bench/results/latest.json.
ISSUE_KEYS = {
    "e2e.warm.p50", "e2e.warm.p99", "e2e.floor.p50", "e2e.cold.p50", "e2e.cold.p99",
    "e2e.cold20.p99", "e2e.repair_fuse.p99", "e2e.repair_dmp.p99", "mem.dmp_agent_mib",
    "mem.node_plugin_mib", "mem.controller_mib", "scale.nodes", "scale.pods",
    "scale.converged_s", "scale.writes_per_mount", "csi.publish.p99_ms",
}  # fmt: skip


def _load() -> ModuleType:
    return load_script("bench_goals_under_test", BENCH / "goals.py")


goals = _load()


def _declared_keys(source: str) -> tuple[tuple[str, ...], set[str]]:
    """(the module-level ``KEYS`` tuple, every other string constant) of a bench module."""
    tree = ast.parse(source)
    declared: tuple[str, ...] = ()
    skip: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "KEYS" for t in node.targets
        ):
            assert isinstance(node.value, ast.Tuple), "KEYS is a tuple of string literals"
            declared = tuple(ast.literal_eval(node.value))
            skip = {id(n) for n in ast.walk(node)}
    used = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip
    }
    return declared, used


def test_the_table_holds_exactly_the_issues_keys() -> None:
    assert {g.key for g in goals.GOALS} == ISSUE_KEYS
    assert len(goals.GOALS) == len(ISSUE_KEYS)


def test_every_key_is_produced_by_the_benchmark_the_table_names() -> None:
    produced: dict[str, str] = {}
    for path in sorted(BENCH.glob("bench_*.py")):
        declared, used = _declared_keys(path.read_text())
        for key in declared:
            assert key in goals.BY_KEY, f"{path.name} declares unknown key {key}"
            assert goals.BY_KEY[key].benchmark == path.stem, f"{key} belongs elsewhere"
            # Declared and also written somewhere in the module, not only listed.
            assert key in used, f"{path.name} declares {key} but never records it"
            assert key not in produced, f"{key} produced by {produced.get(key)} too"
            produced[key] = path.stem
    assert set(produced) == set(goals.BY_KEY), set(goals.BY_KEY) - set(produced)


def test_record_merges_runs_of_different_benchmarks(tmp_path: Path) -> None:
    out = tmp_path / "results" / "latest.json"
    goals.record({"csi.publish.p99_ms": 3.5}, benchmark="bench_csi", path=out)
    goals.record(
        {"e2e.warm.p50": 0.3, "e2e.warm.p99": 0.4},
        benchmark="bench_e2e",
        extra={"samples": [0.3, 0.4]},
        path=out,
    )
    goals.record({"e2e.warm.p50": 0.2}, benchmark="bench_e2e", extra={"floor": [0.1]}, path=out)
    data = json.loads(out.read_text())
    assert data["csi.publish.p99_ms"] == 3.5
    assert data["e2e.warm.p50"] == 0.2
    assert data["e2e.warm.p99"] == 0.4
    assert data["extra"]["bench_e2e"] == {"samples": [0.3, 0.4], "floor": [0.1]}
    assert set(data["measured_at"]) == {"bench_csi", "bench_e2e"}
    assert [p.name for p in out.parent.iterdir()] == ["latest.json"]


def test_record_refuses_unknown_and_foreign_keys_and_leaves_the_file(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    goals.record({"scale.nodes": 100}, benchmark="bench_controllers", path=out)
    before = out.read_text()
    with pytest.raises(KeyError, match="not a published key"):
        goals.record({"e2e.warm.p51": 1.0}, benchmark="bench_e2e", path=out)
    with pytest.raises(KeyError, match="produced by bench_csi"):
        goals.record({"csi.publish.p99_ms": 1.0}, benchmark="bench_e2e", path=out)
    assert out.read_text() == before


def test_a_missing_figure_is_written_as_null(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    goals.record({"scale.converged_s": math.nan}, benchmark="bench_controllers", path=out)
    assert json.loads(out.read_text())["scale.converged_s"] is None


@pytest.mark.parametrize(
    ("key", "value", "state"),
    [
        ("e2e.warm.p50", 0.29, "MISSED"),
        ("e2e.warm.p50", 0.1, "met"),
        ("scale.nodes", 300, "MISSED"),
        ("scale.nodes", 1000, "met"),
        ("scale.converged_s", math.nan, "MISSED"),
    ],
)
def test_verdict_prints_the_figure_beside_its_goal(key: str, value: float, state: str) -> None:
    line = goals.verdict(key, value)
    assert line.startswith(key)
    assert line.endswith(f": {state}")
    assert "goal" in line


def test_a_reference_figure_has_no_verdict() -> None:
    line = goals.verdict("e2e.floor.p50", 0.12)
    assert "0.120 s" in line
    assert "met" not in line
    assert "MISSED" not in line


def _load_e2e() -> ModuleType:
    return load_script("bench_e2e_under_test", BENCH / "bench_e2e.py")


def test_the_fuse_repair_goal_counts_the_first_three_repairs_in_a_minute() -> None:
    first_three = _load_e2e().first_three_a_minute
    # Five kills 10 s apart: the 4th and 5th are the 4th and 5th in a minute (they back off).
    assert first_three([0.1, 0.2, 0.3, 1.5, 3.1], [0, 10, 20, 30, 40]) == [0.1, 0.2, 0.3]
    # Spread over more than a minute, every one counts again.
    assert first_three([0.1, 0.2, 0.3, 0.4], [0, 10, 20, 81]) == [0.1, 0.2, 0.3, 0.4]
    assert first_three([], []) == []
