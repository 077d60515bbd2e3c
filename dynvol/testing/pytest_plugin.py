"""pytest fixtures over real components: a control plane, MinIO, rshared directories.

Loaded automatically (entry point ``pytest11``) wherever dynvol is installed, so other
controllers and provider authors get the same fixtures dynvol's own suite uses:

- ``control_plane`` (session): etcd + kube-apiserver with dynvol's CRDs applied (from the
  installed package), and the project's own CRDs from ``dynvol_extra_crds``.
- ``dynvol_extra_crds`` (session): the paths of those CRDs; by default the ``dynvol_crds``
  ini option (paths relative to the ini file) and ``--dynvol-crds PATH`` (repeatable).
  Override the fixture in a conftest to compute them.
- ``kube_client``: a kubernetes_asyncio ``ApiClient`` for it.
- ``namespace``: a fresh namespace, deleted afterwards.
- ``minio`` (session): an S3 server on 127.0.0.1.
- ``rshared_dir``: a scratch directory that is an rshared mount.

When a binary is missing the fixtures skip with the reason (which names the ways to get
it: ``KUBEBUILDER_ASSETS``, ``DYNVOL_TOOLS_BIN``, ``dynvol dev tools install``), except
under ``CI=true``, where a missing tool is a failure: CI must run the real thing.

``ControlPlane`` and ``MinioServer`` need only the base install; ``kube_client`` and
``namespace`` need ``dynvol[testing]`` (kubernetes-asyncio, pytest-asyncio).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing.controlplane import (
    ControlPlane,
    ToolsMissing,
    default_bin_dir,
    kubernetes_bin_dir,
)
from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import rshared_dir as _rshared_dir
from dynvol.testing.processes import run


def _missing(exc: Exception) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{exc} (CI must run against real components)")
    pytest.skip(str(exc))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "dynvol_crds",
        type="paths",
        default=[],
        help="CRDs (files, directories or kustomizations) the control_plane fixture applies "
        "after dynvol's",
    )
    parser.addoption(
        "--dynvol-crds",
        action="append",
        default=[],
        metavar="PATH",
        help="also apply these CRDs in the control_plane fixture (repeatable)",
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the real components the integration tier runs against."""
    bin_dir = default_bin_dir()
    try:
        kube_dir = kubernetes_bin_dir()
    except ValueError as exc:
        return [f"dynvol: {exc}"]
    lines = []
    for name, args in (
        ("etcd", ["--version"]),
        ("kube-apiserver", ["--version"]),
        ("minio", ["--version"]),
    ):
        path = (kube_dir if name == "kube-apiserver" else bin_dir) / name
        if os.access(path, os.X_OK):
            try:
                first = run([str(path), *args], timeout=20).strip().splitlines()[0]
            except (RuntimeError, OSError, IndexError) as exc:
                first = f"unusable: {exc}"
            lines.append(f"dynvol: {name}: {first}")
        else:
            lines.append(f"dynvol: {name}: not built (make tools)")
    return lines


@pytest.fixture(scope="session")
def dynvol_extra_crds(pytestconfig: pytest.Config) -> list[Path]:
    """The project's own CRDs for ``control_plane``: the ``dynvol_crds`` ini option, then
    ``--dynvol-crds``. Override this fixture to compute them."""
    from_ini: list[Path] = list(pytestconfig.getini("dynvol_crds"))
    from_cli = [Path(p).resolve() for p in pytestconfig.getoption("dynvol_crds")]
    return [*from_ini, *from_cli]


@pytest.fixture(scope="session")
def control_plane(
    tmp_path_factory: pytest.TempPathFactory, dynvol_extra_crds: list[Path]
) -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver on 127.0.0.1 with dynvol's CRDs and the project's own
    (``dynvol_extra_crds``) applied."""
    plane = ControlPlane(
        dir=tmp_path_factory.mktemp("control-plane"), extra_crd_paths=tuple(dynvol_extra_crds)
    )
    try:
        plane.start()
    except ToolsMissing as exc:
        _missing(exc)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
async def kube_client(control_plane: ControlPlane) -> AsyncIterator[Any]:
    """A kubernetes_asyncio ApiClient talking to ``control_plane``."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(control_plane.kubeconfig), client_configuration=configuration
    )
    api = client.ApiClient(configuration=configuration)
    try:
        yield api
    finally:
        await api.close()


@pytest.fixture
async def namespace(kube_client: Any) -> AsyncIterator[str]:
    """A fresh namespace; deleted afterwards (it stays Terminating: no controller-manager)."""
    from kubernetes_asyncio import client

    name = f"t-{secrets.token_hex(5)}"
    core = client.CoreV1Api(kube_client)
    await core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"dynvol.test": "true"}))
    )
    try:
        yield name
    finally:
        await core.delete_namespace(name)


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """A real MinIO server on 127.0.0.1."""
    server = MinioServer(dir=tmp_path_factory.mktemp("minio"))
    try:
        server.start()
    except ToolsMissing as exc:
        _missing(exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rshared_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory bound onto itself and made rshared; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mount tests need root")
    with _rshared_dir(tmp_path / "rshared") as path:
        yield path
