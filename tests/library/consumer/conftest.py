"""The seed objects of docs/design.md §2, as an outside consumer would hold them."""

from __future__ import annotations

import copy
from typing import Any

import pytest

API = "dynamicvolume.csi.cloudnative101.net/v1alpha1"
P = "dynamicvolume.csi.cloudnative101.net/"

SEED_SECRET: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {"name": "provider-s3-secret", "namespace": "default"},
    "type": "Opaque",
    "stringData": {"access-key-id": "cldevaccesskey", "secret-access-key": "cldevsecretkey"},
}
SEED_CLASS: dict[str, Any] = {
    "apiVersion": API,
    "kind": "StorageProviderClass",
    "metadata": {"name": "s3-sample"},
    "spec": {
        "provider": "s3",
        "parameters": {
            P + "storage-provider-secret-name": "provider-s3-secret",
            P + "storage-provider-secret-namespace": "default",
            P + "mount-cpu-request": "10m",
            P + "mount-memory-request": "50Mi",
            P + "mount-cpu-limit": "10m",
            P + "mount-memory-limit": "50Mi",
        },
    },
}
SEED_CLAIMS: list[dict[str, Any]] = [
    {
        "apiVersion": API,
        "kind": "DynamicVolumeClaim",
        "metadata": {"name": "externalvolume-s3-sample", "namespace": "dynamic-volume-test"},
        "spec": {
            "mountpoint": "/data",
            "s3Config": {"bucket": "ssat202410181", "endpoint": "https://play.min.io"},
            "selector": {"matchLabels": {"app": "app-4-s3"}},
            "storageProvider": "s3",
        },
    },
    {
        "apiVersion": API,
        "kind": "DynamicVolumeClaim",
        "metadata": {"name": "dynamicvolume-s3-sample"},
        "spec": {
            "selector": {"matchLabels": {"app": "nginx"}},
            "s3Config": {"bucket": "my-s3-bucket", "endpoint": "http://my-s3-service.example.com"},
            "mountpoint": "/data",
            "readOnly": True,
        },
    },
]


@pytest.fixture
def seed_class() -> dict[str, Any]:
    return copy.deepcopy(SEED_CLASS)


@pytest.fixture
def seed_claims() -> list[dict[str, Any]]:
    return copy.deepcopy(SEED_CLAIMS)


@pytest.fixture
def seed_secret() -> dict[str, Any]:
    return copy.deepcopy(SEED_SECRET)
