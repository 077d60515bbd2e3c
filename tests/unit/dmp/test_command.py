"""``dynvol dmp``'s command line: what it refuses before it starts anything."""

from __future__ import annotations

import pytest

from dynvol.cli import main


@pytest.mark.parametrize("namespace", ["../kube-system", "Upper", "a/b", ""])
def test_dynvol_dmp_refuses_a_mounts_namespace_that_is_no_namespace_name(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The namespace is a path segment of every watch the agent makes.
    status = main(
        ["dmp", "--name", "dmp-x", "--namespace", "dynvol-system", "--xvols", "/nonexistent",
         "--secrets-dir", "/nonexistent", "--mounts-namespace", namespace]
    )  # fmt: skip
    assert status == 2
    assert "--mounts-namespace" in capsys.readouterr().err
