"""``kubectl dynvol`` (the console script ``kubectl-dynvol``) against a real kube-apiserver.

The objects are written as dynvol's processes write them: claims with the status the
controller aggregates, DynamicVolumeMounts with the spec the node plugin writes and the
status the DMP reports, DMP pods in a system namespace, node plugin pods, CSINode entries
as kubelet records a registered driver. ``doctor`` talks to the real webhook server of
the controller (in this process, with a development CA) through the configuration
registered with the apiserver. Every command runs as a subprocess through the installed
console script and the kubeconfig, as a user runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynvol.kubectl import x509
from dynvol.kubectl.kubeconfig import KubeconfigError, Target, resolve
from dynvol.kubectl.reading import CSIDRIVERS, CSINODES, DAEMONSETS, DEPLOYMENTS
from dynvol.kubectl.tables import age, render
from dynvol.testing import ControlPlane, free_port
from dynvol_controllers import ControllerApp, ensure_dev_certs, register_webhooks
from dynvol_controllers.admission import OptIn, injected_mount, injected_volume
from dynvol_core import constants as c
from dynvol_kube import APIError, APINotFound, Client
from dynvol_kube.resources import (
    CLAIMS,
    MOUNTS,
    MUTATING_WEBHOOKS,
    NAMESPACES,
    NODES,
    PODS,
    VALIDATING_WEBHOOKS,
)
from dynvol_providers.registry import load_registry

pytestmark = pytest.mark.integration

PLUGIN = Path(sys.executable).parent / "kubectl-dynvol"
TOP = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client(kube_client: Any) -> Client:
    return Client.wrap(kube_client)


async def run_plugin(control_plane: ControlPlane, *args: str, kubeconfig: Path | None = None):  # type: ignore[no-untyped-def]
    """``kubectl-dynvol --kubeconfig K ARGS``: (exit status, stdout, stderr)."""
    assert PLUGIN.exists(), f"{PLUGIN} is missing: reinstall the package (make setup)"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = await asyncio.create_subprocess_exec(
        str(PLUGIN), "--kubeconfig", str(kubeconfig or control_plane.kubeconfig), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def system_namespace(client: Client) -> AsyncIterator[str]:
    """A system namespace of this test's own (DMPs, node plugin pods, workloads)."""
    name = f"sys-{secrets.token_hex(4)}"
    await client.create(NAMESPACES, {"metadata": {"name": name}})
    try:
        yield name
    finally:
        await client.delete(NAMESPACES, name)


