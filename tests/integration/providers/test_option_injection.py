"""A claim that tries to add s3fs options never mounts; the same claim done right does.

Real parts: s3fs against the MinIO fixture on 127.0.0.1, mounted under an rshared
temporary directory through the same LocalHost the DMP uses.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath

import pytest

from dynvol.testing.minio import MinioServer
from dynvol_core.errors import InvalidObject
from dynvol_core.models import ConnectionPolicy
from dynvol_providers import MountFailed, MountRequest, Reason
from dynvol_providers.builtin.s3 import S3Config, S3Provider
from dynvol_providers.hosting import LocalHost, read_mount_table
from dynvol_providers.testing import rshared_mount_dir

pytestmark = pytest.mark.integration

S3 = S3Provider()
#: The class of the local MinIO: loopback allowed, nothing else.
MINIO_CLASS = ConnectionPolicy(allow_loopback=True)


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    if shutil.which("s3fs") is None:
        pytest.skip("s3fs is not installed (hack/setup.sh installs it)")
    with rshared_mount_dir(tmp_path) as path:
        yield path


@pytest.fixture
async def host() -> AsyncIterator[LocalHost]:
    local = LocalHost()
    try:
        yield local
    finally:
        await local.close()


def _mounted(target: Path) -> bool:
    return any(str(entry.path) == str(target) for entry in read_mount_table())


def _request(config: S3Config, target: Path, work: Path, minio: MinioServer) -> MountRequest:
    return MountRequest(
        name="test/injection",
        target=PurePosixPath(target),
        read_only=False,
        config=config,
        credentials=S3.parse_credentials(
            {"access-key-id": minio.access_key, "secret-access-key": minio.secret_key}
        ),
        work_dir=PurePosixPath(work),
    )


async def test_injected_options_are_refused_and_a_clean_claim_mounts(
    minio: MinioServer, mount_dir: Path, host: LocalHost, tmp_path: Path
) -> None:
    bucket = minio.make_bucket("inject")
    cache = tmp_path / "attacker-cache"
    payload = f"{minio.endpoint}/x,use_cache={cache},dbglevel=info,dev,suid"
    target = mount_dir / "data"
    target.mkdir()
    work = tmp_path / "work"
    work.mkdir(mode=0o700)

    # 1. The claim is refused, naming the field.
    with pytest.raises(InvalidObject) as info:
        S3.parse_config(
            {"bucket": bucket, "endpoint": payload}, parameters={}, connection=MINIO_CLASS
        )
    assert info.value.paths == ("endpoint",)

    # 2. A config that skipped parsing (an older dynvol, a hand-written mount) still cannot
    #    reach s3fs: the mount fails before any process starts, and nothing is mounted.
    forged = S3Config(bucket=bucket, endpoint=payload, path_style=True)
    with pytest.raises(MountFailed) as failed:
        await S3.mount(_request(forged, target, work, minio), host)
    assert failed.value.reason == Reason.INVALID_CONFIG
    assert not failed.value.retryable
    assert "endpoint" in failed.value.message
    assert host.daemons() == ()
    assert not _mounted(target)
    assert not cache.exists()

    # 3. The same claim without the payload mounts, and a file reaches the bucket.
    config = S3.parse_config(
        {"bucket": bucket, "endpoint": minio.endpoint}, parameters={}, connection=MINIO_CLASS
    )
    handle = await S3.mount(_request(config, target, work, minio), host)
    try:
        assert _mounted(target)
        mounted = next(e for e in read_mount_table() if str(e.path) == str(target))
        # dynvol's options only: a FUSE mount without dev/suid shows nodev,nosuid.
        assert {"nosuid", "nodev"} <= set(mounted.options)
        (target / "clean.txt").write_bytes(b"clean\n")
    finally:
        await S3.unmount(handle, host)
    assert not _mounted(target)
    body = minio.client().get_object(Bucket=bucket, Key="clean.txt")["Body"].read()
    assert body == b"clean\n"
    assert not cache.exists()

    # 4. A class that does not allow loopback refuses the clean claim too.
    with pytest.raises(InvalidObject, match="allowLoopback"):
        S3.parse_config(
            {"bucket": bucket, "endpoint": minio.endpoint},
            parameters={},
            connection=ConnectionPolicy(),
        )
