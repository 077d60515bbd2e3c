"""The node reconciler's settings: one checked value, built from flags or flat names."""

from __future__ import annotations

import pytest

from dynvol.cli import main
from dynvol_controllers import DmpTemplate, NodeReconcilerSettings
from dynvol_core import constants as c


def test_defaults_are_the_shipped_ones() -> None:
    settings = NodeReconcilerSettings()
    assert settings.system_namespace == c.DEFAULT_SYSTEM_NAMESPACE
    assert settings.dmp.priority_class == "dynvol-mount"
    assert settings.dmp.service_account == c.DEFAULT_DMP_SERVICE_ACCOUNT
    assert settings.dmp.image_pull_secrets == ()
    assert settings.dmp.delete_grace is None
    assert settings.mounts_relist == 300.0


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_the_mounts_relist_must_be_a_positive_period(value: float) -> None:
    with pytest.raises(ValueError, match="--mounts-relist: must be a positive number"):
        NodeReconcilerSettings(mounts_relist=value)


def test_flat_names_reach_the_dmp_template_and_the_reconciler() -> None:
    settings = NodeReconcilerSettings.of(
        dmp_delete_grace=0,
        dmp_image_pull_secrets=["a", "b"],
        shared_idle_grace=1.5,
        sync_timeout=300,
    )
    assert settings.dmp == DmpTemplate(delete_grace=0, image_pull_secrets=("a", "b"))
    assert settings.shared_idle_grace == 1.5
    assert settings.sync_timeout == 300
    with pytest.raises(TypeError, match="unknown node reconciler setting 'dmp_imgae'"):
        NodeReconcilerSettings.of(dmp_imgae="x")


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"priority_class": "Not_A_Name"}, "--dmp-priority-class"),
        ({"image_pull_secrets": ("ok", "bad name")}, "--dmp-image-pull-secret"),
        ({"service_account": ""}, "--dmp-service-account"),
        ({"image_pull_policy": "Sometimes"}, "--dmp-image-pull-policy"),
        ({"delete_grace": -1}, "delete grace"),
    ],
)
def test_bad_dmp_settings_are_refused_naming_the_flag(fields: dict[str, object], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        DmpTemplate(**fields)  # type: ignore[arg-type]


def test_bad_system_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="--system-namespace"):
        NodeReconcilerSettings(system_namespace="Upper/Case")


def test_dynvol_node_refuses_a_bad_pull_secret_before_starting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(
        [
            "node",
            "--endpoint=unix:///tmp/dynvol-test-never.sock",
            "--node-id=n1",
            "--dmp-image=registry.invalid/dynvol:1",
            "--dmp-image-pull-secret=Bad_Secret",
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "--dmp-image-pull-secret" in err
    assert "Bad_Secret" in err
