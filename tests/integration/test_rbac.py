"""Least privilege (docs/design.md §6.5): the shipped RBAC, applied to a real apiserver.

The base manifests' RBAC is rendered with kustomize and applied with kubectl. Then:

* ``kubectl auth can-i --list`` for each ServiceAccount equals what docs/security.md says
  (the commands and their expected output are read from the doc's code blocks, so the doc
  and the RBAC cannot drift apart);
* the node plugin and the controller do their work under their own ServiceAccounts: the
  node reconciler makes mounts and DMPs without any access to Secrets, and the controller
  copies a class's Secret into dynvol-system;
* a tenant with the built-in ``edit`` role in its namespace can create claims and read
  classes, and cannot read Secrets outside its namespace nor write mounts or classes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynvol.testing import ControlPlane
from dynvol.testing.slots import node_reconciler_without_kubelet
from dynvol_controllers import ControllerApp
from dynvol_core import constants as c
from dynvol_core.dispatch import credentials_secret_name, label_value
from dynvol_kube import APIForbidden, APINotFound, Client
from dynvol_kube.resources import CLASSES, EVENTS, MOUNTS, PODS, SECRETS

from .controllers.controller_support import Objects, eventually, list_items

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]
DOC = TOP / "docs" / "security.md"
SYSTEM = c.DEFAULT_SYSTEM_NAMESPACE
#: The tenant namespace the doc's listings use.
TENANT = "tenant-a"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
SERVICE_ACCOUNTS = ("dynvol-node", "dynvol-controller", "dynvol-dmp")
_PROMPT = "$ kubectl auth can-i --list "


def _kubectl_path() -> Path:
    return TOP / ".tools" / "bin" / "kubectl"


def _render_rbac() -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(_kubectl_path()), "kustomize", str(TOP / "manifests" / "base")],
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return [d for d in docs if d["kind"] in RBAC_KINDS]


@pytest.fixture(scope="module")
def rbac(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The base manifests' RBAC applied with kubectl; deleted again afterwards."""
    for ns in (SYSTEM, TENANT):
        try:
            control_plane.kubectl("create", "namespace", ns)
        except RuntimeError as exc:
            if "AlreadyExists" not in str(exc):
                raise
    path = tmp_path_factory.mktemp("rbac") / "rbac.yaml"
    path.write_text(yaml.safe_dump_all(_render_rbac()))
    control_plane.kubectl("apply", "-f", str(path))
    try:
        yield path
    finally:
        control_plane.kubectl("delete", "--ignore-not-found", "-f", str(path))


# -- the doc's listings ------------------------------------------------------------------


def doc_listings() -> list[tuple[str, list[str]]]:
    """Every ``$ kubectl auth can-i --list ...`` block of the doc: (arguments, output)."""
    text = DOC.read_text()
    found = []
    for block in re.findall(r"^```text\n(.*?)^```", text, flags=re.S | re.M):
        lines = block.splitlines()
        if lines and lines[0].startswith(_PROMPT):
            found.append((lines[0].removeprefix("$ kubectl "), lines[1:]))
    return found


#: A ServiceAccount that nothing binds: what it can do, every authenticated user can.
_NOBODY = "system:serviceaccount:dynvol-rbac-probe:nobody"


def _rows(lines: list[str]) -> list[tuple[str, ...]]:
    """The listing's resource rows, as cells, sorted (a listing is a set of rules).

    Non-resource URL rows (an empty first column) are what every authenticated user has;
    the doc leaves them out. kubectl pads columns with three spaces or more, and cells hold
    single spaces only.
    """
    rows = [
        tuple(re.split(r"\s{2,}", line.strip()))
        for line in lines
        if line.strip() and not line[0].isspace()
    ]
    return sorted(rows)


def test_the_doc_lists_every_service_account_in_every_scope() -> None:
    listed = {args for args, _ in doc_listings()}
    for sa in SERVICE_ACCOUNTS:
        who = f"--as=system:serviceaccount:{SYSTEM}:{sa}"
        for scope in ("", f" -n {TENANT}", f" -n {SYSTEM}"):
            assert f"auth can-i --list {who}{scope}" in listed, (sa, scope or "cluster-wide")