def workload_pod(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod as the webhook leaves it: opted in, with the injected volume and mount."""
    opt_in = OptIn("s3-sample", "/dynamic", c.POLICY_INDEPENDENT)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample",
                c.ANNOTATION_MOUNT_PATH_ROOT: "/dynamic",
            },
        },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "volumes": [injected_volume(opt_in)],
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "volumeMounts": [injected_mount(opt_in)],
                }
            ],
        },
    }


async def set_ready(client: Client, pod: dict[str, Any], *, ready: bool = True) -> None:
    """Pod status as kubelet writes it (there is no kubelet here)."""
    meta = pod["metadata"]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}
        ],
        "containerStatuses": [
            {"name": pod["spec"]["containers"][0]["name"], "ready": ready, "restartCount": 2,
             "image": "x", "imageID": "", "state": {"running": {"startedAt": now}}}
        ],
    }  # fmt: skip
    await client.patch(
        PODS, meta["name"], {"status": status}, namespace=meta["namespace"], subresource="status"
    )


async def make_claim(client: Client, ns: str, name: str, selector: dict[str, str]) -> Any:
    claim = await client.create(
        CLAIMS,
        {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_CLAIM,
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "storageProvider": "s3",
                "mountpoint": "/data",
                "selector": {"matchLabels": selector},
                "s3Config": {"bucket": "bucket-b", "endpoint": "http://127.0.0.1:9"},
            },
        },
        namespace=ns,
    )
    return claim


async def make_mount(
    client: Client,
    claim: dict[str, Any],
    pod: dict[str, Any],
    dmp: str,
    *,
    phase: str,
    message: str,
) -> None:
    """A DynamicVolumeMount as the node plugin writes it, with the status of its DMP."""
    ns, pod_uid = pod["metadata"]["namespace"], pod["metadata"]["uid"]
    name = f"{claim['metadata']['name']}-{pod['metadata']['name']}"
    node = pod["spec"]["nodeName"]
    await client.create(
        MOUNTS,
        {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_MOUNT,
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {c.LABEL_POD_UID: pod_uid, c.LABEL_NODE: node},
            },
            "spec": {
                "claimName": claim["metadata"]["name"],
                "claimUID": claim["metadata"]["uid"],
                "podName": pod["metadata"]["name"],
                "podUID": pod_uid,
                "nodeName": node,
                "dmpName": dmp,
                "provider": "s3",
                "storageProviderClass": "s3-sample",
                "mountpoint": "/data",
                "slotPath": f"/var/lib/dynamic/xvols/s3-sample/u/{pod_uid}",
                "dmpTargetPath": "/xvols/data",
                "config": {"bucket": "bucket-b"},
                "readOnly": True,
            },
        },
        namespace=ns,
    )
    ready = "True" if phase == "Mounted" else "False"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "phase": phase,
        "message": message,
        "repairCount": 1 if phase == "Mounted" else 0,
        "conditions": [
            {"type": "Ready", "status": ready, "reason": "Mounted" if ready == "True" else
             "MountFailed", "message": message, "lastTransitionTime": now}
        ],
    }  # fmt: skip
    await client.patch(MOUNTS, name, {"status": status}, namespace=ns, subresource="status")


@pytest.fixture
async def mounted(client: Client, namespace: str) -> AsyncIterator[dict[str, Any]]:
    """Two pods on two nodes, a claim mounted in one and failed in the other (with a
    message holding a newline), and a claim that matches nothing."""
    async with system_namespace(client) as system:
        pods = []
        for name, node in (("web-a", "node-a"), ("web-b", "node-b")):
            pods.append(
                await client.create(
                    PODS, workload_pod(name, node, {"app": "web"}), namespace=namespace
                )
            )
        claim = await make_claim(client, namespace, "data", {"app": "web"})
        await make_claim(client, namespace, "idle", {"app": "nothing"})
        ready = {
            "type": "Ready", "status": "False", "reason": "MountFailed",
            "message": "1 of 2 mounts failed", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }  # fmt: skip
        counts = {"matchedPods": 2, "mountedPods": 1, "failedPods": 1, "conditions": [ready]}
        await client.patch(
            CLAIMS, "data", {"status": counts}, namespace=namespace, subresource="status"
        )
        dmps = {}
        for pod in pods:
            dmp_name = f"dmp-{pod['metadata']['name']}"
            dmp = await client.create(
                PODS,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": dmp_name, "labels": {c.LABEL_COMPONENT: c.COMPONENT_DMP}},
                    "spec": {
                        "nodeName": pod["spec"]["nodeName"],
                        "containers": [{"name": "dmp", "image": "registry.invalid/dynvol:1"}],
                    },
                },
                namespace=system,
            )
            dmps[pod["metadata"]["name"]] = dmp
        await set_ready(client, dmps["web-a"])
        await make_mount(client, claim, pods[0], "dmp-web-a", phase="Mounted", message="mounted")
        await make_mount(
            client, claim, pods[1], "dmp-web-b", phase="Failed",
            message="bucket bucket-b:\nNoSuchBucket",
        )  # fmt: skip
        try:
            yield {"namespace": namespace, "system": system}
        finally:
            for item in (await client.list(MOUNTS, namespace=namespace))["items"]:
                with contextlib.suppress(APINotFound):
                    await client.delete(MOUNTS, item["metadata"]["name"], namespace=namespace)
            for name in ("data", "idle"):
                with contextlib.suppress(APINotFound):
                    await client.delete(CLAIMS, name, namespace=namespace)
            for ns in (namespace, system):
                for item in (await client.list(PODS, namespace=ns))["items"]:
                    with contextlib.suppress(APINotFound):
                        await client.delete(
                            PODS, item["metadata"]["name"], namespace=ns, grace_seconds=0
                        )


# --------------------------------------------------------------------------- status


def rows(table: str) -> list[list[str]]:
    """A kubectl-style table's rows, split on runs of 3+ spaces (cells hold single ones)."""
    import re

    return [re.split(r"\s{3,}", line.strip()) for line in table.strip().splitlines()]


async def test_status_shows_each_claim_per_node_and_pod(
    control_plane: ControlPlane, mounted: dict[str, Any]
) -> None:
    ns = mounted["namespace"]
    code, out, err = await run_plugin(control_plane, "status", "-n", ns)
    assert code == 0, err
    print(out)
    table = rows(out)
    assert table[0] == [
        "CLAIM",
        "READY",
        "MOUNTED",
        "NODE",
        "POD",
        "PHASE",
        "DMP",
        "AGE",
        "MESSAGE",
    ]
    by_pod = {r[4]: r for r in table[1:] if r[0] == "data"}
    assert by_pod["web-a"][:7] == [
        "data",
        "False",
        "1/2",
        "node-a",
        "web-a",
        "Mounted",
        "dmp-web-a",
    ]
    assert by_pod["web-b"][:7] == ["data", "False", "1/2", "node-b", "web-b", "Failed", "dmp-web-b"]
    # A message with a newline stays on its row.
    assert by_pod["web-b"][-1] == "bucket bucket-b: NoSuchBucket"
    (idle,) = [r for r in table[1:] if r[0] == "idle"]
    assert idle[1:7] == ["Unknown", "0/0", "<none>", "<none>", "<none>", "<none>"]
    assert len(table) == 4


async def test_status_all_namespaces_and_machine_output(
    control_plane: ControlPlane, mounted: dict[str, Any]
) -> None:
    ns = mounted["namespace"]
    code, out, err = await run_plugin(control_plane, "status", "-A")
    assert code == 0, err
    table = rows(out)
    assert table[0][0] == "NAMESPACE"
    assert sum(1 for r in table[1:] if r[0] == ns) == 3
    code, out, err = await run_plugin(control_plane, "status", "-n", ns, "-o", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "DynvolStatus"
    (data,) = [cl for cl in report["claims"] if cl["name"] == "data"]
    assert data["ready"]["reason"] == "MountFailed"
    assert [(m["node"], m["pod"], m["phase"]) for m in data["mounts"]] == [
        ("node-a", "web-a", "Mounted"),
        ("node-b", "web-b", "Failed"),
    ]
    # -o yaml is the same report, and options may come before the subcommand.
    code, out, err = await run_plugin(control_plane, "-o", "yaml", "-n", ns, "status")
    assert code == 0, err
    assert yaml.safe_load(out) == report


async def test_status_uses_the_contexts_namespace(
    control_plane: ControlPlane, mounted: dict[str, Any], tmp_path: Path
) -> None:
    config = json.loads(control_plane.kubeconfig.read_text())
    for entry in config["contexts"]:
        entry["context"]["namespace"] = mounted["namespace"]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    code, out, err = await run_plugin(control_plane, "status", "-o", "json", kubeconfig=kubeconfig)
    assert code == 0, err
    assert {cl["name"] for cl in json.loads(out)["claims"]} == {"data", "idle"}
    # The default namespace of the plain kubeconfig has no claims.
    code, out, err = await run_plugin(control_plane, "status", "-n", "default")
    assert code == 0, err
    assert out == "No DynamicVolumeClaims found in default namespace.\n"


async def test_a_missing_context_or_pod_is_a_clear_error(
    control_plane: ControlPlane, mounted: dict[str, Any]
) -> None:
    code, _, err = await run_plugin(control_plane, "--context", "nope", "status")
    assert code == 2
    assert "context 'nope' is not in the kubeconfig" in err
    code, _, err = await run_plugin(control_plane, "pod", "ghost", "-n", mounted["namespace"])
    assert code == 2
    assert f'error: pod "ghost" not found in namespace "{mounted["namespace"]}"' in err
    code, _, err = await run_plugin(control_plane, "doctor", "-A")
    assert code == 2
    assert "-A/--all-namespaces applies to status" in err


# --------------------------------------------------------------------------- pod


async def test_pod_shows_what_is_mounted_where_and_its_dmp(
    control_plane: ControlPlane, mounted: dict[str, Any]
) -> None:
    ns, system = mounted["namespace"], mounted["system"]
    code, out, err = await run_plugin(
        control_plane, "pod", "web-a", "-n", ns, "--system-namespace", system
    )
    assert code == 0, err
    print(out)
    head, _, table = out.partition("\n\n")
    assert f"Pod:         {ns}/web-a" in head
    assert "Class:       s3-sample (independent)" in head
    assert "Volume:      injected" in head
    (header, row) = rows(table)
    assert header[:8] == [
        "PATH",
        "CLAIM",
        "PROVIDER",
        "MODE",
        "PHASE",
        "HEALTH",
        "DMP",
        "DMP STATUS",
    ]
    assert row[:8] == [
        "/dynamic/data", "data", "s3", "ro", "Mounted", "Ready (1 repairs)", "dmp-web-a",
        "Running, 2 restarts",
    ]  # fmt: skip
    # The other pod's DMP is not ready (no kubelet made it run) and its mount failed.
    code, out, err = await run_plugin(
        control_plane, "pod", "web-b", "-n", ns, "--system-namespace", system, "-o", "json"
    )
    assert code == 0, err
    report = json.loads(out)
    (mount,) = report["mounts"]
    assert (mount["path"], mount["phase"], mount["ready"]["reason"]) == (
        "/dynamic/data", "Failed", "MountFailed",
    )  # fmt: skip
    assert mount["dmp"] == {
        "name": "dmp-web-b", "exists": True, "phase": "Pending", "ready": False, "restarts": 0,
        "node": "node-b",
    }  # fmt: skip


# --------------------------------------------------------------------------- doctor


@pytest.fixture
async def installed(
    client: Client, control_plane: ControlPlane, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    """dynvol as the doctor expects to find it: CSIDriver, node plugin DaemonSet and its
    pods on two nodes (kubelet registered the driver on node-1 only), the controller's
    Deployment, and the real webhook server registered with a CA that expires in 10 days."""
    token = secrets.token_hex(3)
    nodes = [f"doctor-{token}-1", f"doctor-{token}-2"]
    made: list[tuple[Any, str, str | None]] = []
    async with system_namespace(client) as system:
        rendered = yaml.safe_load((TOP / "manifests/base/csidriver.yaml").read_text())
        with contextlib.suppress(APIError):
            await client.create(CSIDRIVERS, rendered)
        for node in nodes:
            await client.create(NODES, {"metadata": {"name": node}})
            made.append((NODES, node, None))
            await client.patch(
                NODES, node, subresource="status",
                patch={"status": {"conditions": [{"type": "Ready", "status": "True",
                       "reason": "KubeletReady", "message": "ready",
                       "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                       "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                       "nodeInfo": {"kubeletVersion": "v1.37.2", "machineID": "", "systemUUID": "",
                                    "bootID": "", "kernelVersion": "", "osImage": "",
                                    "containerRuntimeVersion": "", "kubeProxyVersion": "",
                                    "operatingSystem": "linux", "architecture": "amd64"}}},
            )  # fmt: skip
            pod = await client.create(
                PODS,
                {
                    "metadata": {
                        "name": f"dynvol-node-{node}",
                        "labels": {c.LABEL_COMPONENT: "node", "app.kubernetes.io/name": "dynvol"},
                    },
                    "spec": {
                        "nodeName": node,
                        "containers": [{"name": "node", "image": "ghcr.io/dynvol/dynvol:0.1.0"}],
                    },
                },
                namespace=system,
            )
            await set_ready(client, pod)
        await client.create(CSINODES, {
            "metadata": {"name": nodes[0]},
            "spec": {"drivers": [{"name": c.DRIVER_NAME, "nodeID": nodes[0]}]},
        })  # fmt: skip
        made.append((CSINODES, nodes[0], None))
        for resource, name in ((DAEMONSETS, "dynvol-node"), (DEPLOYMENTS, "dynvol-controller")):
            labels = {"app.kubernetes.io/name": "dynvol", "app.kubernetes.io/component": name}
            spec: dict[str, Any] = {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "ghcr.io/dynvol/dynvol:0.1.0"}]},
                },
            }
            await client.create(
                resource, {"metadata": {"name": name}, "spec": spec}, namespace=system
            )
        await client.patch(
            DEPLOYMENTS, "dynvol-controller", namespace=system, subresource="status",
            patch={"status": {"replicas": 1, "readyReplicas": 1}},
        )  # fmt: skip
        certs = ensure_dev_certs(tmp_path / "certs", days=10)
        app = ControllerApp(
            client=client, tls_cert=str(certs.cert), tls_key=str(certs.key),
            webhook_port=free_port(), lease_name=f"dynvol-doctor-{token}",
            lease_namespace=system, lease_duration=3, renew_deadline=2, retry_period=0.5,
            registry=load_registry(),
        )  # fmt: skip
        config_name = f"dynvol-doctor-{token}"
        await app.start()
        try:
            assert app.webhook is not None
            await register_webhooks(
                client, ca_bundle=certs.ca_bundle, url=app.webhook.url, name=config_name
            )
            yield {"system": system, "nodes": nodes, "app": app, "certs": certs,
                   "config": config_name}  # fmt: skip
        finally:
            for resource in (MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS):
                with contextlib.suppress(APIError):
                    await client.delete(resource, config_name)
            await app.close()
            for resource, name, ns in made:
                with contextlib.suppress(APINotFound):
                    await client.delete(resource, name, namespace=ns)
            for item in (await client.list(PODS, namespace=system))["items"]:
                with contextlib.suppress(APINotFound):
                    await client.delete(
                        PODS, item["metadata"]["name"], namespace=system, grace_seconds=0
                    )


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [k for k in report["checks"] if k["name"] == name]
    return found


async def test_doctor_checks_the_installation(
    client: Client, control_plane: ControlPlane, installed: dict[str, Any]
) -> None:
    system, (node1, node2) = installed["system"], installed["nodes"]
    args = ("doctor", "--system-namespace", system)
    code, out, err = await run_plugin(control_plane, *args)
    print(out)
    assert code == 1, err  # node 2 has no registered driver
    assert "node-plugin" in out
    code, out, err = await run_plugin(control_plane, *args, "-o", "json")
    report = json.loads(out)
    assert report["healthy"] is False
    assert check(report, "crds")["status"] == "ok"
    assert check(report, "csidriver")["status"] == "ok"
    assert check(report, "controller") == {
        "name": "controller", "status": "ok", "detail": "1/1 ready"
    }  # fmt: skip
    plugin = check(report, "node-plugin")
    assert plugin["status"] == "error"
    assert node2 in plugin["detail"]
    assert node1 not in plugin["detail"]
    rows_by_node = {n["node"]: n for n in plugin["nodes"]}
    assert rows_by_node[node1]["registered"] is True
    assert rows_by_node[node1]["podReady"] is True
    assert rows_by_node[node2]["registered"] is False
    assert rows_by_node[node2]["kubelet"] == "v1.37.2"
    # The webhook answers, and both certificates expire within the warning period.
    config = installed["config"]
    hook = check(report, f"webhook/{config} (mutating)")
    assert hook["status"] == "warning", hook
    assert f"{installed['app'].webhook.url}/healthz answers 200" in hook["detail"]
    ca_expiry = x509.not_after(x509.pem_certificates(installed["certs"].ca_cert.read_bytes())[0])
    assert f"CA expires {ca_expiry:%Y-%m-%dT%H:%M:%SZ} (in 9d)" in hook["detail"]
    assert "serving certificate expires" in hook["detail"]
    versions = check(report, "versions")["versions"]
    assert versions["apiserver"].startswith("v1.")
    assert versions["dynvol-node"] == "ghcr.io/dynvol/dynvol:0.1.0"

    # kubelet registers the driver on node 2: the node plugin is fine everywhere we made.
    await client.create(CSINODES, {
        "metadata": {"name": node2},
        "spec": {"drivers": [{"name": c.DRIVER_NAME, "nodeID": node2}]},
    })  # fmt: skip
    try:
        code, out, err = await run_plugin(control_plane, *args, "-o", "json")
        plugin = check(json.loads(out), "node-plugin")
        assert node2 not in plugin["detail"]
        others = [n for n in plugin["nodes"] if n["node"] not in (node1, node2)]
        if not others:  # nodes of other tests would be (rightly) reported too
            assert plugin["status"] == "ok", plugin
        # The webhook server stops: the doctor says it cannot connect.
        await installed["app"].close()
        code, out, err = await run_plugin(control_plane, *args, "-o", "json")
        assert code == 1
        hook = check(json.loads(out), f"webhook/{config} (validating)")
        assert hook["status"] == "error"
        assert "cannot connect to 127.0.0.1" in hook["detail"]
    finally:
        with contextlib.suppress(APINotFound):
            await client.delete(CSINODES, node2)


# --------------------------------------------------------------------------- pure parts


def test_certificate_expiry_matches_openssl(tmp_path: Path) -> None:
    certs = ensure_dev_certs(tmp_path / "certs", days=3)
    for path in (certs.ca_cert, certs.cert):
        (der,) = x509.pem_certificates(path.read_bytes())
        end = subprocess.run(
            ["openssl", "x509", "-enddate", "-noout", "-in", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout.strip().removeprefix("notAfter=")  # fmt: skip
        expected = dt.datetime.strptime(end, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.UTC)
        assert x509.not_after(der) == expected
    with pytest.raises(x509.CertificateError):
        x509.not_after(b"\x30\x03\x02\x01\x01")
    with pytest.raises(x509.CertificateError):
        x509.not_after(b"\x30\x84\xff\xff\xff\xff")


def test_tables_and_ages_read_like_kubectl() -> None:
    now = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)
    cases = {
        dt.timedelta(seconds=5): "5s",
        dt.timedelta(seconds=119): "119s",
        dt.timedelta(minutes=3, seconds=12): "3m12s",
        dt.timedelta(minutes=45): "45m",
        dt.timedelta(hours=5, minutes=7): "5h7m",
        dt.timedelta(hours=20): "20h",
        dt.timedelta(days=3, hours=4): "3d4h",
        dt.timedelta(days=40): "40d",
        dt.timedelta(days=800): "2y",
    }
    for delta, shown in cases.items():
        assert age(now - delta, now) == shown
    assert age("not a time", now) == "<none>"
    assert age("2026-12-01T11:59:00Z", now) == "60s"
    assert render(["a", "long header"], [["x\ty", None], ["", "z"]]) == (
        "A        LONG HEADER\nx y      <none>\n<none>   z\n"
    )


def test_the_kubeconfig_is_chosen_as_kubectl_chooses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text(json.dumps({"current-context": "two", "contexts": []}))
    second.write_text(json.dumps({"contexts": [{"name": "two", "context": {"namespace": "team"}}]}))
    missing = tmp_path / "missing"
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join(map(str, (missing, first, second))))
    # Missing $KUBECONFIG files are skipped; the current context may be named in one file
    # and defined in another; the file that defines it is the one the client reads.
    assert resolve(None, None, None) == Target(str(second), "two", "team")
    assert resolve(None, None, "other") == Target(str(second), "two", "other")
    with pytest.raises(KubeconfigError, match="context 'three' is not in the kubeconfig"):
        resolve(None, "three", None)
    # An explicit file must exist, and must be a kubeconfig.
    with pytest.raises(KubeconfigError, match="cannot read kubeconfig"):
        resolve(str(missing), None, None)
    first.write_text("- a list")
    with pytest.raises(KubeconfigError, match="is not a mapping"):
        resolve(str(first), None, None)


# --------------------------------------------------------------------------- upgrade-dmps

OLD, NEW = "registry.invalid/dynvol:1", "registry.invalid/dynvol:2"


def dmp_pod(name: str, node: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {c.LABEL_COMPONENT: c.COMPONENT_DMP, c.LABEL_MANAGED_BY: "dynvol"},
        },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "dmp", "image": image}],
        },
    }


