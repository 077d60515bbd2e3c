"""Where the control plane's binaries come from, and ``dynvol dev tools install``'s cache.

The order is envtest's variable, dynvol's, the checkout's ``.tools/bin``, then (outside a
checkout) the install cache; the error names the ways. The Go module the package ships for
Kubernetes is the checkout's pinned one, byte for byte. The build itself is a Go build of
minutes: it runs by hand (``dynvol dev tools install``); here a filled cache is found and
a stale entry is rebuilt (and fails without Go, which shows it was not taken as built).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dynvol.testing import tools
from dynvol.testing.controlplane import (
    KUBERNETES_VERSION_ENV,
    ControlPlane,
    ToolsMissing,
    default_bin_dir,
    kubernetes_bin_dir,
    repo_root,
)

TOP = Path(__file__).resolve().parents[2]
_ENV = ("KUBEBUILDER_ASSETS", "DYNVOL_TOOLS_BIN", "DYNVOL_TOOLS_CACHE", KUBERNETES_VERSION_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


def test_envtest_assets_come_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "envtest"))
    monkeypatch.setenv("DYNVOL_TOOLS_BIN", str(tmp_path / "mine"))
    assert default_bin_dir() == tmp_path / "envtest"
    # One release per envtest directory: a named release is looked for there (and the
    # control plane refuses to start if it is another one).
    assert kubernetes_bin_dir("v1.35.4") == tmp_path / "envtest"


def test_then_dynvols_variable_then_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DYNVOL_TOOLS_BIN", str(tmp_path / "mine"))
    assert default_bin_dir() == tmp_path / "mine"
    monkeypatch.delenv("DYNVOL_TOOLS_BIN")
    assert repo_root() == TOP
    assert default_bin_dir() == TOP / ".tools" / "bin"


def test_the_install_cache_is_keyed_by_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    version = tools.pinned_versions()["kubernetes"]
    assert tools.installed_bin_dir() == tmp_path / "xdg" / "dynvol" / "tools" / version / "bin"
    monkeypatch.setenv("DYNVOL_TOOLS_CACHE", str(tmp_path / "cache"))
    assert tools.installed_bin_dir() == tmp_path / "cache" / version / "bin"
    assert tools.installed_bin_dir(tmp_path / "d") == tmp_path / "d" / version / "bin"
    # Another release beside it in the same cache.
    assert kubernetes_bin_dir("v1.35.4", bin_dir=tools.installed_bin_dir()) == (
        tmp_path / "cache" / "v1.35.4" / "bin"
    )


def test_a_missing_binary_names_every_way_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    plane = ControlPlane(dir=tmp_path / "cp", bin_dir=tmp_path / "nothing")
    with pytest.raises(ToolsMissing) as info:
        plane.binary("kube-apiserver")
    message = str(info.value)
    assert str(tmp_path / "nothing" / "kube-apiserver") in message
    for way in ("KUBEBUILDER_ASSETS", "DYNVOL_TOOLS_BIN", "dynvol dev tools install", "make tools"):
        assert way in message
    assert str(tools.installed_bin_dir()) in message


def test_a_missing_extra_crd_is_named_before_anything_starts(tmp_path: Path) -> None:
    plane = ControlPlane(
        dir=tmp_path / "cp", bin_dir=tmp_path / "nothing", extra_crd_paths=[tmp_path / "no.yaml"]
    )
    with pytest.raises(FileNotFoundError, match=r"extra_crd_paths: .*no\.yaml"):
        plane.start()
    assert not (tmp_path / "cp").exists()


def _versions_env() -> dict[str, str]:
    text = (TOP / "hack" / "tools" / "versions.env").read_text()
    return dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, re.M))


def test_the_shipped_kubernetes_module_is_the_checkouts_pin() -> None:
    version = _versions_env()["KUBERNETES_VERSION"]
    assert tools.pinned_versions()["kubernetes"] == version
    pinned = TOP / "hack" / "tools" / f"kubernetes-1.{version.split('.')[1]}"
    for name in ("go.mod", "go.sum"):
        assert (tools.module_dir("kubernetes") / name).read_text() == (pinned / name).read_text(), (
            f"dynvol/testing/gotools/kubernetes/{name} differs from {pinned / name}: "
            f"copy it (cp {pinned}/go.{{mod,sum}} dynvol/testing/gotools/kubernetes/)"
        )


def test_the_shipped_etcd_module_pins_a_release_and_covers_it() -> None:
    etcd = tools.pinned_versions()["etcd"]
    assert re.fullmatch(r"v3\.[0-9]+\.[0-9]+", etcd)
    go_sum = (tools.module_dir("etcd") / "go.sum").read_text()
    assert f"go.etcd.io/etcd/server/v3 {etcd} h1:" in go_sum
    names = [b.name for b in tools.pinned_binaries()]
    assert names == ["etcd", "kube-apiserver", "kubectl"]


def test_without_go_the_install_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(tools.ToolsBuildFailed, match="install Go") as info:
        tools.install(tmp_path, go="no-such-go", log=lambda _: None)
    assert "KUBEBUILDER_ASSETS" in str(info.value)
    assert not (tools.installed_bin_dir(tmp_path) / "etcd").exists()


@pytest.fixture
def filled_cache() -> Path:
    bin_dir = tools.installed_bin_dir()
    if not all(os.access(bin_dir / b.name, os.X_OK) for b in tools.pinned_binaries()):
        pytest.skip(f"{bin_dir} is empty: 'dynvol dev tools install' fills it")
    return bin_dir.parent.parent


def test_a_filled_cache_is_used_as_it_is(filled_cache: Path) -> None:
    result = tools.install(filled_cache, go="no-such-go", log=lambda _: None)
    assert result.built == ()
    assert result.cached == ("etcd", "kube-apiserver", "kubectl")
    assert result.bin_dir == tools.installed_bin_dir(filled_cache)


def test_a_binary_from_another_module_is_built_again(filled_cache: Path, tmp_path: Path) -> None:
    version_dir = tools.installed_bin_dir(filled_cache).parent
    copy = tmp_path / "cache" / version_dir.name
    (copy / "bin").mkdir(parents=True)
    for name in ("etcd", "kube-apiserver", "kubectl"):
        (copy / "bin" / name).symlink_to((version_dir / "bin" / name).resolve())
    record = (version_dir / "built.json").read_text()
    # kubectl's entry names another module digest: it must be rebuilt, the others not.
    (copy / "built.json").write_text(
        re.sub(r'("kubectl": "v[^"]*-)[0-9a-f]+"', r'\g<1>000000000000"', record)
    )
    logged: list[str] = []
    with pytest.raises(tools.ToolsBuildFailed, match="install Go"):
        tools.install(tmp_path / "cache", go="no-such-go", log=logged.append)
    assert logged == []
