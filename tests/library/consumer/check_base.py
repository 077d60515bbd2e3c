"""What a library user gets from ``pip install dynvol`` alone, outside dynvol's checkout.

Run by tests/integration/test_wheel.py with a fresh virtualenv's python, from a directory
outside the checkout, before any extra is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import dynvol
from dynvol.crds import CRD_FILES, crd_files
from dynvol.testing import ControlPlane
from dynvol_core import DynamicVolumeClaim, InvalidObject, StorageProviderClass
from dynvol_providers import load_registry

CHECKOUT = Path(os.environ["DYNVOL_CHECKOUT"])


def test_dynvol_comes_from_the_virtualenv_not_the_checkout() -> None:
    here = Path(dynvol.__file__).resolve()
    assert here.is_relative_to(Path(sys.prefix).resolve()), here
    assert not here.is_relative_to(CHECKOUT.resolve()), here
    assert not Path.cwd().resolve().is_relative_to(CHECKOUT.resolve())


@pytest.mark.parametrize(
    "module", ["kubernetes_asyncio", "grpclib", "betterproto", "aiohttp", "yaml", "boto3"]
)
def test_the_base_install_brings_no_service_dependency(module: str) -> None:
    assert importlib.util.find_spec(module) is None, f"{module} came with the base install"


def test_the_seed_objects_parse_and_validate(
    seed_class: dict[str, Any], seed_claims: list[dict[str, Any]]
) -> None:
    spc = StorageProviderClass.from_object(seed_class)
    assert spc.provider == "s3"
    registry = load_registry()
    for raw in seed_claims:
        claim = DynamicVolumeClaim.from_object(raw)
        assert claim.mountpoint == "/data"
        assert claim.provider_config is not None
        config = registry.parse_claim_config(
            claim.provider_config,
            parameters=spc.provider_parameters,
            connection=spc.connection,
            class_name=spc.name,
        )
        assert config.bucket == raw["spec"]["s3Config"]["bucket"]
    assert claim.read_only


def test_a_bad_claim_is_refused_naming_the_field(seed_claims: list[dict[str, Any]]) -> None:
    bad = seed_claims[0]
    bad["spec"]["mountpoint"] = "/../etc"
    with pytest.raises(InvalidObject) as info:
        DynamicVolumeClaim.from_object(bad)
    assert [e.path for e in info.value.errors] == ["spec.mountpoint"]
    # The provider's own rules reach a library user through the registry.
    claim = DynamicVolumeClaim.from_object(seed_claims[1])
    spec = dict(claim.provider_config.to_object()) if claim.provider_config else {}
    assert spec


def test_the_crds_are_package_data() -> None:
    files = crd_files()
    assert [p.name for p in files] == list(CRD_FILES)
    for path in files:
        assert path.resolve().is_relative_to(Path(sys.prefix).resolve())
        assert "kind: CustomResourceDefinition" in path.read_text()


def _kubectl_json(plane: ControlPlane, *args: str) -> Any:
    return json.loads(plane.kubectl(*args, "-o", "json"))


def _apply(plane: ControlPlane, tmp_path: Path, obj: dict[str, Any]) -> None:
    path = tmp_path / f"{obj['kind']}-{obj['metadata']['name']}.json"
    path.write_text(json.dumps(obj))
    plane.kubectl("apply", "-f", str(path))


def test_the_control_plane_serves_dynvols_api_and_the_consumers(
    control_plane: ControlPlane,
    tmp_path: Path,
    seed_secret: dict[str, Any],
    seed_class: dict[str, Any],
    seed_claims: list[dict[str, Any]],
) -> None:
    """The control_plane fixture, from the installed package: dynvol's CRDs and the
    consumer's own (``dynvol_crds`` in pytest.ini), then the seed objects through it."""
    crds = {c["metadata"]["name"] for c in _kubectl_json(control_plane, "get", "crd")["items"]}
    assert {
        "storageproviderclasses.dynamicvolume.csi.cloudnative101.net",
        "dynamicvolumeclaims.dynamicvolume.csi.cloudnative101.net",
        "dynamicvolumemounts.dynamicvolume.csi.cloudnative101.net",
        "dynamicvolumeclaimslices.dynamicvolume.csi.cloudnative101.net",
        "widgets.consumer.example.com",
    } <= crds
    control_plane.kubectl("create", "namespace", "dynamic-volume-test")
    for obj in (seed_secret, seed_class, *seed_claims):
        _apply(control_plane, tmp_path, obj)
    stored = _kubectl_json(
        control_plane, "get", "dynamicvolumeclaims", "-n", "dynamic-volume-test"
    )["items"]
    assert [o["metadata"]["name"] for o in stored] == ["externalvolume-s3-sample"]
    claim = DynamicVolumeClaim.from_object(stored[0])
    assert claim.namespace == "dynamic-volume-test"
    assert claim.selector.selects({"app": "app-4-s3"})

    # The apiserver enforces the CRD's rules too: a bad mountpoint never gets stored.
    bad = seed_claims[0]
    bad["metadata"]["name"] = "bad-mountpoint"
    bad["spec"]["mountpoint"] = "/../etc"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RuntimeError, match=r"spec\.mountpoint"):
        control_plane.kubectl("apply", "-f", str(path))

    widget = {
        "apiVersion": "consumer.example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "namespace": "default"},
        "spec": {"size": 3},
    }
    _apply(control_plane, tmp_path, widget)
    assert _kubectl_json(control_plane, "get", "widget", "w")["spec"] == {"size": 3}


def _dynvol(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("dynvol")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_service_without_its_extra_says_what_to_install() -> None:
    listed = _dynvol("--help")
    assert listed.returncode == 0, listed.stderr
    for command in ("node", "controller", "dmp", "dev"):
        assert command in listed.stdout
    # node and dmp cannot even build their parsers; controller fails when it starts.
    for command, extra in (("node", "node"), ("controller", "controller"), ("dmp", "dmp")):
        done = _dynvol(command)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert f"pip install 'dynvol[{extra}]'" in done.stderr
