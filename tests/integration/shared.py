"""Helpers more than one integration test module uses: the ``dynvol dev control-plane``
CLI, the CRDs a control plane serves as kubectl lists them, and kustomize's rendering of
the manifests with the pinned kubectl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynvol.testing import ControlPlane

TOP = Path(__file__).resolve().parents[2]
KUBECTL = TOP / ".tools" / "bin" / "kubectl"


def dev_control_plane(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run ``dynvol dev control-plane ARGS...`` (not checked: the caller looks at it)."""
    return subprocess.run(
        [sys.executable, "-m", "dynvol", "dev", "control-plane", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def kubectl_crd_names(control_plane: ControlPlane, kubeconfig: Path) -> str:
    """``kubectl get crd -o name`` against the apiserver of ``kubeconfig``: its output."""
    return subprocess.run(
        [str(control_plane.binary("kubectl")), "--kubeconfig", str(kubeconfig),
         "get", "crd", "-o", "name"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip


def render_kustomize(path: Path) -> list[dict[str, Any]]:
    """The documents kustomize renders from ``path`` (skips, or fails in CI, without kubectl)."""
    if not KUBECTL.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("kubectl is missing: CI must build it (make tools)")
        pytest.skip("kubectl is missing (make tools)")
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], text=True, capture_output=True, timeout=60
    )
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed: {out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
