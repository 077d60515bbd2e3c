"""Every provider through a claim and a Dynamic Mount Pod on the real node.

One case per provider and mounter, each against a real server on 127.0.0.1 (the DMPs use
the host network on this cluster) with the credentials in the class's Secret:

- ``s3`` with s3fs and with rclone, against MinIO;
- ``rclone`` against ``rclone serve webdav`` (user and obscured password in the Secret);
- ``rclone`` against OpenSSH's sshd serving SFTP (user and private key in the Secret);
- the example third-party provider (``tmpfs``, examples/dynvol-provider-example), from
  an image built ``FROM`` dynvol's the way a provider author builds it and deployed with a
  kustomize ``images:`` entry, as docs/providers.md tells authors to;
- ``nfs`` is skipped with the reason: this kernel has no NFS client.

Each case: a running pod, then a claim; the pod reads a file the server had; a file the
pod writes (1 MiB) reaches the server's own storage; a file put on the server afterwards
is read in the pod; deleting the claim removes the mount in the pod and on the host and
stops the FUSE daemon in the DMP. The times are printed (``-s``) for the closing notes;
nothing is asserted about them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from dynvol.testing import MinioServer
from dynvol.testing.localcluster import SYSTEM_NAMESPACE
from dynvol.testing.servers import SftpServer, WebdavServer
from tests.e2e.conftest import (
    API_VERSION,
    CI,
    GROUP,
    Cluster,
    Storage,
    host_mounts_under,
    wait_for,
)

pytestmark = pytest.mark.e2e

TOP = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGE = "localhost/dynvol/provider-example:dev"
DYNVOL_IMAGE = "localhost/dynvol/dynvol:dev"
SIZE = 1 << 20
_WORKLOADS = ("deployment/dynvol-controller", "daemonset/dynvol-node")


def _unavailable(what: str, exc: Exception) -> None:
    if CI:
        pytest.fail(f"{what}: {exc}")
    pytest.skip(f"{what}: {exc}")


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def webdav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebdavServer]:
    server = WebdavServer(dir=tmp_path_factory.mktemp("webdav"))
    try:
        server.start()
    except FileNotFoundError as exc:
        _unavailable("no WebDAV server", exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpServer]:
    server = SftpServer(dir=tmp_path_factory.mktemp("sftp"))
    try:
        server.start()
    except FileNotFoundError as exc:
        _unavailable("no SFTP server", exc)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- classes


class ProviderStorage(Storage):
    """A namespace and a class of any provider, its Secret holding ``secret_data``."""

    def __init__(
        self,
        cluster: Cluster,
        minio: MinioServer,
        *,
        provider: str,
        secret_data: dict[str, str] | None,
        parameters: dict[str, str] | None = None,
    ) -> None:
        super().__init__(cluster, minio, policy="independent")
        self.provider = provider
        self.secret_data = secret_data
        self.parameters = parameters or {}
        self.secret_name = f"e2e-{provider}-credentials"

    def class_object(self) -> dict[str, Any]:
        params = {
            f"{GROUP}/mount-cpu-request": "10m",
            f"{GROUP}/mount-memory-request": "50Mi",
            f"{GROUP}/mount-cpu-limit": "500m",
            f"{GROUP}/mount-memory-limit": "256Mi",
            **self.parameters,
        }
        if self.secret_data is not None:
            params[f"{GROUP}/storage-provider-secret-name"] = self.secret_name
            params[f"{GROUP}/storage-provider-secret-namespace"] = self.namespace
        return {
            "apiVersion": API_VERSION,
            "kind": "StorageProviderClass",
            "metadata": {"name": self.class_name},
            "spec": {
                "provider": self.provider,
                "parameters": params,
                "connection": dict(self.connection),
            },
        }

    def create(self) -> None:
        objs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}
        ]
        if self.secret_data is not None:
            objs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": self.secret_name, "namespace": self.namespace},
                    "type": "Opaque",
                    "stringData": self.secret_data,
                }
            )
        objs.append(self.class_object())
        self.cluster.apply(*objs)


@contextlib.contextmanager
def _provider_storage(cluster: Cluster, minio: MinioServer, **kw: Any) -> Iterator[ProviderStorage]:
    storage = ProviderStorage(cluster, minio, **kw)
    storage.create()
    try:
        yield storage
    finally:
        storage.destroy()


# --------------------------------------------------------------------------- one case


@attrs.define(kw_only=True)
class Backend:
    """How a case reaches its server's storage directly (not through dynvol)."""

    #: What the claim's spec carries besides mountpoint and selector.
    spec: dict[str, Any]
    #: The bytes stored under a name, or None when there is no such file.
    read: Callable[[str], bytes | None]
    write: Callable[[str, bytes], None]
    #: The FUSE daemon the DMP runs for the mount (None: a kernel mount, no daemon).
    daemon: str | None
    #: Whether the storage exists before the claim (a tmpfs starts empty with its mount).
    persistent: bool = True


