"""The ValidatingAdmissionPolicies of manifests/base/admission-policies.yaml, on the real
apiserver, with requests made as the principals they are about (impersonated).

The policies and bindings are applied as the manifest writes them, except that each
binding gets a namespaceSelector matching only the namespaces these tests label, so that
the session's other tests (which create pods with hand-written volumes and DMPs as the
admin) are not affected. The RBAC is the project's own (manifests/base/rbac-*.yaml); the
tenant has the built-in ``edit`` rules in its namespace and, to show that admission holds
even where RBAC is too generous, a Role that lets it write DynamicVolumeMounts.

No webhook runs here unless a test asks for it: the policies must refuse on their own, as
when dynvol's webhook is down or skipped.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynvol.testing import ControlPlane, Process
from dynvol_controllers.admission import LABEL_INJECT, apply_patch, mutate_pod
from dynvol_core import constants as c
from dynvol_core.slices import slice_object
from dynvol_kube import APIError, APINotFound, Client
from dynvol_kube.resources import CLAIM_SLICES, MOUNTS, NAMESPACES, PODS

from .controller_support import eventually, pod_manifest
from .test_webhooks import Served, webhook_app  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[3]
POLICIES = TOP / "manifests/base/admission-policies.yaml"
RBAC = [TOP / f"manifests/base/rbac-{name}.yaml" for name in ("node", "dmp", "controller")]
SYSTEM = c.DEFAULT_SYSTEM_NAMESPACE
SCOPE_LABEL = "dynvol.test/admission-policies"
NODE_SA = f"system:serviceaccount:{SYSTEM}:dynvol-node"
DMP_SA = f"system:serviceaccount:{SYSTEM}:dynvol-dmp"
CONTROLLER_SA = f"system:serviceaccount:{SYSTEM}:dynvol-controller"
SLICES_POLICY = "dynvol-dynamicvolumeclaimslices"
VAP = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
VAP_BINDINGS = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"

OPTED_IN = {
    c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample",
    c.ANNOTATION_MOUNT_PATH_ROOT: "/dynamic",
}


def _policy_documents(token: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(POLICIES.read_text()) if d]
    for doc in docs:
        if doc["kind"] != "ValidatingAdmissionPolicyBinding":
            continue
        if doc["spec"]["policyName"] == SLICES_POLICY:
            # Claim slices are cluster-scoped, which a namespaceSelector never leaves out:
            # scope that binding by the objects' labels, so that the controllers other tests
            # run (as the admin, not as dynvol-controller) keep writing theirs.
            doc["spec"]["matchResources"] = {
                "objectSelector": {"matchLabels": {SCOPE_LABEL: token}}
            }
        else:
            doc["spec"]["matchResources"] = {
                "namespaceSelector": {"matchLabels": {SCOPE_LABEL: token}}
            }
    return docs


@pytest.fixture(scope="module")
def policies(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The manifest's policies and the project's RBAC applied; yields the scope label value."""
    token = secrets.token_hex(4)
    work = tmp_path_factory.mktemp("admission-policies")
    with contextlib.suppress(AssertionError, RuntimeError):
        control_plane.kubectl("create", "namespace", SYSTEM)
    applied = work / "policies.yaml"
    applied.write_text(yaml.safe_dump_all(_policy_documents(token)))
    rbac = work / "rbac.yaml"
    rbac.write_text("\n---\n".join(path.read_text() for path in RBAC))
    try:
        control_plane.kubectl("apply", "-f", str(rbac))
        control_plane.kubectl("apply", "-f", str(applied))
        control_plane.kubectl("label", "namespace", SYSTEM, f"{SCOPE_LABEL}={token}", "--overwrite")
        yield token
    finally:
        with contextlib.suppress(AssertionError, RuntimeError):
            control_plane.kubectl("label", "namespace", SYSTEM, f"{SCOPE_LABEL}-")
        control_plane.kubectl("delete", "--ignore-not-found", "-f", str(applied))
        control_plane.kubectl("delete", "--ignore-not-found", "-f", str(rbac))


@pytest.fixture
async def as_user(control_plane: ControlPlane) -> AsyncIterator[Any]:
    """``as_user(name)``: a dynvol Client whose requests impersonate ``name``."""
    from kubernetes_asyncio import client, config

    made: list[Any] = []

    async def make(user: str) -> Client:
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=str(control_plane.kubeconfig), client_configuration=configuration
        )
        api = client.ApiClient(configuration=configuration)
        api.set_default_header("Impersonate-User", user)
        made.append(api)
        return Client.wrap(api)

    try:
        yield make
    finally:
        for api in made:
            await api.close()


