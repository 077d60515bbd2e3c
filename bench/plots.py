#!/usr/bin/env python3
"""Draw the benchmarks' plots from their own results (bench/results/latest.json).

    .venv/bin/python bench/plots.py [--results FILE] [--out docs/images/benchmarks]

- ``visible-times.png``: the distributions (empirical CDFs) of claim -> data in the pods,
  warm, cold (2 pods), cold (20 pods at once) and the floor (bare s3fs on the host), from
  the raw samples bench_e2e recorded, with the goals as vertical lines;
- ``repairs.png``: the repair samples (killed s3fs, crashed agent, deleted DMP);
- ``scale-curve.png``: converge time and apiserver writes per mount against the number of
  nodes, from bench_controllers' rows.

A plot whose results are missing is skipped with a note (run that benchmark first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import goals

OUT = Path(__file__).resolve().parent.parent / "docs" / "images" / "benchmarks"


def _cdf(ax: Any, samples: list[float], label: str) -> None:
    ordered = sorted(samples)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")


def visible_times(e2e: dict[str, Any], out: Path) -> Path | None:
    series = [
        ("floor", "floor: bare s3fs on the host"),
        ("warm_per_pod", "warm: shared DMP running"),
        ("cold_per_pod", "cold: new DMP, 2 pods"),
        ("cold20", "cold: 20 pods at once"),
        ("cold20_on_publish", "20 pods at once, dmp-start OnPublish"),
    ]
    present = [(k, label) for k, label in series if e2e.get(k, {}).get("samples")]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in present:
        _cdf(ax, e2e[key]["samples"], label)
    for key, style in (("e2e.warm.p99", ":"), ("e2e.cold.p99", "--"), ("e2e.cold20.p99", "-.")):
        limit = goals.BY_KEY[key].limit
        if limit is not None:
            ax.axvline(limit, color="grey", linestyle=style, linewidth=1, label=f"goal {key}")
    ax.set_xscale("log")
    ax.set_xlabel("claim created -> data readable in the pod (s, log scale)")
    ax.set_ylabel("fraction of pods")
    ax.set_title("Visible time per pod (in-pod reader, 2 ms resolution)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path = out / "visible-times.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def repairs(e2e: dict[str, Any], out: Path) -> Path | None:
    data = e2e.get("repair") or {}
    labels = {"fuse": "kill -9 s3fs", "crash": "kill -9 agent", "delete": "DMP deleted"}
    present = [(k, v) for k, v in labels.items() if (data.get(k) or {}).get("samples")]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, label) in enumerate(present):
        samples = data[key]["samples"]
        ax.scatter([i] * len(samples), samples, label=label, alpha=0.7)
    ax.set_xticks(range(len(present)), [label for _, label in present])
    ax.axhline(1.0, color="grey", linestyle=":", label="goal killed FUSE (1 s)")
    ax.axhline(3.0, color="grey", linestyle="--", label="goal DMP crash/delete (3 s)")
    ax.set_ylabel("fault -> readable again in the pod (s)")
    ax.set_title("Repairs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "repairs.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_curve(controllers: dict[str, Any], out: Path) -> Path | None:
    rows = [r for r in controllers.get("sizes") or [] if r.get("converged_seconds") is not None]
    rows = [r for r in rows if r["converged_seconds"] == r["converged_seconds"]]  # not NaN
    if not rows:
        return None
    nodes = [r["nodes"] for r in rows]
    fig, left = plt.subplots(figsize=(7, 4.2))
    left.plot(nodes, [r["converged_seconds"] for r in rows], "o-", label="converged (s)")
    created = [
        (r["nodes"], r["mounts_created_25_50_75_100_percent_seconds"][3])
        for r in rows
        if r.get("mounts_created_25_50_75_100_percent_seconds")
    ]
    if created:
        left.plot(
            [n for n, _ in created],
            [t for _, t in created],
            "^:",
            color="tab:green",
            label="last mount created (apiserver's timestamp, s)",
        )
    left.axhline(90, color="grey", linestyle="--", linewidth=1, label="goal 90 s at 1,000 nodes")
    left.set_xlabel("simulated nodes (20 pods each)")
    left.set_ylabel("first claim -> every mount (s)")
    right = left.twinx()
    right.plot(
        nodes,
        [r.get("writes_per_mount") or 0 for r in rows],
        "s--",
        color="tab:orange",
        label="apiserver writes / mount",
    )
    right.axhline(
        2, color="tab:orange", linestyle=":", linewidth=1, label="goal <= 2 writes / mount"
    )
    right.set_ylabel("writes per mount")
    # Room above the goal line, so that neither it nor the points sit on the frame.
    worst = max([r.get("writes_per_mount") or 0 for r in rows] + [2.0])
    right.set_ylim(0, worst * 1.25)
    handles = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    stopped = [r for r in controllers.get("sizes") or [] if "stopped" in r]
    if stopped:
        note = "; ".join(
            f"{r['nodes']} nodes: not converged ({r['stopped'][:60]})" for r in stopped
        )
        left.text(0.02, 0.02, note, transform=left.transAxes, fontsize=7, color="tab:red")
    left.set_title("Scale: node reconcilers and controller on a real apiserver")
    left.grid(True, alpha=0.3)
    path = out / "scale-curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COMMANDS = {
    "bench_e2e": "make bench-e2e",
    "bench_controllers": "make bench-controllers",
    "bench_csi": "make bench-csi",
}


def table(data: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md: figure, goal, measured, verdict, command."""
    lines = [
        "| figure | what | goal | measured | | command |",
        "|---|---|---|---|---|---|",
    ]
    for goal in goals.GOALS:
        value = data.get(goal.key)
        if value is None:
            # Recorded as null: measured, but no value came out (e.g. did not converge).
            measured = "none (see below)" if goal.key in data else "not measured"
            state = "**missed**" if goal.key in data else ""
        else:
            measured = goals.formatted(goal.key, value)
            met = goal.met(value)
            state = "" if met is None else ("met" if met else "**missed**")
        lines.append(
            f"| `{goal.key}` | {goal.what} | {goal.describe().removeprefix('goal ')} "
            f"| {measured} | {state} | `{COMMANDS[goal.benchmark]}` |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=goals.RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the Markdown table only")
    args = parser.parse_args()
    data = goals.load(args.results)
    if args.table:
        print(table(data))
        return 0
    extra = data.get("extra") or {}
    args.out.mkdir(parents=True, exist_ok=True)
    e2e = extra.get("bench_e2e") or {}
    controllers = extra.get("bench_controllers") or {}
    for name, draw, source in (
        ("visible times", visible_times, e2e),
        ("repairs", repairs, e2e),
        ("scale curve", scale_curve, controllers),
    ):
        path = draw(source, args.out)
        print(f"plots: {name}: " + (str(path) if path else "no results yet, skipped"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
