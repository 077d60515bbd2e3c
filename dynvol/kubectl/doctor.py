"""``kubectl dynvol doctor``: is dynvol installed and working on this cluster?

Each check has a status, ``ok``, ``warning`` or ``error``, and a detail line:

- ``crds``: dynvol's four CustomResourceDefinitions exist and are Established.
- ``csidriver``: the CSIDriver object exists, for ephemeral volumes with pod info on mount.
- ``node-plugin``: the DaemonSet's pods are ready, and on every schedulable node a ready
  node plugin pod runs and kubelet lists the driver in the node's CSINode (it registered).
  The per-node rows say which node lacks what.
- ``controller``: the Deployment has a ready replica.
- ``webhook/<configuration>``: each webhook configuration of dynvol (its webhooks are
  named ``*.dynamicvolume.csi.cloudnative101.net``) has a caBundle whose CA has not expired,
  and its server answers ``/healthz``: directly over TLS, verified with that caBundle,
  when the configuration names a URL (the serving certificate's expiry is read then), and
  through the apiserver's service proxy when it names a Service.
- ``versions``: the apiserver, the dynvol image of each workload, this plugin.

A certificate that expires within :data:`EXPIRY_WARNING` is a warning. The command exits
non-zero when any check is an error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import importlib.metadata
import ssl
import urllib.parse
from typing import Any

from dynvol_core import constants as c
from dynvol_kube import APIError, APINotFound, Client
from dynvol_kube.resources import (
    MUTATING_WEBHOOKS,
    NODES,
    PODS,
    VALIDATING_WEBHOOKS,
)

from . import x509
from .reading import (
    CRDS,
    CSIDRIVERS,
    CSINODES,
    DAEMONSETS,
    DEPLOYMENTS,
    dig,
    items,
    list_all,
    text,
)
from .tables import render

__all__ = ["EXPIRY_WARNING", "gather", "table"]

OK, WARNING, ERROR = "ok", "warning", "error"
EXPIRY_WARNING = dt.timedelta(days=30)
NODE_DAEMONSET = "dynvol-node"
CONTROLLER_DEPLOYMENT = "dynvol-controller"
CRD_NAMES = tuple(
    f"{p}.{c.GROUP}" for p in (c.PLURAL_CLASS, c.PLURAL_CLAIM, c.PLURAL_MOUNT, c.PLURAL_CLAIM_SLICE)
)
_TIMEOUT = 5.0


def _check(name: str, status: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, **extra}


def _ready(obj: dict[str, Any]) -> bool:
    return any(
        cond.get("type") == "Ready" and cond.get("status") == "True"
        for cond in items(obj, "status", "conditions")
    )


def _image(workload: dict[str, Any]) -> str:
    return text(workload, "spec", "template", "spec", "containers", 0, "image")


def _expiry(name: str, when: dt.datetime, now: dt.datetime) -> tuple[str, str]:
    left = when - now
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    if left <= dt.timedelta(0):
        return ERROR, f"{name} expired at {stamp}"
    status = WARNING if left < EXPIRY_WARNING else OK
    return status, f"{name} expires {stamp} (in {left.days}d)"


# --------------------------------------------------------------------------- checks


async def _crds(client: Client) -> dict[str, Any]:
    missing, pending = [], []
    for name in CRD_NAMES:
        try:
            crd = await client.get(CRDS, name)
        except APINotFound:
            missing.append(name)
            continue
        established = any(
            cond.get("type") == "Established" and cond.get("status") == "True"
            for cond in items(crd, "status", "conditions")
        )
        if not established:
            pending.append(name)
    if missing or pending:
        parts = [f"missing: {', '.join(missing)}"] if missing else []
        parts += [f"not established: {', '.join(pending)}"] if pending else []
        return _check("crds", ERROR, "; ".join(parts))
    return _check("crds", OK, f"{len(CRD_NAMES)} of {len(CRD_NAMES)} established")


async def _csidriver(client: Client) -> dict[str, Any]:
    try:
        driver = await client.get(CSIDRIVERS, c.DRIVER_NAME)
    except APINotFound:
        return _check("csidriver", ERROR, f"CSIDriver {c.DRIVER_NAME} is missing")
    problems = []
    if dig(driver, "spec", "podInfoOnMount") is not True:
        problems.append("podInfoOnMount is not true")
    if "Ephemeral" not in (dig(driver, "spec", "volumeLifecycleModes") or []):
        problems.append("volumeLifecycleModes lacks Ephemeral")
    if problems:
        return _check("csidriver", ERROR, f"CSIDriver {c.DRIVER_NAME}: {'; '.join(problems)}")
    return _check("csidriver", OK, f"{c.DRIVER_NAME} (Ephemeral, podInfoOnMount)")


def _registered(csinode: dict[str, Any] | None) -> bool:
    return csinode is not None and any(
        d.get("name") == c.DRIVER_NAME for d in items(csinode, "spec", "drivers")
    )


async def _node_plugin(client: Client, system_namespace: str) -> dict[str, Any]:
    try:
        daemonset = await client.get(DAEMONSETS, NODE_DAEMONSET, namespace=system_namespace)
    except APINotFound:
        daemonset = None
    nodes = await list_all(client, NODES)
    csinodes = {text(n, "metadata", "name"): n for n in await list_all(client, CSINODES)}
    selector = f"{c.LABEL_COMPONENT}=node,app.kubernetes.io/name=dynvol"
    plugins: dict[str, dict[str, Any]] = {}
    for pod in await list_all(client, PODS, namespace=system_namespace, label_selector=selector):
        node = text(pod, "spec", "nodeName")
        if node and (node not in plugins or _ready(pod)):
            plugins[node] = pod
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    for node_obj in sorted(nodes, key=lambda n: text(n, "metadata", "name")):
        name = text(node_obj, "metadata", "name")
        plugin = plugins.get(name)
        row = {
            "node": name,
            "nodeReady": _ready(node_obj),
            "schedulable": dig(node_obj, "spec", "unschedulable") is not True,
            "pod": text(plugin, "metadata", "name") if plugin else "",
            "podReady": _ready(plugin) if plugin else False,
            "registered": _registered(csinodes.get(name)),
            "kubelet": text(node_obj, "status", "nodeInfo", "kubeletVersion"),
        }
        rows.append(row)
        if row["schedulable"] and not (row["podReady"] and row["registered"]):
            bad.append(name)
    if daemonset is None:
        return _check(
            "node-plugin", ERROR, f"DaemonSet {system_namespace}/{NODE_DAEMONSET} is missing",
            nodes=rows,
        )  # fmt: skip
    desired = dig(daemonset, "status", "desiredNumberScheduled") or 0
    ready = dig(daemonset, "status", "numberReady") or 0
    detail = f"DaemonSet {ready}/{desired} ready; "
    if bad:
        detail += f"not ready or not registered with kubelet on: {', '.join(bad)}"
        return _check("node-plugin", ERROR, detail, nodes=rows)
    detail += (
        f"ready and registered on {len(rows) - sum(not r['schedulable'] for r in rows)} node(s)"
    )
    return _check("node-plugin", OK, detail, nodes=rows)


async def _controller(client: Client, system_namespace: str) -> dict[str, Any]:
    try:
        deployment = await client.get(
            DEPLOYMENTS, CONTROLLER_DEPLOYMENT, namespace=system_namespace
        )
    except APINotFound:
        return _check(
            "controller", ERROR, f"Deployment {system_namespace}/{CONTROLLER_DEPLOYMENT} is missing"
        )
    wanted = dig(deployment, "spec", "replicas")
    wanted = wanted if isinstance(wanted, int) else 1
    ready = dig(deployment, "status", "readyReplicas") or 0
    status = OK if ready >= 1 else ERROR
    return _check("controller", status, f"{ready}/{wanted} ready")


async def _https_health(url: str, ca_pem: bytes) -> tuple[bool, str, dt.datetime | None]:
    """GET /healthz of the server at ``url``, verified with ``ca_pem``: (healthy, what,
    the serving certificate's expiry)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return False, f"{url} is not an https:// URL", None
    host, port = parts.hostname, parts.port or 443
    if not ca_pem:
        return False, f"{url} not contacted: no CA to verify its certificate with", None
    try:
        context = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        return False, f"{url} not contacted: the caBundle is not usable ({exc})", None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host), _TIMEOUT
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return False, f"cannot connect to {host}:{port}: {exc or type(exc).__name__}", None
    try:
        peer = writer.get_extra_info("peercert") or {}
        expires = None
        if isinstance(peer.get("notAfter"), str):
            expires = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(peer["notAfter"]), dt.UTC)
        netloc = host if ":" not in host else f"[{host}]"
        writer.write(
            f"GET /healthz HTTP/1.1\r\nHost: {netloc}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), _TIMEOUT)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return False, f"{host}:{port} did not answer /healthz: {exc or type(exc).__name__}", None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    fields = status_line.decode("latin-1").split()
    if len(fields) >= 2 and fields[1] == "200":
        return True, f"https://{host}:{port}/healthz answers 200", expires
    return (
        False,
        f"https://{host}:{port}/healthz answered {status_line.decode('latin-1').strip()!r}",
        expires,
    )


async def _service_health(client: Client, service: dict[str, Any]) -> tuple[bool, str]:
    ns, name = text(service, "namespace"), text(service, "name")
    port = dig(service, "port")
    port = port if isinstance(port, int) else 443
    path = f"/api/v1/namespaces/{ns}/services/https:{name}:{port}/proxy/healthz"
    try:
        await client.request("GET", path, request_timeout=_TIMEOUT)
    except APIError as exc:
        return False, f"Service {ns}/{name}:{port} did not answer /healthz: {exc}"
    return True, f"Service {ns}/{name}:{port} answers /healthz"


async def _webhook(
    client: Client, config: dict[str, Any], kind: str, now: dt.datetime
) -> dict[str, Any]:
    name = text(config, "metadata", "name")
    check_name = f"webhook/{name} ({kind})"
    hooks = [h for h in items(config, "webhooks") if text(h, "name").endswith(f".{c.GROUP}")]
    statuses, details = [], []
    try:
        pem = base64.b64decode(text(hooks[0], "clientConfig", "caBundle") if hooks else "")
        certs = x509.pem_certificates(pem)
    except (binascii.Error, x509.CertificateError):
        pem, certs = b"", []
    if not certs:
        statuses.append(ERROR)
        details.append("no CA certificate in caBundle")
    for der in certs[:1]:
        try:
            status, detail = _expiry("CA", x509.not_after(der), now)
        except x509.CertificateError as exc:
            status, detail = ERROR, f"caBundle certificate unreadable: {exc}"
        statuses.append(status)
        details.append(detail)
    client_config = dig(hooks[0], "clientConfig") if hooks else None
    url = text(client_config, "url")
    if url:
        base = urllib.parse.urlsplit(url)._replace(path="", query="", fragment="").geturl()
        healthy, what, serving = await _https_health(base, pem)
        if serving is not None:
            status, detail = _expiry("serving certificate", serving, now)
            statuses.append(status)
            details.append(detail)
    elif isinstance(service := dig(client_config, "service"), dict):
        healthy, what = await _service_health(client, service)
    else:
        healthy, what = False, "clientConfig names neither url nor service"
    statuses.append(OK if healthy else ERROR)
    details.insert(0, what)
    worst = ERROR if ERROR in statuses else WARNING if WARNING in statuses else OK
    return _check(check_name, worst, "; ".join(details), url=url)


async def _webhooks(client: Client, now: dt.datetime) -> list[dict[str, Any]]:
    found = []
    for resource, kind in ((MUTATING_WEBHOOKS, "mutating"), (VALIDATING_WEBHOOKS, "validating")):
        for config in await list_all(client, resource):
            if any(text(h, "name").endswith(f".{c.GROUP}") for h in items(config, "webhooks")):
                found.append(await _webhook(client, config, kind, now))
    if not found:
        return [_check("webhooks", ERROR, "no webhook configuration of dynvol is registered")]
    return found


async def _versions(client: Client, system_namespace: str) -> dict[str, Any]:
    versions: dict[str, str] = {}
    try:
        versions["apiserver"] = text(await client.request("GET", "/version"), "gitVersion")
    except APIError as exc:
        versions["apiserver"] = f"unknown ({exc})"
    for resource, name in ((DAEMONSETS, NODE_DAEMONSET), (DEPLOYMENTS, CONTROLLER_DEPLOYMENT)):
        try:
            versions[name] = _image(await client.get(resource, name, namespace=system_namespace))
        except APINotFound:
            versions[name] = "not installed"
    try:
        versions["kubectl-dynvol"] = importlib.metadata.version("dynvol")
    except importlib.metadata.PackageNotFoundError:
        versions["kubectl-dynvol"] = "unknown"
    detail = ", ".join(f"{k} {v}" for k, v in versions.items())
    return _check("versions", OK, detail, versions=versions)


async def gather(
    client: Client, system_namespace: str, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Every check, in the order above."""
    now = now or dt.datetime.now(dt.UTC)
    checks = [
        await _crds(client),
        await _csidriver(client),
        await _node_plugin(client, system_namespace),
        await _controller(client, system_namespace),
        *await _webhooks(client, now),
        await _versions(client, system_namespace),
    ]
    healthy = all(check["status"] != ERROR for check in checks)
    return {"kind": "DynvolDoctor", "healthy": healthy, "checks": checks}


def table(report: dict[str, Any]) -> str:
    """The checks, then the node plugin per node."""
    out = render(
        ["check", "status", "detail"],
        [[k["name"], k["status"], k["detail"]] for k in report["checks"]],
    )
    nodes = next((k.get("nodes") for k in report["checks"] if k["name"] == "node-plugin"), None)
    if nodes:
        rows = [
            [
                n["node"],
                "Ready" if n["nodeReady"] else "NotReady",
                n["pod"],
                n["podReady"],
                n["registered"],
                n["kubelet"],
            ]
            for n in nodes
        ]
        out += "\n" + render(
            ["node", "status", "plugin pod", "ready", "registered", "kubelet"], rows
        )
    return out