def _dir_backend(root: Path, spec: dict[str, Any], daemon: str | None) -> Backend:
    def read(name: str) -> bytes | None:
        path = root / name
        return path.read_bytes() if path.is_file() else None

    def write(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)

    return Backend(spec=spec, read=read, write=write, daemon=daemon)


def _s3_backend(storage: Storage, daemon: str) -> Backend:
    def write(name: str, data: bytes) -> None:
        storage.s3.put_object(Bucket=storage.bucket, Key=name, Body=data)

    def read_bytes(name: str) -> bytes | None:
        try:
            obj = storage.s3.get_object(Bucket=storage.bucket, Key=name)
        except storage.s3.exceptions.NoSuchKey:
            return None
        return obj["Body"].read()  # type: ignore[no-any-return]

    spec = {
        "storageProvider": "s3",
        "s3Config": {"bucket": storage.bucket, "endpoint": storage.minio.endpoint},
    }
    return Backend(spec=spec, read=read_bytes, write=write, daemon=daemon)


def _daemons(storage: Storage, dmp: str, daemon: str) -> list[str] | None:
    """PIDs of ``daemon`` in DMP ``dmp``; None once the DMP is gone."""
    script = "for d in /proc/[0-9]*; do echo ${d#/proc/}:$(cat $d/comm 2>/dev/null); done"
    result = storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "exec", dmp, "--", "sh", "-c", script, check=False, timeout=30
    )  # fmt: skip
    if result.returncode != 0:
        gone = not storage.cluster.kubectl(
            "-n", SYSTEM_NAMESPACE, "get", "pod", dmp, "--ignore-not-found", "-o", "name",
            check=False,
        ).stdout.strip()  # fmt: skip
        if gone:
            return None
        raise AssertionError(f"cannot list the processes of DMP {dmp}: {result.stderr}")
    return [line for line in result.stdout.split() if line.partition(":")[2] == daemon]


def _run_case(storage: Storage, case: str, backend: Backend) -> dict[str, float]:
    """The round trip every provider makes; returns the times it took (seconds)."""
    mountpoint = f"/{case}"
    inside = f"/dynamic{mountpoint}"
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    (pod,) = storage.wait_ready("app=app", 1)
    before = f"on the server before the claim {uuid.uuid4().hex}\n"
    if backend.persistent:
        backend.write("before.txt", before.encode())

    began = time.monotonic()
    storage.cluster.apply(
        {
            "apiVersion": API_VERSION,
            "kind": "DynamicVolumeClaim",
            "metadata": {"name": case, "namespace": storage.namespace},
            "spec": {
                "mountpoint": mountpoint,
                "selector": {"matchLabels": {"app": "app"}},
                **backend.spec,
            },
        }
    )
    if not backend.persistent:
        wait_for(
            lambda: storage.exec(pod, f"grep -q ' {inside} ' /proc/self/mounts").returncode == 0,
            120, f"{inside} is mounted in {pod}",
        )  # fmt: skip
        backend.write("before.txt", before.encode())
    seen = storage.wait_content(pod, f"{inside}/before.txt", before)
    figures = {"claim_to_visible": seen - began}
    (dvm,) = [d for d in storage.dvms() if d["spec"]["claimName"] == case]
    dmp, slot = dvm["spec"]["dmpName"], Path(dvm["spec"]["slotPath"])
    assert host_mounts_under(slot / case), f"the mount is at {slot / case} on the host"

    # The pod writes 1 MiB; the same bytes reach the server's storage.
    began = time.monotonic()
    out = storage.sh(
        pod,
        f"head -c {SIZE} /dev/urandom > {inside}/from-pod.bin && md5sum {inside}/from-pod.bin",
    )
    written = out.split()[0]
    stored = wait_for(
        lambda: (
            (data := backend.read("from-pod.bin")) is not None
            and len(data) == SIZE
            and hashlib.md5(data).hexdigest() == written
        ),
        120,
        f"the server stores the {SIZE} bytes the pod wrote",
    )
    assert stored
    figures["pod_write_to_server"] = time.monotonic() - began

    # A file put on the server afterwards is read in the pod.
    later = f"put on the server later {uuid.uuid4().hex}\n"
    began = time.monotonic()
    backend.write("later.txt", later.encode())
    figures["server_to_pod"] = storage.wait_content(pod, f"{inside}/later.txt", later) - began

    if backend.daemon is not None:
        daemons = _daemons(storage, dmp, backend.daemon)
        assert daemons, f"DMP {dmp} runs {backend.daemon} for the mount"

    # Deleting the claim: gone in the pod, on the host, and its daemon in the DMP.
    began = time.monotonic()
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", case)
    storage.wait_gone(pod, inside, timeout=90)
    figures["delete_to_unmounted"] = time.monotonic() - began
    wait_for(lambda: not host_mounts_under(slot / case), 60, f"nothing is mounted at {slot}")
    if backend.daemon is not None:
        daemon = backend.daemon
        wait_for(lambda: not _daemons(storage, dmp, daemon), 90, f"{daemon} is gone from DMP {dmp}")
    wait_for(lambda: not storage.dvms(), 60, "the DynamicVolumeMount is gone")
    if backend.persistent:
        assert backend.read("from-pod.bin") is not None, "the data stays on the server"
    print(
        f"\n[providers] {case}: claim -> visible {figures['claim_to_visible']:.1f} s; "
        f"pod writes {SIZE >> 20} MiB -> on the server {figures['pod_write_to_server']:.1f} s; "
        f"server -> pod {figures['server_to_pod']:.1f} s; "
        f"claim deleted -> unmounted in the pod {figures['delete_to_unmounted']:.1f} s"
    )
    return figures


