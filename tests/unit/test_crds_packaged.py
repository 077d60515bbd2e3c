"""The CRDs ship in the package (``dynvol/crds``); kustomize's copies are derived from them.

``dynvol/crds`` is the source: the wheel carries it (tests/integration/test_wheel.py checks
the installed files) and the test control plane applies it. ``manifests/base/crds`` holds a
copy of each file for kustomize, with a header naming its source, written by
``hack/gen-crd-config-blocks.py``; these tests fail while a copy differs from its source or
a CRD is in one place only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynvol.crds import CRD_FILES, crd_dir, crd_files
from dynvol_core import constants as c
from tests.unit.crd_generator import check_generated_crds

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "dynvol" / "crds"
COPIES = ROOT / "manifests" / "base" / "crds"


def test_the_package_serves_the_source_files() -> None:
    assert crd_dir().resolve() == SOURCE.resolve()
    assert [p.name for p in crd_files()] == list(CRD_FILES)
    assert {p.name for p in SOURCE.glob("*.yaml")} == set(CRD_FILES)


@pytest.mark.parametrize("name", CRD_FILES)
def test_each_crd_is_one_of_dynvols_kinds(name: str) -> None:
    crd = yaml.safe_load((SOURCE / name).read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == c.GROUP
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{c.GROUP}"
    assert name == f"{crd['spec']['names']['plural']}.yaml"


@pytest.mark.parametrize("name", CRD_FILES)
def test_the_kustomize_copy_is_the_source_behind_a_header(name: str) -> None:
    copy = (COPIES / name).read_text()
    header, _, body = copy.partition("\n")
    assert header == (
        f"# Generated from dynvol/crds/{name} by hack/gen-crd-config-blocks.py: edit that file."
    )
    assert body == (SOURCE / name).read_text(), (
        f"manifests/base/crds/{name} differs from dynvol/crds/{name}: edit dynvol/crds/{name} "
        "(the source) and run hack/gen-crd-config-blocks.py"
    )


def test_kustomize_lists_exactly_the_packaged_crds() -> None:
    kustomization = yaml.safe_load((COPIES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(CRD_FILES)
    assert {p.name for p in COPIES.glob("*.yaml")} == {*CRD_FILES, "kustomization.yaml"}


def test_the_generator_finds_the_copies_current() -> None:
    result = check_generated_crds()
    assert result.returncode == 0, result.stderr