def node_plugin_pod(node: str, image: str, args: list[str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"dynvol-node-{node}", "labels": {c.LABEL_COMPONENT: "node"}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "node", "image": image, "args": args or ["node"]}],
        },
    }


async def mounted_status(client: Client, ns: str, name: str, at: str) -> None:
    status = {"phase": "Mounted", "mountedAt": at, "repairCount": 0, "conditions": []}
    await client.patch(MOUNTS, name, {"status": status}, namespace=ns, subresource="status")


async def play_node(client: Client, system: str, ns: str, dmp: str, node: str) -> float:
    """What kubelet and the node plugin do when a DMP is deleted, with no kubelet here: the
    pod goes (its grace is kubelet's to end), the node plugin creates it again with its
    image, kubelet runs it, its agent mounts the DMP's mounts again (a new mountedAt).
    Returns when it had deleted the old pod (monotonic)."""
    while True:
        pod = await client.get(PODS, dmp, namespace=system)
        if pod["metadata"].get("deletionTimestamp"):
            break
        await asyncio.sleep(0.05)
    await client.delete(PODS, dmp, namespace=system, grace_seconds=0)
    gone = asyncio.get_running_loop().time()
    new = await client.create(PODS, dmp_pod(dmp, node, NEW), namespace=system)
    await set_ready(client, new)
    await asyncio.sleep(0.3)  # the agent's start and mount
    for item in (await client.list(MOUNTS, namespace=ns))["items"]:
        if item["spec"]["dmpName"] == dmp:
            await mounted_status(client, ns, item["metadata"]["name"], "2026-06-01T00:00:09Z")
    return gone


