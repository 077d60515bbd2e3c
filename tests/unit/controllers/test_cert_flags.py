"""``dynvol controller``: which webhook certificate flags go together (checked before any
connection is made)."""

from __future__ import annotations

import pytest

from dynvol.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--webhook-cert-management=self", "--tls-cert=/c", "--tls-key=/k"],
            "--tls-cert and --dev-certs need --webhook-cert-management=external",
        ),
        (
            ["--webhook-cert-management=self", "--dev-certs=/d"],
            "--tls-cert and --dev-certs need --webhook-cert-management=external",
        ),
        (["--webhook-cert-management=external"], "external needs --tls-cert/--tls-key"),
    ],
)
def test_conflicting_certificate_flags_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["controller", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_management_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["controller", "--webhook-cert-management=cert-manager"])
    assert exited.value.code == 2
    assert "--webhook-cert-management" in capsys.readouterr().err