@pytest.fixture
async def tenant_ns(client: Client, namespace: str, policies: str) -> str:
    """The test namespace, in the policies' scope, with a tenant SA that has ``edit``."""
    await client.patch(NAMESPACES, namespace, {"metadata": {"labels": {SCOPE_LABEL: policies}}})
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    await client.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        body={"metadata": {"name": "tenant"}},
    )
    subject = [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}]
    # ``edit`` is aggregated by kube-controller-manager, which does not run here; bind the
    # roles it aggregates (its whole content) instead.
    for role in ("system:aggregate-to-edit", "system:aggregate-to-view"):
        await client.request(
            "POST",
            f"{rbac}/namespaces/{namespace}/rolebindings",
            body={
                "metadata": {"name": role.replace(":", "-")},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role,
                },
                "subjects": subject,
            },
        )
    # More than any shipped role gives: admission, not RBAC, must be what refuses.
    await client.request(
        "POST",
        f"{rbac}/namespaces/{namespace}/roles",
        body={
            "metadata": {"name": "too-generous"},
            "rules": [
                {
                    "apiGroups": [c.GROUP],
                    "resources": [c.PLURAL_MOUNT, f"{c.PLURAL_MOUNT}/status"],
                    "verbs": ["get", "list", "create", "update", "patch"],
                },
                # What ``kubectl debug`` needs; namespace admins commonly have it.
                {
                    "apiGroups": [""],
                    "resources": ["pods/ephemeralcontainers"],
                    "verbs": ["patch", "update"],
                },
            ],
        },
    )
    await client.request(
        "POST",
        f"{rbac}/namespaces/{namespace}/rolebindings",
        body={
            "metadata": {"name": "too-generous"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "too-generous",
            },
            "subjects": subject,
        },
    )
    await _wait_until_enforced(client, namespace)
    await _wait_until_authorized(client, namespace)
    return namespace


async def _wait_until_authorized(client: Client, namespace: str) -> None:
    """The RBAC authorizer learns of new bindings through its informers, a moment later:
    until it allows the tenant to create mounts, RBAC (not admission) would refuse it."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": tenant(namespace),
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
            "resourceAttributes": {
                "namespace": namespace, "verb": "create", "group": c.GROUP,
                "resource": c.PLURAL_MOUNT,
            },
        },
    }  # fmt: skip

    async def allowed() -> bool:
        answer = await client.request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=review
        )
        return bool((answer.get("status") or {}).get("allowed"))

    await eventually(allowed, within=30)


async def _wait_until_enforced(client: Client, namespace: str) -> None:
    """Policies, bindings and namespace labels reach the admission plugin asynchronously."""
    probe = pod_manifest(f"probe-{secrets.token_hex(3)}", labels={}, node=None, class_name="x")

    async def refused() -> bool:
        try:
            await _dry_run_pod(client, namespace, probe)
        except APIError as exc:
            return "dynamic-volume-root-path" in str(exc)
        return False

    await eventually(refused, within=30, interval=0.3)


async def _dry_run_pod(client: Client, namespace: str, body: dict[str, Any]) -> Any:
    return await client.request(
        "POST", PODS.path(namespace=namespace), params={"dryRun": "All"}, body=body
    )


def tenant(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:tenant"


def opted_in_pod(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod exactly as dynvol's webhook leaves it (its patch applied)."""
    body = pod_manifest(name, labels={}, node=None, annotations=dict(annotations or OPTED_IN))
    decision = mutate_pod(body)
    assert decision.allowed, decision.message
    mutated: dict[str, Any] = apply_patch(body, decision.patch)
    return mutated


# -- the policy objects themselves ----------------------------------------------------------