@pytest.mark.parametrize(("args", "expected"), doc_listings(), ids=[a for a, _ in doc_listings()])
def test_service_account_can_do_what_the_doc_says(
    control_plane: ControlPlane, rbac: Path, args: str, expected: list[str]
) -> None:
    actual = control_plane.kubectl(*shlex.split(args)).splitlines()
    # What a ServiceAccount with no binding at all may do on this release (newer releases
    # grant every authenticated user more, e.g. reading ClusterTrustBundles since v1.37).
    # Such rows may appear without being in the doc; any other extra row is dynvol's RBAC
    # and fails, and so does a documented row that is missing.
    nobody = [a if not a.startswith("--as=") else f"--as={_NOBODY}" for a in shlex.split(args)]
    everyone = set(_rows(control_plane.kubectl(*nobody).splitlines())) - set(_rows(expected))
    granted = [row for row in _rows(actual) if row not in everyone]
    assert granted == _rows(expected), "\n".join(actual)


def test_no_service_account_but_the_controller_reads_secrets(
    control_plane: ControlPlane, rbac: Path
) -> None:
    for sa in SERVICE_ACCOUNTS:
        who = f"--as=system:serviceaccount:{SYSTEM}:{sa}"
        for ns in (TENANT, SYSTEM, "kube-system"):
            for verb in ("get", "list", "watch"):
                allowed = _can(control_plane, verb, "secrets", ns, who)
                assert allowed == (sa == "dynvol-controller"), (sa, verb, ns)
        # Writes only the credential copies, in the system namespace.
        assert _can(control_plane, "create", "secrets", SYSTEM, who) == (sa == "dynvol-controller")
        assert not _can(control_plane, "create", "secrets", TENANT, who)


def _can(control_plane: ControlPlane, verb: str, resource: str, ns: str, *extra: str) -> bool:
    """``kubectl auth can-i``: prints yes (exit 0) or no (exit 1)."""
    argv = [str(control_plane.binary("kubectl")), "--kubeconfig", str(control_plane.kubeconfig)]
    # kubectl reads "a/b" as resource a named b; subresources go in their own flag.
    resource, _, sub = resource.partition("/")
    argv += ["auth", "can-i", verb, resource, "-n", ns, *extra]
    argv += [f"--subresource={sub}"] if sub else []
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    answer = out.stdout.strip()
    assert (out.returncode, answer) in ((0, "yes"), (1, "no")), (argv, out.stdout, out.stderr)
    return answer == "yes"


# -- the services under their own ServiceAccounts --------------------------------------------


@contextlib.asynccontextmanager
async def _client_as(control_plane: ControlPlane, user: str) -> AsyncIterator[Client]:
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(control_plane.kubeconfig), client_configuration=configuration
    )
    api = client.ApiClient(configuration=configuration)
    # The apiserver adds a ServiceAccount's groups itself when impersonating one.
    api.set_default_header("Impersonate-User", user)
    try:
        yield Client.wrap(api)
    finally:
        await api.close()


def _sa(name: str) -> str:
    return f"system:serviceaccount:{SYSTEM}:{name}"


@pytest.fixture
async def admin(kube_client: Any) -> Client:
    return Client.wrap(kube_client)


@pytest.fixture
async def objects(admin: Client, namespace: str) -> AsyncIterator[Objects]:
    made = Objects(admin, namespace)
    try:
        yield made
    finally:
        await made.cleanup()


async def test_services_work_under_their_own_service_accounts(
    control_plane: ControlPlane, rbac: Path, admin: Client, objects: Objects
) -> None:
    ns = objects.namespace
    spc = f"rbac-{objects.suffix}"
    node = f"n-rbac-{objects.suffix}"
    await objects.secret("creds", {"access-key-id": "id", "secret-access-key": "key"})
    await objects.storage_class(spc, secret="creds")
    await objects.pod("p", labels={"app": "r"}, node=node, class_name=spc)
    await objects.claim("c", selector={"app": "r"})
    async with (
        _client_as(control_plane, _sa("dynvol-controller")) as as_controller,
        _client_as(control_plane, _sa("dynvol-node")) as as_node,
    ):
        # The node plugin cannot read the class's Secret, nor any other.
        with pytest.raises(APIForbidden):
            await as_node.get(SECRETS, "creds", namespace=ns)
        with pytest.raises(APIForbidden):
            await as_node.list(SECRETS, namespace=SYSTEM)
        app = ControllerApp(
            client=as_controller,
            lease_name=f"dynvol-rbac-{objects.suffix}",
            lease_namespace=SYSTEM,
            lease_duration=3,
            renew_deadline=2,
            retry_period=0.5,
        )
        reconciler = node_reconciler_without_kubelet(as_node, node, dmp_delete_grace=0)
        await app.start()
        try:
            await reconciler.start()
            try:

                async def copied() -> bool:
                    try:
                        await admin.get(SECRETS, credentials_secret_name(spc), namespace=SYSTEM)
                    except APINotFound:
                        return False
                    return True

                async def planned() -> bool:
                    dvms = await list_items(admin, MOUNTS, namespace=ns)
                    dmps = await list_items(
                        admin,
                        PODS,
                        namespace=SYSTEM,
                        label_selector=f"{c.LABEL_CLASS}={label_value(spc)}",
                    )
                    return len(dvms) == 1 and len(dmps) == 1

                await eventually(copied)
                await eventually(planned)
            finally:
                await reconciler.close()
        finally:
            await app.close()
            for pod in await list_items(
                admin, PODS, namespace=SYSTEM, label_selector=f"{c.LABEL_CLASS}={label_value(spc)}"
            ):
                with contextlib.suppress(APINotFound):
                    await admin.delete(
                        PODS, pod["metadata"]["name"], namespace=SYSTEM, grace_seconds=0
                    )
            with contextlib.suppress(APINotFound):
                await admin.delete(SECRETS, credentials_secret_name(spc), namespace=SYSTEM)
            await objects.delete_pod("p")