# --------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("mounter", ["s3fs", "rclone"])
def test_s3_through_a_claim(storage: Storage, mounter: str) -> None:
    if mounter != "s3fs":
        storage.cluster.kubectl(
            "patch", "storageproviderclass", storage.class_name, "--type=merge",
            "-p", json.dumps({"spec": {"parameters": {"s3-mounter": mounter}}}),
        )  # fmt: skip
    _run_case(storage, f"s3-{mounter}", _s3_backend(storage, mounter))


def test_rclone_webdav_through_a_claim(
    dynvol: Cluster, minio: MinioServer, webdav: WebdavServer
) -> None:
    with _provider_storage(
        dynvol, minio, provider="rclone", secret_data=webdav.secret_data()
    ) as storage:
        spec = {
            "storageProvider": "rclone",
            "rcloneConfig": {"type": "webdav", "parameters": webdav.claim_parameters()},
        }
        _run_case(storage, "webdav", _dir_backend(webdav.served, spec, "rclone"))


def test_rclone_sftp_through_a_claim(dynvol: Cluster, minio: MinioServer, sftp: SftpServer) -> None:
    with _provider_storage(
        dynvol, minio, provider="rclone", secret_data=sftp.secret_data()
    ) as storage:
        spec = {
            "storageProvider": "rclone",
            "rcloneConfig": {
                "type": "sftp",
                "remotePath": "data",
                "parameters": sftp.claim_parameters(),
            },
        }
        _run_case(storage, "sftp", _dir_backend(sftp.served, spec, "rclone"))


def test_nfs_through_a_claim() -> None:
    filesystems = Path("/proc/filesystems").read_text().split()
    if "nfs" not in filesystems and "nfs4" not in filesystems:
        pytest.skip(
            f"this kernel ({os.uname().release}) has no NFS client: no nfs in "
            "/proc/filesystems, and no module to load; the nfs provider is covered by "
            "tests/unit/providers/test_nfs.py and its conformance case"
        )
    pytest.fail(
        "this kernel has an NFS client: add an NFS server and the nfs case here "
        "(tests/e2e/test_providers.py)"
    )


# --------------------------------------------------------------------------- third party


def _dry_run_class(cluster: Cluster, obj: dict[str, Any]) -> tuple[int, str]:
    proc = cluster.kubectl(
        "create", "--dry-run=server", "-o", "name", "-f", "-", input=json.dumps(obj), check=False
    )  # fmt: skip
    return proc.returncode, proc.stderr.strip()


def _tmpfs_class(name: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "StorageProviderClass",
        "metadata": {"name": name},
        "spec": {"provider": "tmpfs"},
    }


def _rollout(cluster: Cluster) -> None:
    for what in _WORKLOADS:
        cluster.kubectl(
            "-n", SYSTEM_NAMESPACE, "rollout", "status", what, "--timeout=180s", timeout=200
        )  # fmt: skip


def _images_in_use(cluster: Cluster) -> set[str]:
    images = set()
    for what in _WORKLOADS:
        kind, name = what.split("/")
        obj = cluster.get(kind, name, SYSTEM_NAMESPACE)
        images |= {c["image"] for c in obj["spec"]["template"]["spec"]["containers"]}
    return images