async def test_policies_are_stored_as_written_and_fail_closed(
    client: Client, policies: str
) -> None:
    """The apiserver compiled every expression (it refuses a policy that does not compile)
    and stored the policies as the manifest has them: failurePolicy Fail, bindings Deny.

    (Type-checking warnings are reported in status by kube-controller-manager, which the
    test control plane does not run; the tests below exercise every expression instead, and
    an expression that fails at run time would refuse the good pods there.)
    """
    written = {
        d["metadata"]["name"]: d
        for d in _policy_documents(policies)
        if d["kind"] == "ValidatingAdmissionPolicy"
    }
    for name in ("dynvol-pods", "dynvol-dynamicvolumemounts", SLICES_POLICY):
        stored = await client.request("GET", f"{VAP}/{name}")
        assert stored["spec"]["failurePolicy"] == "Fail"
        assert stored["spec"]["validations"] == written[name]["spec"]["validations"]
        assert stored["spec"]["variables"] == written[name]["spec"]["variables"]
        binding = await client.request("GET", f"{VAP_BINDINGS}/{name}")
        assert binding["spec"]["policyName"] == name
        assert binding["spec"]["validationActions"] == ["Deny"]


def test_policies_type_check_without_warnings(
    control_plane: ControlPlane, policies: str, tmp_path: Path
) -> None:
    """The apiserver type-checks each expression against the Pod and DVM schemas; the
    result lands in status, written by kube-controller-manager's policy status controller
    (built by ``make tools-node``), which is started here alone for the purpose."""
    kcm = control_plane.bin_dir / "kube-controller-manager"
    if not kcm.exists():
        pytest.skip(f"{kcm} is missing: 'make tools-node' builds it")
    proc = Process.start(
        [
            str(kcm), "--kubeconfig", str(control_plane.kubeconfig),
            "--controllers=validatingadmissionpolicy-status-controller",
            "--leader-elect=false", "--secure-port=0", "--bind-address=127.0.0.1",
        ],
        name="kube-controller-manager",
        log=tmp_path / "kcm.log",
    )  # fmt: skip
    names = {
        d["metadata"]["name"]
        for d in _policy_documents(policies)
        if d["kind"] == "ValidatingAdmissionPolicy"
    }
    assert len(names) == 3  # pods, DynamicVolumeMounts, DynamicVolumeClaimSlices
    try:

        def checked() -> list[dict[str, Any]] | None:
            listed = json.loads(
                control_plane.kubectl("get", "validatingadmissionpolicies", "-o", "json")
            )
            ours = [i for i in listed["items"] if i["metadata"]["name"].startswith("dynvol-")]
            done = [
                i
                for i in ours
                if (i.get("status") or {}).get("observedGeneration") == i["metadata"]["generation"]
                and "typeChecking" in i["status"]
            ]
            return done if len(done) == len(names) else None

        deadline = time.monotonic() + 60
        while (result := checked()) is None:
            assert proc.poll() is None, (tmp_path / "kcm.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no type-checking result within 60 s"
            time.sleep(0.5)
    finally:
        proc.stop(timeout=10)
    for policy in result:
        warnings = policy["status"]["typeChecking"].get("expressionWarnings") or []
        assert warnings == [], (policy["metadata"]["name"], warnings)


# -- pods -----------------------------------------------------------------------------------


def _hand_written(name: str, **csi: Any) -> dict[str, Any]:
    body = pod_manifest(name, labels={}, node=None, class_name="s3-sample")
    body["spec"]["volumes"][0]["csi"].update(csi)
    return body


async def test_a_hand_written_dynvol_volume_is_refused_with_the_way_to_opt_in(
    as_user: Any, tenant_ns: str
) -> None:
    api = await as_user(tenant(tenant_ns))
    # The pod: the volume, readOnly: false, no opt-in.
    body = _hand_written("sneaky", readOnly=False)
    with pytest.raises(APIError) as caught:
        await api.create(PODS, body, namespace=tenant_ns)
    message = str(caught.value)
    assert caught.value.status == 403
    assert "volume dynamic-volume-root-path is dynvol's volume" in message
    assert c.ANNOTATION_STORAGE_PROVIDER_CLASS in message
    assert c.ANNOTATION_MOUNT_PATH_ROOT in message

    # By driver, under another name.
    body = _hand_written("renamed")
    body["spec"]["volumes"][0]["name"] = "innocent"
    body["spec"]["containers"][0]["volumeMounts"][0]["name"] = "innocent"
    with pytest.raises(APIError, match="volume innocent is dynvol's volume"):
        await api.create(PODS, body, namespace=tenant_ns)

    # The opt-out annotation and label skip the webhook, not the policy.
    body = _hand_written("opted-out")
    body["metadata"]["annotations"] = {**OPTED_IN, LABEL_INJECT: "false"}
    body["metadata"]["labels"] = {LABEL_INJECT: "disabled"}
    with pytest.raises(APIError, match="has not opted in"):
        await api.create(PODS, body, namespace=tenant_ns)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v, m: v["csi"].update(readOnly=False), "differs from what dynvol injects"),
        (lambda v, m: v["csi"].pop("readOnly"), "differs from what dynvol injects"),
        (
            lambda v, m: v["csi"]["volumeAttributes"].update(storageProviderClass="other"),
            "differs from what dynvol injects",
        ),
        (
            lambda v, m: v["csi"].update(nodePublishSecretRef={"name": "any"}),
            "differs from what dynvol injects",
        ),
        (lambda v, m: m.update(readOnly=False), "must set readOnly: true"),
    ],
)
async def test_an_opted_in_pod_must_carry_exactly_the_injected_volume(
    as_user: Any, tenant_ns: str, change: Any, message: str
) -> None:
    api = await as_user(tenant(tenant_ns))
    body = opted_in_pod(f"p-{secrets.token_hex(3)}")
    change(body["spec"]["volumes"][0], body["spec"]["containers"][0]["volumeMounts"][0])
    with pytest.raises(APIError, match=message):
        await api.create(PODS, body, namespace=tenant_ns)


