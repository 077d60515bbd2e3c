"""What the agent waits for before it unmounts a deleted mount (docs/design.md §9.5, §9.6):
the class's grace period, and rclone's uploads (the real rclone in
tests/integration/dmp/test_unmount_grace.py; here the records it leaves, as it writes them).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from dynvol_core import constants as c
from dynvol_core.models import StorageProviderClass
from dynvol_providers.builtin.rclone import pending_uploads


def _class(parameters: dict[str, str]) -> StorageProviderClass:
    return StorageProviderClass.from_object(
        {"apiVersion": c.API_VERSION, "kind": c.KIND_CLASS, "metadata": {"name": "x"},
         "spec": {"provider": "s3", "parameters": parameters}}
    )  # fmt: skip


def test_the_grace_period_defaults_to_30s_and_follows_the_class() -> None:
    assert _class({}).unmount_grace == 30.0
    assert _class({c.PARAM_UNMOUNT_GRACE: "0"}).unmount_grace == 0.0
    assert _class({c.PARAM_UNMOUNT_GRACE: "3600"}).unmount_grace == 3600.0


@pytest.mark.parametrize("bad", ["30s", "-1", "3601", "1e3", " 5", "٣"])
def test_a_bad_grace_period_names_the_parameter(bad: str) -> None:
    from dynvol_core.errors import InvalidObject

    with pytest.raises(InvalidObject) as raised:
        _class({c.PARAM_UNMOUNT_GRACE: bad})
    assert f"spec.parameters[{c.PARAM_UNMOUNT_GRACE}]" in str(raised.value)


def _record(cache: Path, name: str, content: str) -> None:
    path = cache / "vfsMeta" / "dynvol" / "bucket" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def test_pending_uploads_counts_dirty_records_only(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert pending_uploads(PurePosixPath(cache)) == 0  # no cache yet
    _record(cache, "a.bin", json.dumps({"Size": 5, "Dirty": True}))
    _record(cache, "sub/b.bin", json.dumps({"Size": 5, "Dirty": True}))
    _record(cache, "done.bin", json.dumps({"Size": 5, "Dirty": False}))
    _record(cache, "torn.bin", '{"Size": 5, "Dir')  # being rewritten: not counted
    _record(cache, "odd.bin", json.dumps(["Dirty"]))
    assert pending_uploads(PurePosixPath(cache)) == 2