async def test_upgrade_dmps_moves_each_outdated_dmp_and_waits_for_its_mounts(
    control_plane: ControlPlane, client: Client, namespace: str
) -> None:
    async with system_namespace(client) as system:
        try:
            # node-a's plugin runs the new image; node-b's still the old one, and node-c's
            # plugin gives DMPs another image by flag; node-d's plugin is not running.
            for node, image, args in (
                ("node-a", NEW, None),
                ("node-b", OLD, None),
                ("node-c", OLD, ["node", "--dmp-image", NEW]),
            ):
                plugin = await client.create(
                    PODS, node_plugin_pod(node, image, args), namespace=system
                )
                await set_ready(client, plugin)
            await client.create(PODS, node_plugin_pod("node-d", NEW), namespace=system)
            dmps = {}
            for name, node, image in (
                ("dmp-a1", "node-a", OLD),  # outdated
                ("dmp-a2", "node-a", NEW),  # current
                ("dmp-b1", "node-b", OLD),  # current for node-b
                ("dmp-c1", "node-c", OLD),  # outdated: node-c's plugin says NEW by flag
                ("dmp-d1", "node-d", OLD),  # its plugin's image is unknown: left alone
            ):
                dmps[name] = await client.create(PODS, dmp_pod(name, node, image), namespace=system)
                await set_ready(client, dmps[name])
            pod = await client.create(
                PODS, workload_pod("app-a", "node-a", {"app": "a"}), namespace=namespace
            )
            claim = await make_claim(client, namespace, "data", {"app": "a"})
            await make_mount(client, claim, pod, "dmp-a1", phase="Mounted", message="mounted")
            await client.patch(
                MOUNTS, "data-app-a",
                {"metadata": {"labels": {c.LABEL_DMP: "dmp-a1"}}}, namespace=namespace,
            )  # fmt: skip
            await mounted_status(client, namespace, "data-app-a", "2026-06-01T00:00:00Z")

            code, out, err = await run_plugin(
                control_plane, "upgrade-dmps", "--dry-run", "-o", "json",
                "--system-namespace", system,
            )  # fmt: skip
            assert code == 0, err
            report = json.loads(out)
            assert [(d["name"], d["from"], d["to"]) for d in report["dmps"]] == [
                ("dmp-a1", OLD, NEW),
                ("dmp-c1", OLD, NEW),
            ]
            assert report["images"] == {"node-a": NEW, "node-b": OLD, "node-c": NEW}
            # A dry run moved nothing.
            still = await client.get(PODS, "dmp-a1", namespace=system)
            assert still["metadata"]["uid"] == dmps["dmp-a1"]["metadata"]["uid"]
            assert not still["metadata"].get("deletionTimestamp")

            # The real move of node-a's DMPs: the command deletes dmp-a1 and returns only
            # once the new pod runs the new image and the mount has a new mountedAt.
            node = asyncio.create_task(play_node(client, system, namespace, "dmp-a1", "node-a"))
            code, out, err = await run_plugin(
                control_plane, "upgrade-dmps", "--node", "node-a", "-o", "json",
                "--system-namespace", system,
            )  # fmt: skip
            await node
            assert code == 0, err
            (moved,) = json.loads(out)["dmps"]
            assert moved["name"] == "dmp-a1"
            assert moved["mounts"] == 1
            assert 0 < moved["running_after_s"] <= moved["mounted_after_s"]
            new = await client.get(PODS, "dmp-a1", namespace=system)
            assert new["spec"]["containers"][0]["image"] == NEW
            # node-c's outdated DMP was not touched (another node).
            other = await client.get(PODS, "dmp-c1", namespace=system)
            assert other["metadata"]["uid"] == dmps["dmp-c1"]["metadata"]["uid"]
            code, out, _ = await run_plugin(
                control_plane, "upgrade-dmps", "--dry-run", "--node", "node-a",
                "--system-namespace", system,
            )  # fmt: skip
            assert code == 0
            assert "nothing to move" in out

            # A DMP that does not come back in time: exit 1, its name in the message.
            code, out, err = await run_plugin(
                control_plane, "upgrade-dmps", "--node", "node-c", "--timeout", "2",
                "--system-namespace", system,
            )  # fmt: skip
            assert code == 1
            assert "dmp-c1 did not come back" in err
        finally:
            for ns in (namespace, system):
                for kind in (MOUNTS, CLAIMS):
                    if ns == system:
                        continue
                    for item in (await client.list(kind, namespace=ns))["items"]:
                        with contextlib.suppress(APINotFound):
                            await client.delete(kind, item["metadata"]["name"], namespace=ns)
                for item in (await client.list(PODS, namespace=ns))["items"]:
                    with contextlib.suppress(APINotFound):
                        await client.delete(
                            PODS, item["metadata"]["name"], namespace=ns, grace_seconds=0
                        )