async def test_good_pods_are_admitted(client: Client, as_user: Any, tenant_ns: str) -> None:
    api = await as_user(tenant(tenant_ns))
    # What the webhook makes, as it makes it.
    made = await api.create(PODS, opted_in_pod("injected"), namespace=tenant_ns)
    assert [v["name"] for v in made["spec"]["volumes"]] == [c.VOLUME_NAME]
    # Webhook down: the annotations without the volume, and plain pods.
    await api.create(
        PODS,
        pod_manifest("annotated", labels={}, node=None, annotations=OPTED_IN),
        namespace=tenant_ns,
    )
    await api.create(
        PODS, pod_manifest("plain", labels={"app": "x"}, node=None), namespace=tenant_ns
    )
    # hostPaths outside dynvol's root are not the policy's business.
    body = pod_manifest("logs", labels={}, node=None)
    body["spec"]["volumes"] = [
        {"name": "logs", "hostPath": {"path": "/var/log"}},
        {"name": "near", "hostPath": {"path": "/var/lib/dynamic-not"}},
    ]
    await api.create(PODS, body, namespace=tenant_ns)
    # Updates that leave the opt-in alone are fine; removing it from a pod with the volume
    # is not (the volume would no longer say where it came from).
    await api.patch(
        PODS, "injected", {"metadata": {"labels": {"tier": "web"}}}, namespace=tenant_ns
    )
    remove = {"metadata": {"annotations": {c.ANNOTATION_STORAGE_PROVIDER_CLASS: None}}}
    with pytest.raises(APIError, match="has not opted in"):
        await api.patch(PODS, "injected", remove, namespace=tenant_ns)
    other = {"metadata": {"annotations": {c.ANNOTATION_STORAGE_PROVIDER_CLASS: "other"}}}
    with pytest.raises(APIError, match="differs from what dynvol injects"):
        await api.patch(PODS, "injected", other, namespace=tenant_ns)


async def test_ephemeral_containers_cannot_mount_the_root_writable(
    as_user: Any, tenant_ns: str
) -> None:
    api = await as_user(tenant(tenant_ns))
    pod = await api.create(PODS, opted_in_pod("debugged"), namespace=tenant_ns)
    debug = {
        "name": "debug",
        "image": "registry.invalid/debug:1",
        "volumeMounts": [{"name": c.VOLUME_NAME, "mountPath": "/dynamic"}],
    }
    patch = {"spec": {"ephemeralContainers": [debug]}}
    with pytest.raises(APIError, match="must set readOnly: true"):
        await api.patch(
            PODS, "debugged", patch, namespace=tenant_ns, subresource="ephemeralcontainers"
        )
    debug["volumeMounts"][0]["readOnly"] = True
    updated = await api.patch(
        PODS, "debugged", patch, namespace=tenant_ns, subresource="ephemeralcontainers"
    )
    assert updated["metadata"]["uid"] == pod["metadata"]["uid"]
    assert [e["name"] for e in updated["spec"]["ephemeralContainers"]] == ["debug"]


def _dmp_like(name: str, **spec: Any) -> dict[str, Any]:
    body = pod_manifest(name, labels={c.LABEL_COMPONENT: c.COMPONENT_DMP}, node=None)
    body["spec"].update(spec)
    return body


