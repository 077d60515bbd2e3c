"""dynvol's CustomResourceDefinitions, shipped inside the package.

These files are the source of the four CRDs (StorageProviderClass, DynamicVolumeClaim,
DynamicVolumeMount, DynamicVolumeClaimSlice). ``manifests/base/crds/`` holds copies for
kustomize, which loads no file outside its own directory; ``hack/gen-crd-config-blocks.py``
writes them (and the providers' config blocks into the claim CRD), and a unit test fails
while they differ.

Other controllers and test suites get the files from an installed dynvol with
:func:`crd_files` (or apply the directory of :func:`crd_dir`); the test control plane
(:class:`dynvol.testing.ControlPlane`) applies them from here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["CRD_FILES", "crd_dir", "crd_files"]

#: The CRD files, in the order they are applied (classes, claims, mounts, claim slices).
CRD_FILES = (
    "storageproviderclasses.yaml",
    "dynamicvolumeclaims.yaml",
    "dynamicvolumemounts.yaml",
    "dynamicvolumeclaimslices.yaml",
)


def crd_dir() -> Path:
    """The directory of the CRD files in the installed package.

    Raises :class:`RuntimeError` if the package is not installed as plain files (a zip
    import), because kubectl needs paths.
    """
    root = resources.files(__name__)
    path = Path(str(root))
    if not (path / CRD_FILES[0]).is_file():
        raise RuntimeError(
            f"dynvol's CRDs are not plain files under {root}: install dynvol unzipped"
        )
    return path


def crd_files() -> tuple[Path, ...]:
    """The paths of the CRD files, in the order they are applied."""
    directory = crd_dir()
    return tuple(directory / name for name in CRD_FILES)