@pytest.fixture(scope="module")
def example_image_deployed(
    dynvol: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, float]]:
    """dynvol redeployed from the example provider's image, then back to its own.

    The image is built FROM this checkout's dynvol image (hack/images/build.py
    provider-example, cached by the dynvol image's digest and the example's files) and
    deployed the way docs/providers.md says: the local overlay plus a kustomize
    ``images:`` entry, so the controller (webhook), the node plugin and the DMPs all run
    it. Yields the times it took.
    """
    figures: dict[str, float] = {}
    probe = _tmpfs_class(f"e2e-probe-{uuid.uuid4().hex[:8]}")
    code, refused = _dry_run_class(dynvol, probe)
    assert code != 0, "dynvol's own image should refuse a class of an uninstalled provider"
    assert "spec.provider" in refused, refused
    assert "tmpfs" in refused, refused
    began = time.monotonic()
    dynvol.import_images("provider-example")
    figures["image_build_and_import"] = time.monotonic() - began
    overlay = tmp_path_factory.mktemp("example-overlay")
    (overlay / "kustomization.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(dynvol.overlay, overlay)],
                "images": [
                    {
                        "name": DYNVOL_IMAGE.rsplit(":", 1)[0],
                        "newName": EXAMPLE_IMAGE.rsplit(":", 1)[0],
                        "newTag": EXAMPLE_IMAGE.rsplit(":", 1)[1],
                    }
                ],
            }
        )
    )
    began = time.monotonic()
    try:
        dynvol.kubectl("apply", "-k", str(overlay))
        _rollout(dynvol)
        assert _images_in_use(dynvol) == {EXAMPLE_IMAGE}
        # The new controller serves once it re-registered its webhooks: the class passes.
        wait_for(
            lambda: _dry_run_class(dynvol, probe)[0] == 0, 120,
            "the webhook of the example image accepts a tmpfs class",
        )  # fmt: skip
        figures["redeploy"] = time.monotonic() - began
        yield figures
    finally:
        dynvol.kubectl("apply", "-k", str(dynvol.overlay))
        _rollout(dynvol)
        wait_for(
            lambda: (
                _dry_run_class(dynvol, probe)[0] != 0
                and "spec.provider" in _dry_run_class(dynvol, probe)[1]
            ),
            120,
            "dynvol's own webhook serves again (and refuses tmpfs)",
        )
        assert _images_in_use(dynvol) == {DYNVOL_IMAGE}


def test_example_provider_from_its_own_image_through_a_claim(
    example_image_deployed: dict[str, float], dynvol: Cluster, minio: MinioServer
) -> None:
    with _provider_storage(dynvol, minio, provider="tmpfs", secret_data=None) as storage:
        # The webhook validates the free-form config with the plugin's own parse_config.
        bad = dynvol.kubectl(
            "apply", "-f", "-", check=False,
            input=json.dumps({
                "apiVersion": API_VERSION, "kind": "DynamicVolumeClaim",
                "metadata": {"name": "bad", "namespace": storage.namespace},
                "spec": {"storageProvider": "tmpfs", "config": {"size": "lots"},
                         "mountpoint": "/bad", "selector": {"matchLabels": {"app": "app"}}},
            }),
        )  # fmt: skip
        assert bad.returncode != 0, "the webhook should refuse config.size 'lots'"
        assert "spec.config.size" in bad.stderr, bad.stderr
        spec = {"storageProvider": "tmpfs", "config": {"size": "8Mi"}}
        # The tmpfs is in the DMP's mount namespace and propagates to the slot on the
        # host: the host side of the slot is the "server" here.
        backend = _tmpfs_backend(storage, spec)
        _run_case(storage, "tmpfs", backend)
    print(
        f"\n[providers] example image: built and imported in "
        f"{example_image_deployed['image_build_and_import']:.1f} s, dynvol redeployed "
        f"with it in {example_image_deployed['redeploy']:.1f} s"
    )


def _tmpfs_backend(storage: Storage, spec: dict[str, Any]) -> Backend:
    """The tmpfs seen from the host: the mount propagates from the DMP to the pod's slot."""

    def mount_dir() -> Path:
        (dvm,) = [d for d in storage.dvms() if d["spec"]["claimName"] == "tmpfs"]
        return Path(dvm["spec"]["slotPath"]) / "tmpfs"

    def read(name: str) -> bytes | None:
        path = mount_dir() / name
        return path.read_bytes() if path.is_file() else None

    def write(name: str, data: bytes) -> None:
        (mount_dir() / name).write_bytes(data)

    return Backend(spec=spec, read=read, write=write, daemon=None, persistent=False)
