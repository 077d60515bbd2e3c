"""The kustomize manifests render, and agree with the code where both describe one thing.

Needs no cluster, only the pinned kubectl for its built-in kustomize.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from dynvol_controllers import webhook_configurations
from dynvol_core import constants as c
from tests.integration.shared import TOP, render_kustomize

pytestmark = pytest.mark.integration

OVERLAYS = ("local", "kind", "production")


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_base_webhooks_equal_the_code_apart_from_the_ca() -> None:
    docs = yaml.safe_load_all((TOP / "manifests/base/webhooks.yaml").read_text())
    on_disk = {d["kind"]: d for d in docs if d}
    mutating, validating = webhook_configurations(
        ca_bundle="",
        service={"namespace": c.DEFAULT_SYSTEM_NAMESPACE, "name": "dynvol-webhook", "port": 443},
    )
    for rendered in (mutating, validating):
        for hook in rendered["webhooks"]:
            del hook["clientConfig"]["caBundle"]
        assert on_disk[rendered["kind"]] == rendered


def _kind_expected() -> list[dict[str, object]]:
    """The base with only the image changed: what the kind overlay must render."""
    base = render_kustomize(TOP / "manifests/base")
    text = json.dumps(base).replace('"ghcr.io/dynvol/dynvol:0.1.0"', '"dynvol/dynvol:dev"')
    rendered: list[dict[str, object]] = json.loads(text)
    return rendered


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_one_node_plugin_and_controller(overlay: str) -> None:
    docs = render_kustomize(TOP / "manifests/overlays" / overlay)
    (daemonset,) = _by_kind(docs, "DaemonSet")
    (deployment,) = _by_kind(docs, "Deployment")
    (driver,) = _by_kind(docs, "CSIDriver")
    assert driver["metadata"]["name"] == c.DRIVER_NAME
    assert driver["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    assert driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["attachRequired"] is False
    (node,) = daemonset["spec"]["template"]["spec"]["containers"]
    propagation = {m["mountPath"]: m.get("mountPropagation") for m in node["volumeMounts"]}
    assert propagation["/var/lib/kubelet"] == "Bidirectional"
    assert propagation["/var/lib/dynamic"] == "Bidirectional"
    env = {e["name"]: e.get("value") for e in node["env"]}
    (controller,) = deployment["spec"]["template"]["spec"]["containers"]
    assert node["image"] == controller["image"]
    # The DMPs run the image the node plugin runs: its own, read from its Pod.
    assert "DYNVOL_IMAGE" not in env
    assert not any(a.startswith("--dmp-image=") for a in node["args"])
    assert {"POD_NAME", "POD_NAMESPACE"} <= set(env)
    assert {d["metadata"]["name"] for d in _by_kind(docs, "ServiceAccount")} == {
        "dynvol-node",
        "dynvol-controller",
        c.DEFAULT_DMP_SERVICE_ACCOUNT,
    }
    hooks = _by_kind(docs, "MutatingWebhookConfiguration")
    if overlay == "production":
        (hook,) = hooks
        annotation = hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert annotation == "dynvol-system/dynvol-webhook"
    elif overlay == "kind":
        # The base as it is: the controller keeps the certificate and the caBundle.
        (hook,) = hooks
        assert "--register-webhooks=https://127.0.0.1:9443" not in controller["args"]
        assert docs == _kind_expected()
    else:
        # The controller registers them itself with its development CA.
        assert hooks == []
        assert "--register-webhooks=https://127.0.0.1:9443" in controller["args"]
