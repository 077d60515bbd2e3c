"""The single node's control plane (dynvol.testing.cluster.single) from its own files.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler, started from the
specs and the certificates, kubeconfigs and ServiceAccount key that ``hack/local-cluster
up`` writes (everything on free ports of 127.0.0.1, in a temporary directory; no node):
each identity authenticates as who it should be, and the controller-manager signs
ServiceAccount tokens with the key the apiserver checks them with.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynvol.testing import Process, default_bin_dir, free_port, wait_until
from dynvol.testing.cluster import single

pytestmark = pytest.mark.integration

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[single.SingleNodeLayout]:
    bin_dir = default_bin_dir()
    missing = [b for b in (*CONTROL_PLANE, "kubectl") if not (bin_dir / b).exists()]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} in {bin_dir} (make tools)")
    layout = single.SingleNodeLayout(tmp_path / "cluster")
    layout.logs.mkdir(parents=True)
    single.write_pki(layout)
    ports = {name: free_port() for name in single.PORT_NAMES}
    single.write_node_files(layout, ports)
    specs = [s for s in single.process_specs(layout, ports, bin_dir) if s.name in CONTROL_PLANE]
    started: list[Process] = []
    try:
        for spec in specs:
            proc = Process.start(spec.argv, name=spec.name, log=layout.logs / f"{spec.name}.log")
            started.append(proc)
            wait_until(spec.ready, timeout=spec.timeout, interval=0.2, what=spec.name, alive=proc)
        yield layout
    finally:
        for proc in reversed(started):
            proc.stop(timeout=20)


def _kubectl(kubeconfig: Path, *args: str) -> str:
    argv = [str(default_bin_dir() / "kubectl"), "--kubeconfig", str(kubeconfig), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _whoami(kubeconfig: Path) -> dict[str, object]:
    review = json.loads(_kubectl(kubeconfig, "auth", "whoami", "-o", "json"))
    info: dict[str, object] = review["status"]["userInfo"]
    return info


def test_each_identity_and_the_service_account_key(
    control_plane: single.SingleNodeLayout,
) -> None:
    layout = control_plane
    admin = _whoami(layout.kubeconfig)
    assert admin["username"] == "dynvol-admin"
    assert "system:masters" in admin["groups"]  # type: ignore[operator]
    kubelet = _whoami(layout.kubeconfig_for("kubelet"))
    assert kubelet["username"] == f"system:node:{single.NODE_NAME}"
    assert "system:nodes" in kubelet["groups"]  # type: ignore[operator]
    for component in ("kube-controller-manager", "kube-scheduler"):
        assert _whoami(layout.kubeconfig_for(component))["username"] == (f"system:{component}")

    # The controller-manager makes the default ServiceAccount; a token for it, issued by
    # the apiserver with sa.key, authenticates as that account.
    wait_until(
        lambda: (
            subprocess.run(
                [str(default_bin_dir() / "kubectl"), "--kubeconfig", str(layout.kubeconfig),
                 "get", "serviceaccount", "default"],
                capture_output=True, timeout=30, check=False,
            ).returncode == 0
        ),
        timeout=60, interval=0.3, what="the default ServiceAccount",
    )  # fmt: skip
    token = _kubectl(layout.kubeconfig, "create", "token", "default").strip()
    admin_config = json.loads(layout.kubeconfig.read_text())
    admin_config["users"] = [{"name": "sa", "user": {"token": token}}]
    admin_config["contexts"][0]["context"]["user"] = "sa"
    with_token = layout.dir / "token.kubeconfig"
    with_token.write_text(json.dumps(admin_config))
    assert _whoami(with_token)["username"] == "system:serviceaccount:default:default"
