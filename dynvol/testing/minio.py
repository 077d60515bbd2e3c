"""A real MinIO S3 server on 127.0.0.1 (or a given local address) for tests, benchmarks and the
demo."""

from __future__ import annotations

import os
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from dynvol.testing.controlplane import ToolsMissing, default_bin_dir
from dynvol.testing.processes import Process, free_port, wait_until


@attrs.define(kw_only=True)
class MinioServer:
    """``minio server`` as a child of this process, with fresh root credentials."""

    dir: Path
    bin_dir: Path = attrs.field(factory=default_bin_dir)
    #: The address to listen on: loopback, or an address of a network this machine's own
    #: code made (the multi-node cluster's bridge, where its pods reach it).
    host: str = "127.0.0.1"
    access_key: str = attrs.field(factory=lambda: "dynvol" + secrets.token_hex(4))
    secret_key: str = attrs.field(factory=lambda: secrets.token_hex(16))
    process: Process | None = None
    endpoint: str = ""
    _buckets: list[str] = attrs.field(factory=list)

    def start(self, *, timeout: float = 60.0) -> MinioServer:
        binary = self.bin_dir / "minio"
        if not os.access(binary, os.X_OK):
            raise ToolsMissing(f"{binary} is missing: run 'make tools' to build it")
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.endpoint = f"http://{self.host}:{port}"
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CALLHOME_ENABLE": "off",
        }
        self.process = Process.start(
            [
                str(binary),
                "server",
                str(data),
                "--quiet",
                "--address",
                f"{self.host}:{port}",
                "--console-address",
                f"{self.host}:{free_port()}",
            ],
            name="minio",
            env=env,
            log=self.dir / "minio.log",
        )

        def live() -> bool:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/minio/health/live", timeout=1):
                    return True
            except (OSError, urllib.error.URLError):
                return False

        wait_until(live, timeout=timeout, what="minio /minio/health/live", alive=self.process)
        return self

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        # boto3 ships no type information (its stubs are a separate package).
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def make_bucket(
        self, prefix: str = "dynvol", objects: Mapping[str, bytes] | None = None
    ) -> str:
        """Create a new bucket holding ``objects`` (key -> body) and return its name;
        removed with :meth:`stop`."""
        name = f"{prefix}-{secrets.token_hex(6)}"
        client = self.client()
        client.create_bucket(Bucket=name)
        self._buckets.append(name)
        for key, body in (objects or {}).items():
            client.put_object(Bucket=name, Key=key, Body=body)
        return name

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)
            self.process = None
        shutil.rmtree(self.dir / "data", ignore_errors=True)
