"""Runs ``hack/gen-crd-config-blocks.py --check`` for the tests that need the generated
CRD files current (tests/unit/test_crds_packaged.py, tests/unit/providers/test_schemas.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def check_generated_crds() -> subprocess.CompletedProcess[str]:
    """The generator's ``--check`` run from the checkout (not checked: the caller looks)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "hack" / "gen-crd-config-blocks.py"), "--check"],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