# -- tenants ---------------------------------------------------------------------------


def _controller_manager() -> Path | None:
    path = TOP / ".tools" / "bin" / "kube-controller-manager"
    return path if os.access(path, os.X_OK) else None


@pytest.fixture(scope="module")
def aggregated(
    control_plane: ControlPlane, rbac: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The real ClusterRole aggregation: kube-controller-manager running only that controller."""
    binary = _controller_manager()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("kube-controller-manager is missing: CI must build it (make tools-node)")
        pytest.skip("kube-controller-manager is missing (make tools-node)")
    log = tmp_path_factory.mktemp("kcm") / "kcm.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                f"--kubeconfig={control_plane.kubeconfig}",
                "--controllers=clusterrole-aggregation",
                "--leader-elect=false",
                "--secure-port=0",
                "--bind-address=127.0.0.1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "dynamicvolumeclaims" not in control_plane.kubectl(
            "get", "clusterrole", "edit", "-o", "yaml"
        ):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def test_tenant_roles_are_selected_by_the_builtin_aggregated_roles(
    control_plane: ControlPlane, rbac: Path
) -> None:
    def selectors(role: str) -> list[dict[str, str]]:
        obj = yaml.safe_load(control_plane.kubectl("get", "clusterrole", role, "-o", "yaml"))
        return [s["matchLabels"] for s in obj["aggregationRule"]["clusterRoleSelectors"]]

    def labels(role: str) -> dict[str, str]:
        obj = yaml.safe_load(control_plane.kubectl("get", "clusterrole", role, "-o", "yaml"))
        return dict(obj["metadata"].get("labels") or {})

    def selected(builtin: str, ours: str) -> bool:
        have = labels(ours)
        return any(all(have.get(k) == v for k, v in sel.items()) for sel in selectors(builtin))

    for builtin in ("admin", "edit"):
        assert selected(builtin, "dynvol-tenant-edit"), builtin
    for builtin in ("admin", "edit", "view"):
        assert selected(builtin, "dynvol-tenant-view"), builtin
    assert not selected("view", "dynvol-tenant-edit")


def test_tenant_with_edit_writes_claims_only(
    control_plane: ControlPlane, rbac: Path, aggregated: None
) -> None:
    tenant = f"tenant-{secrets.token_hex(3)}"
    other = f"other-{secrets.token_hex(3)}"
    user = f"alice-{secrets.token_hex(3)}"
    kubectl = control_plane.kubectl
    for ns in (tenant, other):
        kubectl("create", "namespace", ns)
    try:
        kubectl(
            "create",
            "rolebinding",
            "alice-edit",
            "--clusterrole=edit",
            f"--user={user}",
            "-n",
            tenant,
        )
        kubectl("create", "secret", "generic", "elsewhere", "--from-literal=k=v", "-n", other)
        as_user = f"--as={user}"
        claim = {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_CLAIM,
            "metadata": {"name": "mine", "namespace": tenant},
            "spec": {
                "storageProvider": "s3",
                "mountpoint": "/data",
                "selector": {"matchLabels": {"app": "a"}},
                "s3Config": {"bucket": "tenant-data", "endpoint": "http://127.0.0.1:9"},
            },
        }
        path = control_plane.dir / f"claim-{tenant}.yaml"
        path.write_text(yaml.safe_dump(claim))
        kubectl("create", "-f", str(path), as_user)
        assert "mine" in kubectl("get", "dynamicvolumeclaims", "-n", tenant, as_user)
        kubectl("get", "storageproviderclasses", as_user)
        kubectl("get", "dynamicvolumemounts", "-n", tenant, as_user)
        for verb, resource, ns in (
            ("get", "secrets", other),
            ("list", "secrets", other),
            ("get", "secrets", SYSTEM),
            ("create", "dynamicvolumemounts", tenant),
            ("update", "dynamicvolumemounts", tenant),
            ("patch", "dynamicvolumemounts/status", tenant),
            ("patch", "dynamicvolumeclaims/status", tenant),
            ("create", "storageproviderclasses", tenant),
            ("delete", "storageproviderclasses", tenant),
            ("create", "dynamicvolumeclaims", other),
        ):
            assert not _can(control_plane, verb, resource, ns, as_user), (verb, resource, ns)
        with pytest.raises(RuntimeError, match=r"(?i)forbidden"):
            kubectl("get", "secret", "elsewhere", "-n", other, as_user)
        assert _can(control_plane, "delete", "dynamicvolumeclaims", tenant, as_user)
    finally:
        kubectl("delete", "dynamicvolumeclaims", "--all", "-n", tenant, "--ignore-not-found")
        kubectl("delete", "secret", "elsewhere", "-n", other, "--ignore-not-found")
        for ns in (tenant, other):
            kubectl("delete", "namespace", ns, "--wait=false")


async def test_an_unreadable_source_secret_is_reported_on_the_class(
    control_plane: ControlPlane, rbac: Path, admin: Client, objects: Objects
) -> None:
    # A controller whose RBAC was narrowed to Secrets in dynvol-system (as an operator
    # might): the class says why its DMPs get no credentials instead of failing silently.
    user = f"narrow-controller-{objects.suffix}"
    role = yaml.safe_load(
        control_plane.kubectl("get", "clusterrole", "dynvol-controller", "-o", "yaml")
    )
    rules = [r for r in role["rules"] if "secrets" not in r.get("resources", ())]
    narrow = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": user},
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    lease_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": user, "namespace": SYSTEM},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "dynvol-controller",
        },
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    # It still reads the copies in dynvol-system, only not the sources elsewhere.
    copies_reader = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": user, "namespace": SYSTEM},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}],
    }
    copies_binding = {
        **lease_binding,
        "metadata": {"name": f"{user}-copies", "namespace": SYSTEM},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
    }
    path = control_plane.dir / f"{user}.yaml"
    path.write_text(
        yaml.safe_dump_all([narrow, binding, lease_binding, copies_reader, copies_binding])
    )
    control_plane.kubectl("apply", "-f", str(path))
    spc = f"unreadable-{objects.suffix}"
    try:
        await objects.secret("creds", {"access-key-id": "id", "secret-access-key": "key"})
        await objects.storage_class(spc, secret="creds")
        async with _client_as(control_plane, user) as as_narrow:
            app = ControllerApp(
                client=as_narrow,
                lease_name=f"dynvol-narrow-{objects.suffix}",
                lease_namespace=SYSTEM,
                lease_duration=3,
                renew_deadline=2,
                retry_period=0.5,
            )
            await app.start()
            try:

                async def reported() -> dict[str, Any] | None:
                    obj = await admin.get(CLASSES, spc)
                    for cond in (obj.get("status") or {}).get("conditions") or ():
                        if cond["type"] == "CredentialsReady" and cond["status"] == "False":
                            return dict(cond)
                    return None

                cond = await eventually(reported)
                assert cond["reason"] == "SecretUnreadable"
                assert f"{objects.namespace}/creds" in cond["message"]
                assert c.PARAM_SECRET_NAME in cond["message"]
                with pytest.raises(APINotFound):
                    await admin.get(SECRETS, credentials_secret_name(spc), namespace=SYSTEM)

                async def warned() -> bool:
                    events = await list_items(
                        admin,
                        EVENTS,
                        namespace="default",
                        field_selector=f"involvedObject.name={spc}",
                    )
                    return any(e["reason"] == "SecretUnreadable" for e in events)

                await eventually(warned)
            finally:
                await app.close()
    finally:
        control_plane.kubectl("delete", "--ignore-not-found", "-f", str(path))