async def test_only_the_node_plugin_makes_pods_that_look_like_dmps(
    client: Client, as_user: Any, tenant_ns: str
) -> None:
    api = await as_user(tenant(tenant_ns))
    with pytest.raises(APIError, match="marks Dynamic Mount Pods"):
        await api.create(PODS, _dmp_like("fake-dmp"), namespace=tenant_ns)
    # The webhook's opt-out label changes nothing here either.
    fake = _dmp_like("fake-dmp-2")
    fake["metadata"]["labels"][LABEL_INJECT] = "disabled"
    with pytest.raises(APIError, match="marks Dynamic Mount Pods"):
        await api.create(PODS, fake, namespace=tenant_ns)
    # Nor can an existing pod take the label on.
    await api.create(PODS, pod_manifest("later", labels={}, node=None), namespace=tenant_ns)
    relabel = {"metadata": {"labels": {c.LABEL_COMPONENT: c.COMPONENT_DMP}}}
    with pytest.raises(APIError, match="marks Dynamic Mount Pods"):
        await api.patch(PODS, "later", relabel, namespace=tenant_ns)
    # A hostPath into dynvol's node root, however it is spelled.
    for path in ("/var/lib/dynamic", "/var//lib/./dynamic/xvols/s3-sample"):
        body = pod_manifest(f"hostpath-{secrets.token_hex(3)}", labels={}, node=None)
        body["spec"]["volumes"] = [{"name": "host", "hostPath": {"path": path}}]
        with pytest.raises(APIError, match="hostPath volume host reaches into /var/lib/dynamic"):
            await api.create(PODS, body, namespace=tenant_ns)

    # The node plugin's own DMPs are admitted; the same pod from the cluster admin is not
    # (there is no break-glass exemption).
    dmp = _dmp_like(
        f"dmp-{secrets.token_hex(3)}",
        serviceAccountName=c.DEFAULT_DMP_SERVICE_ACCOUNT,
        volumes=[{"name": "xvols", "hostPath": {"path": "/var/lib/dynamic/xvols/s3-sample"}}],
    )
    node = await as_user(NODE_SA)
    await _dry_run_pod(node, SYSTEM, dmp)
    with pytest.raises(APIError, match="marks Dynamic Mount Pods"):
        await _dry_run_pod(client, SYSTEM, dmp)
    unlabelled = json.loads(json.dumps(dmp))
    unlabelled["metadata"]["labels"] = {}
    with pytest.raises(APIError, match="ServiceAccount dynvol-dmp"):
        await _dry_run_pod(client, SYSTEM, unlabelled)
    # The node DaemonSet's own pods keep their /var/lib/dynamic hostPath.
    plugin_pod = pod_manifest("dynvol-node-x", labels={c.LABEL_COMPONENT: "node"}, node=None)
    plugin_pod["spec"]["serviceAccountName"] = "dynvol-node"
    plugin_pod["spec"]["volumes"] = [{"name": "root", "hostPath": {"path": "/var/lib/dynamic"}}]
    await _dry_run_pod(client, SYSTEM, plugin_pod)


