"""A project's own CRDs beside dynvol's: ``extra_crd_paths`` and ``up --crds``.

The consumer suite of tests/integration/test_wheel.py covers the fixture's ini option from
an installed wheel; these run the same from the checkout, through the class and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynvol.crds import crd_dir
from dynvol.testing import ControlPlane, ToolsMissing
from tests.integration.shared import dev_control_plane, kubectl_crd_names

pytestmark = pytest.mark.integration

WIDGETS = Path(__file__).resolve().parents[1] / "library" / "consumer" / "crds" / "widgets.yaml"


def _crd_names(plane: ControlPlane) -> set[str]:
    items = json.loads(plane.kubectl("get", "crd", "-o", "json"))["items"]
    return {item["metadata"]["name"] for item in items}


def test_extra_crds_are_applied_after_dynvols(tmp_path: Path, control_plane: ControlPlane) -> None:
    # control_plane (unused) makes this skip or fail the same way when tools are missing.
    # dynvol's CRDs from the package, then (in a checkout) the PriorityClass DMPs name.
    assert control_plane.crd_paths[0] == crd_dir()
    assert [p.name for p in control_plane.crd_paths[1:]] == ["priorityclass.yaml"]
    plane = ControlPlane(dir=tmp_path / "cp", extra_crd_paths=[WIDGETS])
    try:
        plane.start()
    except ToolsMissing as exc:
        pytest.skip(str(exc))
    try:
        names = _crd_names(plane)
        assert "widgets.consumer.example.com" in names
        assert "dynamicvolumeclaims.dynamicvolume.csi.cloudnative101.net" in names
    finally:
        plane.stop()


def test_cli_up_applies_the_crds_it_is_given(tmp_path: Path, control_plane: ControlPlane) -> None:
    directory = tmp_path / "cp"
    try:
        up = dev_control_plane("up", "--dir", str(directory), "--crds", str(WIDGETS))
        assert up.returncode == 0, up.stderr
        out = kubectl_crd_names(control_plane, directory / "kubeconfig")
        assert "widgets.consumer.example.com" in out
        assert "dynamicvolumemounts.dynamicvolume.csi.cloudnative101.net" in out
    finally:
        down = dev_control_plane("down", "--dir", str(directory))
        assert down.returncode == 0, down.stderr


def test_cli_refuses_a_missing_crd_path_before_starting(tmp_path: Path) -> None:
    directory = tmp_path / "cp"
    up = dev_control_plane("up", "--dir", str(directory), "--crds", str(tmp_path / "nope.yaml"))
    assert up.returncode == 2
    assert "--crds" in up.stderr
    assert "nope.yaml" in up.stderr
    assert not directory.exists()
