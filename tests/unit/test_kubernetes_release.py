"""Which Kubernetes release the test control plane runs: ``DYNVOL_KUBERNETES_VERSION``.

The value becomes part of a path to the binaries a root test run executes, so only a
release name is taken; anything else fails with the variable named and no path built.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol.testing.controlplane import (
    KUBERNETES_VERSION_ENV,
    ControlPlane,
    ToolsMissing,
    default_bin_dir,
    kubernetes_bin_dir,
    requested_kubernetes_version,
)

TOP = Path(__file__).resolve().parents[2]
_RELEASE = re.compile(r"v1\.[0-9]{1,3}\.[0-9]{1,3}")


def _pinned() -> list[str]:
    out = subprocess.run(
        ["bash", str(TOP / "hack" / "tools" / "build.sh"), "--versions"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.split()


def test_unset_means_the_default_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KUBERNETES_VERSION_ENV, raising=False)
    assert requested_kubernetes_version() is None
    assert kubernetes_bin_dir() == default_bin_dir()


def test_a_release_picks_its_own_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYNVOL_TOOLS_BIN", str(tmp_path / ".tools" / "bin"))
    monkeypatch.setenv(KUBERNETES_VERSION_ENV, "v1.35.4")
    assert requested_kubernetes_version() == "v1.35.4"
    assert kubernetes_bin_dir() == tmp_path / ".tools" / "k8s" / "v1.35.4" / "bin"


@pytest.mark.parametrize(
    "value",
    [
        "1.35.4",  # no v
        "v1.35",  # no patch
        "v1.35.4-rc.0",
        "v2.0.0",
        "../../../../usr/bin",
        "v1.35.4/../../bin",
        "v1.35.4\n",
        " v1.35.4",
        "v1.35.4\x00",
    ],
)
def test_anything_but_a_release_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(KUBERNETES_VERSION_ENV, value.replace("\x00", "\\0"))
    with pytest.raises(ValueError, match=KUBERNETES_VERSION_ENV):
        requested_kubernetes_version()
    with pytest.raises(ValueError, match="not a Kubernetes release"):
        kubernetes_bin_dir(value)


@given(st.text(min_size=1, max_size=40))
def test_only_release_names_become_a_path(value: str) -> None:
    if _RELEASE.fullmatch(value):
        path = kubernetes_bin_dir(value)
        assert path.parent.name == value
        assert path.parent.parent == default_bin_dir().parent / "k8s"
    else:
        with pytest.raises(ValueError, match="not a Kubernetes release"):
            kubernetes_bin_dir(value)


@given(st.integers(0, 999), st.integers(0, 999))
def test_every_release_name_stays_below_the_tools_directory(minor: int, patch: int) -> None:
    version = f"v1.{minor}.{patch}"
    path = kubernetes_bin_dir(version)
    assert path.resolve().is_relative_to((default_bin_dir().parent / "k8s").resolve())
    assert path == default_bin_dir().parent / "k8s" / version / "bin"


def test_the_control_plane_takes_its_kubernetes_binaries_from_the_release(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(KUBERNETES_VERSION_ENV, "v1.35.4")
    plane = ControlPlane(dir=tmp_path / "cp", bin_dir=tmp_path / "bin")
    assert plane.kubernetes_version == "v1.35.4"
    assert plane.kubernetes_bin_dir == tmp_path / "k8s" / "v1.35.4" / "bin"
    # Nothing is built there: the error says which build brings it.
    with pytest.raises(ToolsMissing, match=re.escape("KUBERNETES_VERSION=v1.35.4 make tools")):
        plane.binary("kube-apiserver")
    # etcd is not part of a Kubernetes release and still comes from bin_dir.
    with pytest.raises(ToolsMissing, match=re.escape(str(tmp_path / "bin" / "etcd"))):
        plane.binary("etcd")


def test_versions_env_pins_two_releases_newest_first() -> None:
    pinned = _pinned()
    assert len(pinned) == 2, pinned
    assert all(_RELEASE.fullmatch(v) for v in pinned), pinned
    minors = [int(v.split(".")[1]) for v in pinned]
    # Upstream supports three minors: the oldest supported one is two below the newest.
    assert minors[0] - minors[1] == 2, pinned


@pytest.mark.parametrize("index", [0, 1])
def test_each_pinned_release_has_its_module(index: int) -> None:
    version = _pinned()[index]
    minor = version.split(".")[1]
    gomod = (TOP / "hack" / "tools" / f"kubernetes-1.{minor}" / "go.mod").read_text()
    assert re.search(rf"^\s*(require\s+)?k8s\.io/kubernetes {re.escape(version)}$", gomod, re.M)
    staging = "v0." + version.split(".", 1)[1]
    replaced = re.findall(r"^\s*(k8s\.io/[a-z0-9-]+) => \1 (v\S+)$", gomod, re.M)
    assert len(replaced) > 20, "the staging modules are replaced by their releases"
    assert {v for _, v in replaced} == {staging}, replaced
