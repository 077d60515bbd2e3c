"""The node plugin's volume records: JSON round trip and clear rejection of bad input."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_core.paths import XvolsLayout
from dynvol_core.records import RECORD_FORMAT_VERSION, VolumeRecord

POD_UID = "0a2b4c6d-8e0f-4123-8456-789abcdef012"
SLOT_UUID = "1f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10"
TARGET = f"/var/lib/kubelet/pods/{POD_UID}/volumes/kubernetes.io~csi/dynamic-volume-root-path/mount"

RECORD = VolumeRecord(
    volume_id="csi-4f1e2d3c",
    pod_uid=POD_UID,
    pod_name="app-4-s3-7d9f8",
    pod_namespace="dynamic-volume-test",
    class_name="s3-sample",
    policy="independent",
    slot_uuid=SLOT_UUID,
    target_path=PurePosixPath(TARGET),
    read_only=True,
    phase="publishing",
)


def document(**changes: Any) -> str:
    raw: dict[str, Any] = json.loads(RECORD.to_json())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return json.dumps(raw)


def test_round_trip() -> None:
    text = RECORD.to_json()
    assert json.loads(text)["version"] == RECORD_FORMAT_VERSION
    assert json.loads(text)["target_path"] == TARGET
    assert VolumeRecord.from_json(text) == RECORD
    assert VolumeRecord.from_json(text.encode()) == RECORD


def test_helpers() -> None:
    published = RECORD.with_phase("published")
    assert published.phase == "published"
    assert attrs.evolve(published, phase="publishing") == RECORD
    slot = RECORD.slot(XvolsLayout("/var/lib/dynamic"))
    assert slot.path == PurePosixPath(f"/var/lib/dynamic/xvols/s3-sample/{SLOT_UUID}/{POD_UID}")


def test_unknown_keys_are_ignored() -> None:
    assert VolumeRecord.from_json(document(added_later="x")) == RECORD


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("", "<document>", "not valid JSON"),
        ("{", "<document>", "not valid JSON"),
        (b"\xff\xfe", "<document>", "not valid JSON"),
        ("[]", "<document>", "must be a JSON object"),
        ("null", "<document>", "must be a JSON object"),
        (document(version=None), "version", "not supported"),
        (document(version=2), "version", "not supported"),
        (document(version="1"), "version", "not supported"),
        (document(version=True), "version", "not supported"),
        (document(pod_uid=None), "pod_uid", "is required"),
        (document(pod_uid="NOT-A-UUID"), "pod_uid", "lowercase UUID"),
        (document(slot_uuid=7), "slot_uuid", "lowercase UUID"),
        (document(volume_id="../x"), "volume_id", "must not contain '/'"),
        (document(class_name="S3"), "class_name", "DNS-1123"),
        (document(policy="per-node"), "policy", "must be one of"),
        (document(phase="done"), "phase", "must be one of"),
        (document(read_only="yes"), "read_only", "true or false"),
        (document(pod_name=""), "pod_name", "non-empty"),
        (document(target_path="relative/path"), "target_path", "absolute"),
        (document(target_path=["/x"]), "target_path", "must be a string"),
    ],
)
def test_malformed_input_is_rejected(text: str | bytes, field: str, message: str) -> None:
    with pytest.raises(InvalidObject, match=message) as caught:
        VolumeRecord.from_json(text)
    assert field in caught.value.paths
    assert "VolumeRecord is invalid" in str(caught.value)


def test_every_problem_is_listed() -> None:
    with pytest.raises(InvalidObject) as caught:
        VolumeRecord.from_json(document(pod_uid="x", policy=None, read_only=1))
    assert set(caught.value.paths) == {"pod_uid", "policy", "read_only"}


def test_constructor_validates() -> None:
    with pytest.raises(InvalidObject, match="slot_uuid"):
        attrs.evolve(RECORD, slot_uuid="../../etc")
    with pytest.raises(InvalidObject, match="target_path"):
        attrs.evolve(RECORD, target_path=PurePosixPath("/a/../b"))


records = st.builds(
    VolumeRecord,
    volume_id=st.from_regex(r"[A-Za-z0-9][-A-Za-z0-9_.: ]{0,60}", fullmatch=True),
    pod_uid=st.uuids().map(str),
    pod_name=st.text(min_size=1, max_size=20),
    pod_namespace=st.text(min_size=1, max_size=20),
    class_name=st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,10}[a-z0-9])?", fullmatch=True).filter(
        lambda name: ".." not in name and ".-" not in name and "-." not in name
    ),
    policy=st.sampled_from(["independent", "shared"]),
    slot_uuid=st.uuids().map(str),
    target_path=st.lists(st.text(min_size=1, max_size=8).filter(lambda p: "/" not in p), max_size=4)
    .map(lambda parts: PurePosixPath("/", *parts))
    .filter(lambda path: ".." not in path.parts),
    read_only=st.booleans(),
    phase=st.sampled_from(["publishing", "published", "unpublishing"]),
)


@given(record=records)
@settings(max_examples=50)
def test_round_trip_property(record: VolumeRecord) -> None:
    assert VolumeRecord.from_json(record.to_json()) == record