async def test_the_node_plugin_may_only_add_tolerations_to_dmps(
    client: Client, as_user: Any, tenant_ns: str
) -> None:
    node = await as_user(NODE_SA)
    name = f"dmp-{secrets.token_hex(3)}"
    dmp = _dmp_like(
        name,
        serviceAccountName=c.DEFAULT_DMP_SERVICE_ACCOUNT,
        tolerations=[{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
    )
    other = pod_manifest(f"other-{secrets.token_hex(3)}", labels={}, node=None)
    await node.create(PODS, dmp, namespace=SYSTEM)
    await client.create(PODS, other, namespace=SYSTEM)
    json_patch = "application/json-patch+json"
    added = {"key": "example.com/draining", "operator": "Exists", "effect": "NoExecute"}
    try:
        await node.patch(
            PODS,
            name,
            [{"op": "add", "path": "/spec/tolerations/-", "value": added}],
            namespace=SYSTEM,
            content_type=json_patch,
        )
        stored = await client.get(PODS, name, namespace=SYSTEM)
        assert stored["spec"]["tolerations"][-1] == added
        refused = "may change an existing pod only by adding tolerations"
        for change in (
            [{"op": "replace", "path": "/spec/containers/0/image", "value": "evil.invalid/x:1"}],
            [{"op": "add", "path": "/metadata/labels/extra", "value": "x"}],
            [{"op": "add", "path": "/spec/activeDeadlineSeconds", "value": 5}],
        ):
            with pytest.raises(APIError, match=refused):
                await node.patch(PODS, name, change, namespace=SYSTEM, content_type=json_patch)
        # Not a DMP: not even a toleration.
        with pytest.raises(APIError, match=refused):
            await node.patch(
                PODS,
                other["metadata"]["name"],
                [{"op": "add", "path": "/spec/tolerations", "value": [added]}],
                namespace=SYSTEM,
                content_type=json_patch,
            )
    finally:
        for pod in (name, other["metadata"]["name"]):
            with contextlib.suppress(APIError):
                await client.delete(PODS, pod, namespace=SYSTEM, grace_seconds=0)


async def test_namespace_opt_in_through_the_webhook_passes_the_policy(
    client: Client,
    as_user: Any,
    tenant_ns: str,
    webhook_app: Served,  # noqa: F811
) -> None:
    """Mutating webhooks run before validation: the policy sees the injected volume and the
    opt-in the webhook copied onto the pod from its namespace."""
    await client.patch(
        NAMESPACES,
        tenant_ns,
        {
            "metadata": {
                "labels": {LABEL_INJECT: "enabled"},
                "annotations": {c.ANNOTATION_STORAGE_PROVIDER_CLASS: "ns-default"},
            }
        },
    )
    api = await as_user(tenant(tenant_ns))

    async def injected() -> Any:
        name = f"ns-{secrets.token_hex(3)}"
        made = await api.create(PODS, pod_manifest(name, labels={}, node=None), namespace=tenant_ns)
        return made if made["spec"].get("volumes") else None

    made = await eventually(injected, within=30, interval=0.3)
    assert made["metadata"]["annotations"][c.ANNOTATION_STORAGE_PROVIDER_CLASS] == "ns-default"
    (volume,) = made["spec"]["volumes"]
    assert volume["csi"]["volumeAttributes"][c.VOLUME_ATTR_CLASS] == "ns-default"
    assert volume["csi"]["readOnly"] is True


# -- DynamicVolumeMounts --------------------------------------------------------------------


def _dvm(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND_MOUNT,
        "metadata": {"name": name, "namespace": namespace, "labels": {c.LABEL_NODE: "n1"}},
        "spec": {
            "claimName": "claim",
            "claimUID": "11111111-1111-1111-1111-111111111111",
            "podName": "app",
            "podUID": "22222222-2222-2222-2222-222222222222",
            "nodeName": "n1",
            "dmpName": "dmp-x",
            "provider": "s3",
            "storageProviderClass": "s3-sample",
            "mountpoint": "/data",
            "slotPath": "/var/lib/dynamic/xvols/s3-sample/x/22222222-2222-2222-2222-222222222222",
            "dmpTargetPath": "/xvols/data",
        },
    }


async def test_only_the_node_plugin_writes_dynamicvolumemounts(
    as_user: Any, tenant_ns: str
) -> None:
    ns = tenant_ns
    tenant_api = await as_user(tenant(ns))
    with pytest.raises(APIError, match="created only by the dynvol node plugin") as caught:
        await tenant_api.create(MOUNTS, _dvm("forged", ns), namespace=ns)
    assert tenant(ns) in str(caught.value)

    node = await as_user(NODE_SA)
    made = await node.create(MOUNTS, _dvm("real", ns), namespace=ns)
    assert made["metadata"]["uid"]

    # A tenant changes nothing that steers a root process.
    for patch, message in (
        ({"spec": {"mountpoint": "/elsewhere"}}, "spec, labels or annotations"),
        ({"metadata": {"labels": {c.LABEL_NODE: "n2"}}}, "spec, labels or annotations"),
        ({"metadata": {"annotations": {"x": "y"}}}, "spec, labels or annotations"),
        ({"metadata": {"finalizers": ["example.com/hold"]}}, "finalizers"),
    ):
        with pytest.raises(APIError, match=message):
            await tenant_api.patch(MOUNTS, "real", patch, namespace=ns)
    with pytest.raises(APIError, match="status of a DynamicVolumeMount"):
        await tenant_api.patch(
            MOUNTS, "real", {"status": {"phase": "Mounted"}}, namespace=ns, subresource="status"
        )

    # The DMP: status and finalizers, nothing else.
    dmp = await as_user(DMP_SA)
    held = await dmp.patch(
        MOUNTS, "real", {"metadata": {"finalizers": [c.FINALIZER_MOUNT]}}, namespace=ns
    )
    assert held["metadata"]["finalizers"] == [c.FINALIZER_MOUNT]
    reported = await dmp.patch(
        MOUNTS, "real", {"status": {"phase": "Mounted"}}, namespace=ns, subresource="status"
    )
    assert reported["status"]["phase"] == "Mounted"
    for patch in ({"spec": {"readOnly": False}}, {"metadata": {"labels": {c.LABEL_DMP: "other"}}}):
        with pytest.raises(APIError, match="only the dynvol node plugin may change"):
            await dmp.patch(MOUNTS, "real", patch, namespace=ns)

    # The node plugin keeps full control (it replaces the spec, drops orphaned finalizers).
    changed = await node.patch(
        MOUNTS,
        "real",
        {"spec": {"readOnly": True}, "metadata": {"finalizers": None}},
        namespace=ns,
    )
    assert changed["spec"]["readOnly"] is True
    assert not changed["metadata"].get("finalizers")
    await node.delete(MOUNTS, "real", namespace=ns)


async def test_only_the_controller_writes_claim_slices(
    client: Client, as_user: Any, policies: str
) -> None:
    """A node plans from its slice as from claims: nobody else writes one, not even a
    user whose RBAC allows it."""
    name = f"node-{secrets.token_hex(3)}"
    entry = {
        "namespace": "tenant-a",
        "name": "forged",
        "uid": "00000000-0000-0000-0000-000000000001",
        "spec": {"mountpoint": "/data", "selector": {"matchLabels": {"app": "x"}}},
    }
    body = slice_object(name, [entry])
    body["metadata"]["labels"][SCOPE_LABEL] = policies
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    role = f"slice-writer-{policies}"
    await client.request(
        "POST",
        f"{rbac}/clusterroles",
        body={
            "metadata": {"name": role},
            "rules": [
                {
                    "apiGroups": [c.GROUP],
                    "resources": [c.PLURAL_CLAIM_SLICE],
                    "verbs": ["get", "create", "update", "patch", "delete"],
                }
            ],
        },
    )
    writer = f"system:serviceaccount:{SYSTEM}:dynvol-node"
    await client.request(
        "POST",
        f"{rbac}/clusterrolebindings",
        body={
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"kind": "User", "name": writer}, {"kind": "User", "name": CONTROLLER_SA}],
        },
    )
    try:
        # The node plugin (here with write access it does not ship with) is refused.
        node = await as_user(writer)

        async def refused() -> bool:
            try:
                await node.create(CLAIM_SLICES, body)
            except APIError as exc:
                return "written only by the dynvol controller" in str(exc)
            await client.delete(CLAIM_SLICES, name)  # RBAC or policy not there yet
            return False

        await eventually(refused, within=30, interval=0.3)
        controller = await as_user(CONTROLLER_SA)
        made = await controller.create(CLAIM_SLICES, body)
        with pytest.raises(APIError, match="written only by the dynvol controller") as caught:
            await node.patch(CLAIM_SLICES, name, {"spec": {"claims": []}})
        assert writer in str(caught.value)
        changed = await controller.replace(
            CLAIM_SLICES, {**made, "spec": {"nodeName": name, "claims": []}}
        )
        assert changed["spec"]["claims"] == []
    finally:
        with contextlib.suppress(APINotFound):
            await client.delete(CLAIM_SLICES, name)
        await client.request("DELETE", f"{rbac}/clusterrolebindings/{role}")
        await client.request("DELETE", f"{rbac}/clusterroles/{role}")


def test_the_base_kustomization_ships_the_policies(control_plane: ControlPlane) -> None:
    """``kubectl apply -k manifests/base`` (and every overlay) installs them as written."""
    for target in ("manifests/base", "manifests/overlays/local", "manifests/overlays/production"):
        rendered = control_plane.kubectl("kustomize", str(TOP / target))
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for name in ("dynvol-pods", "dynvol-dynamicvolumemounts", SLICES_POLICY):
            assert ("ValidatingAdmissionPolicy", name) in kinds, target
            assert ("ValidatingAdmissionPolicyBinding", name) in kinds, target
