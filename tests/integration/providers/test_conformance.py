"""The provider conformance suite on the built-ins and on the example third-party provider.

Real parts: s3 against the MinIO fixture (s3fs, and rclone as the S3 mounter), rclone
against ``rclone serve webdav`` on 127.0.0.1, the example ``tmpfs`` provider through its
entry point. nfs cannot be mounted here (no NFS client), so only its pure checks run.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynvol.testing.minio import MinioServer
from dynvol.testing.processes import Process, free_port, run, wait_until
from dynvol_core.models import ConnectionPolicy
from dynvol_providers.testing import ConformanceCase, ProviderConformance

#: The test servers listen on 127.0.0.1; their classes allow loopback and nothing more.
LOOPBACK = ConnectionPolicy(allow_loopback=True)

pytestmark = pytest.mark.integration


def _s3_case(minio: MinioServer, mounter: str) -> ConformanceCase:
    bucket = minio.make_bucket("conf")
    client = minio.client()

    def check_object(name: str, data: bytes) -> None:
        assert client.get_object(Bucket=bucket, Key=name)["Body"].read() == data

    return ConformanceCase(
        config={"bucket": bucket, "endpoint": minio.endpoint},
        parameters={"s3-mounter": mounter},
        connection=LOOPBACK,
        secret_data={"access-key-id": minio.access_key, "secret-access-key": minio.secret_key},
        invalid_configs=[
            ({"endpoint": minio.endpoint}, "bucket"),
            ({"bucket": "A_B"}, "bucket"),
            ({"bucket": bucket, "endpoint": f"{minio.endpoint}/x,use_cache=/tmp"}, "endpoint"),
            ({"bucket": bucket, "endpoint": "http://169.254.169.254"}, "endpoint"),
        ],
        invalid_secrets=[({"access-key-id": minio.access_key}, "data.secret-access-key")],
        check_object=check_object,
    )


class TestS3WithS3fs(ProviderConformance):
    provider_name = "s3"

    @pytest.fixture
    def dynvol_case(self, minio: MinioServer) -> ConformanceCase:
        return _s3_case(minio, "s3fs")


class TestS3WithRclone(ProviderConformance):
    provider_name = "s3"

    @pytest.fixture
    def dynvol_case(self, minio: MinioServer) -> ConformanceCase:
        return _s3_case(minio, "rclone")


@pytest.fixture(scope="module")
def webdav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, str, str]]:
    """``rclone serve webdav`` of a temp dir on 127.0.0.1, with a user and password."""
    if shutil.which("rclone") is None:
        pytest.skip("rclone is not installed (hack/setup.sh installs it)")
    base = tmp_path_factory.mktemp("webdav")
    served = base / "served"
    served.mkdir()
    user, password = f"user-{secrets.token_hex(4)}", secrets.token_hex(12)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    proc = Process.start(
        ["rclone", "serve", "webdav", str(served), "--addr", f"127.0.0.1:{port}",
         "--user", user, "--pass", password, "--config", str(base / "none.conf")],
        name="rclone-serve", env=env, log=base / "serve.log",
    )  # fmt: skip
    try:
        import socket

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=20, what="rclone serve webdav", alive=proc)
        obscured = run(["rclone", "obscure", password], env=env).strip()
        yield f"http://127.0.0.1:{port}", served, user, obscured
    finally:
        proc.stop()


class TestRcloneWebdav(ProviderConformance):
    provider_name = "rclone"

    @pytest.fixture
    def dynvol_case(self, webdav: tuple[str, Path, str, str]) -> ConformanceCase:
        url, served, user, obscured = webdav

        def check_object(name: str, data: bytes) -> None:
            assert (served / name).read_bytes() == data

        return ConformanceCase(
            config={"type": "webdav", "parameters": {"url": url, "vendor": "other"}},
            connection=LOOPBACK,
            secret_data={"user": user, "pass": obscured},
            invalid_configs=[
                ({"type": "local"}, "type"),
                ({"type": "webdav", "parameters": {"pass": "x"}}, "parameters[pass]"),
                (
                    {"type": "webdav", "parameters": {"url": url, "bearer_token_command": "id"}},
                    "parameters[bearer_token_command]",
                ),
                ({"type": "webdav", "parameters": {"url": "http://[fe80::1]/"}}, "parameters[url]"),
            ],
            invalid_secrets=[({"not an option": "value"}, "data.not an option")],
            check_object=check_object,
        )


class TestNfs(ProviderConformance):
    provider_name = "nfs"

    @pytest.fixture
    def dynvol_case(self) -> ConformanceCase:
        return ConformanceCase(
            config={"server": "127.0.0.1", "path": "/exports"},
            connection=LOOPBACK,
            invalid_configs=[
                ({"server": "127.0.0.1"}, "path"),
                ({"path": "/x"}, "server"),
                ({"server": "127.0.0.1", "path": "/x", "options": ["suid"]}, "options[0]"),
                ({"server": "169.254.169.254", "path": "/x"}, "server"),
            ],
            mountable=(
                "this kernel has no NFS client (no nfs in /proc/filesystems, no modules to "
                "load), and the machine has no mount.nfs and no NFS server; the mount "
                "command is covered by tests/unit/providers/test_nfs.py"
            ),
        )


class TestExampleTmpfs(ProviderConformance):
    """The example third-party package, found only through its entry point."""

    provider_name = "tmpfs"

    @pytest.fixture
    def dynvol_case(self) -> ConformanceCase:
        return ConformanceCase(
            config={"size": "8Mi"},
            invalid_configs=[({"size": "lots"}, "size"), ({"mode": "rwx"}, "mode")],
        )
