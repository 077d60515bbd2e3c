#!/usr/bin/env python3
"""Write charts/dynvol/crds/ from the CRDs of ``kubectl kustomize manifests/base``.

Helm installs the files of a chart's ``crds/`` directory as they are (never templated), so
they are copies of the base's CRDs with the labels the base's kustomization adds. This
script makes those copies (``make chart-crds``); tests/integration/test_helm_chart.py
fails while they differ from the base.

    charts/sync-crds.py [--kubectl PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

TOP = Path(__file__).resolve().parent.parent
CRDS = TOP / "charts" / "dynvol" / "crds"
HEADER = (
    "# Written by charts/sync-crds.py (make chart-crds) from manifests/base/crds with the\n"
    "# base's labels; edit the base and run it again, never this file.\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", default=str(TOP / ".tools" / "bin" / "kubectl"))
    args = parser.parse_args()
    rendered = subprocess.run(
        [args.kubectl, "kustomize", str(TOP / "manifests" / "base")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    crds = [
        doc
        for doc in yaml.safe_load_all(rendered)
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
    if not crds:
        print("sync-crds: the base renders no CustomResourceDefinition", file=sys.stderr)
        return 1
    CRDS.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for crd in crds:
        path = CRDS / f"{crd['spec']['names']['plural']}.yaml"
        wanted.add(path)
        path.write_text(HEADER + yaml.safe_dump(crd, sort_keys=False, width=1000))
    for stale in set(CRDS.glob("*.yaml")) - wanted:
        stale.unlink()
    print(f"sync-crds: wrote {len(crds)} CRDs into {CRDS.relative_to(TOP)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
