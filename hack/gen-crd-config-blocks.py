#!/usr/bin/env python3
"""Write the built-in providers' config schemas into the DynamicVolumeClaim CRD.

The providers own the rules of their claim blocks (``S3Provider.config_schema()`` and so on,
in dynvol_providers/builtin); the CRD carries exactly those fragments so that the apiserver
and ``kubectl explain`` see them. The CRDs' source is the package (``dynvol/crds``, shipped
in the wheel); ``manifests/base/crds`` holds copies for kustomize, which this script writes
too. Run after changing a provider's schema or a CRD in ``dynvol/crds``:

    .venv/bin/python hack/gen-crd-config-blocks.py           # rewrite the CRD and the copies
    .venv/bin/python hack/gen-crd-config-blocks.py --check   # exit 1 if either is stale

tests/unit/providers/test_schemas.py fails while the CRD differs from the providers, and
tests/unit/test_crds_packaged.py while a copy differs from its source.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from dynvol_core.models import TYPED_CONFIG_BLOCKS, config_block_for
from dynvol_providers.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
#: The CRDs' source, package data of ``dynvol``.
SOURCE = ROOT / "dynvol" / "crds"
CRD = SOURCE / "dynamicvolumeclaims.yaml"
#: kustomize's copies of every CRD in SOURCE.
COPIES = ROOT / "manifests" / "base" / "crds"
#: The indentation of the claim spec's properties in the CRD.
INDENT = " " * 16


def render(text: str) -> str:
    """``text`` (the CRD) with each typed block replaced by its provider's schema."""
    registry = load_registry()
    lines = text.splitlines(keepends=True)
    for name in registry:
        block = config_block_for(name)
        if block not in TYPED_CONFIG_BLOCKS:
            continue
        schema = registry.config_schema(name)
        if schema is None:
            raise SystemExit(f"provider {name!r} publishes no schema for {block}")
        start = lines.index(f"{INDENT}{block}:\n")
        end = start + 1
        while end < len(lines) and (lines[end].startswith(INDENT + " ") or not lines[end].strip()):
            end += 1
        dumped = yaml.safe_dump(dict(schema), sort_keys=False, width=90, allow_unicode=True)
        body = [f"{INDENT}  {line}\n" for line in dumped.splitlines()]
        lines[start + 1 : end] = body
    return "".join(lines)


def copy_text(source: Path, text: str) -> str:
    """The kustomize copy of ``source`` (whose content is ``text``): a header, then it."""
    rel = source.relative_to(ROOT)
    return f"# Generated from {rel} by hack/gen-crd-config-blocks.py: edit that file.\n{text}"


def main(argv: list[str]) -> int:
    current = CRD.read_text()
    wanted = render(current)
    sources = {path: path.read_text() for path in sorted(SOURCE.glob("*.yaml"))}
    sources[CRD] = wanted
    copies = {COPIES / path.name: copy_text(path, text) for path, text in sources.items()}
    if "--check" in argv:
        stale = [CRD] if wanted != current else []
        stale += [p for p, text in copies.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"{path} is stale: run hack/gen-crd-config-blocks.py", file=sys.stderr)
        return 1 if stale else 0
    CRD.write_text(wanted)
    for path, text in copies.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
