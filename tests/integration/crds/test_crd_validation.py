"""dynvol's CRDs on a real kube-apiserver: what they accept, reject and explain.

The bad and good objects are the ones the core's unit tests use (tests/cases/bad_objects.py),
so the API and the core are held to the same rules.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dynvol.testing import ControlPlane
from dynvol_core import constants as c
from dynvol_core.dispatch import plan_node
from dynvol_core.errors import InvalidObject
from dynvol_core.models import (
    TYPED_CONFIG_BLOCKS,
    Condition,
    ConditionStatus,
    DynamicVolumeClaim,
    DynamicVolumeMount,
    InjectedVolume,
    MountPhase,
    MountStatus,
    PodInfo,
    StorageProviderClass,
)
from dynvol_core.paths import XvolsLayout
from tests.cases.bad_objects import (
    BAD_OBJECTS,
    CONFIG_VALUES,
    DVC,
    EDGE_GOOD_OBJECTS,
    GOOD_OBJECTS,
    POLICY_CASES,
    PROVIDER_BAD_CLAIMS,
    SPC,
    BadCase,
)

pytestmark = pytest.mark.integration

PLURALS = {SPC: c.PLURAL_CLASS, DVC: c.PLURAL_CLAIM, c.KIND_MOUNT: c.PLURAL_MOUNT}
PARSERS = {SPC: StorageProviderClass.from_object, DVC: DynamicVolumeClaim.from_object}


class Api:
    """Create/read/delete of any object in this module's tables, strict field validation."""

    def __init__(self, kube_client: Any) -> None:
        from kubernetes_asyncio import client

        self.custom = client.CustomObjectsApi(kube_client)
        self.core = client.CoreV1Api(kube_client)
        self.ext = client.ApiextensionsV1Api(kube_client)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = obj["kind"]
        if kind == "Secret":
            ns = obj["metadata"]["namespace"]
            created = await self.core.create_namespaced_secret(ns, obj, field_validation="Strict")
            return dict(created.to_dict())
        plural = PLURALS[kind]
        if kind == SPC:
            return dict(
                await self.custom.create_cluster_custom_object(
                    c.GROUP, c.VERSION, plural, obj, field_validation="Strict"
                )
            )
        ns = obj["metadata"].get("namespace", "default")
        return dict(
            await self.custom.create_namespaced_custom_object(
                c.GROUP, c.VERSION, ns, plural, obj, field_validation="Strict"
            )
        )

    async def delete(self, obj: dict[str, Any]) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        kind, name = obj["kind"], obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace", "default")
        try:
            if kind == "Secret":
                await self.core.delete_namespaced_secret(name, ns)
            elif kind == SPC:
                await self.custom.delete_cluster_custom_object(
                    c.GROUP, c.VERSION, PLURALS[kind], name
                )
            else:
                await self.custom.delete_namespaced_custom_object(
                    c.GROUP, c.VERSION, ns, PLURALS[kind], name
                )
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def api(kube_client: Any) -> Api:
    return Api(kube_client)


async def _ensure_namespace(api: Api, name: str) -> None:
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await api.core.create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


@pytest.mark.parametrize("case", BAD_OBJECTS + PROVIDER_BAD_CLAIMS, ids=lambda case: case.id)
async def test_api_rejects_bad_object(api: Api, namespace: str, case: BadCase) -> None:
    from kubernetes_asyncio.client.exceptions import ApiException

    obj = case.fresh(namespace=namespace)
    try:
        await api.create(obj)
    except ApiException as exc:
        error = exc
    else:
        await api.delete(obj)  # do not leak what should never have been accepted
        pytest.fail(f"the API accepted {case.id}")
    message = json.loads(error.body).get("message", "")
    # Unknown fields are a decoding error under strict field validation: 400, not 422.
    assert error.status == (400 if case.strict_only else 422), message
    assert case.path in message, message
    if case.api_message:
        assert case.api_message in message, message


async def test_api_accepts_seed_objects_exactly_as_written(api: Api) -> None:
    await _ensure_namespace(api, "dynamic-volume-test")
    created = []
    try:
        for obj in GOOD_OBJECTS:
            stored = await api.create(json.loads(json.dumps(obj)))
            created.append(obj)
            parse = PARSERS.get(obj["kind"])
            if parse is not None:
                parse(stored)  # what the API stores, the core accepts
    finally:
        for obj in reversed(created):
            await api.delete(obj)
    assert len(created) == len(GOOD_OBJECTS)


async def test_api_accepts_edge_objects(api: Api, namespace: str) -> None:
    created = []
    try:
        for obj in EDGE_GOOD_OBJECTS:
            obj = json.loads(json.dumps(obj))
            if obj["kind"] == DVC:
                obj["metadata"]["namespace"] = namespace
            stored = await api.create(obj)
            created.append(obj)
            PARSERS[obj["kind"]](stored)
    finally:
        for obj in reversed(created):
            await api.delete(obj)


async def test_planned_mount_round_trips_through_the_api(api: Api, namespace: str) -> None:
    spc_obj = next(o for o in GOOD_OBJECTS if o["kind"] == SPC)
    claim_obj = {
        "apiVersion": c.API_VERSION,
        "kind": DVC,
        "metadata": {"name": "round-trip", "namespace": namespace},
        "spec": {
            "mountpoint": "/data",
            "selector": {"matchLabels": {"app": "web"}},
            "s3Config": {"bucket": "bucket-1", "endpoint": "http://127.0.0.1:9000"},
        },
    }
    claim = DynamicVolumeClaim.from_object(await api.create(claim_obj))
    try:
        pod_uid = "0f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10"
        pod = PodInfo(
            namespace=namespace,
            name="web-0",
            uid=pod_uid,
            node_name="node-1",
            labels={"app": "web"},
            phase="Running",
            volume=InjectedVolume("s3-sample", c.POLICY_SHARED),
        )
        slot = XvolsLayout.default().slot(
            "s3-sample", "6a1f0c1e-7d5e-4f3a-9c2b-1e0d9f8a7b6c", pod_uid
        )
        plan = plan_node(
            node_name="node-1",
            pods=[pod],
            claims=[claim],
            classes=[StorageProviderClass.from_object(spc_obj)],
            slots={pod_uid: slot},
            system_namespace=c.DEFAULT_SYSTEM_NAMESPACE,
            dmp_image="dynvol:test",
        )
        (dvm,) = plan.create_dvms
        stored = DynamicVolumeMount.from_object(await api.create(dvm.to_object()))
        assert stored.spec == dvm.spec
        assert dict(stored.labels) == dict(dvm.labels)

        status = MountStatus(
            phase=MountPhase.MOUNTED,
            conditions=(
                Condition(
                    type="Mounted",
                    status=ConditionStatus.TRUE,
                    reason="Mounted",
                    message="mounted",
                    last_transition_time=_now(),
                    observed_generation=1,
                ),
            ),
            observed_generation=1,
            mounted_at=_now(),
        )
        patched = await api.custom.patch_namespaced_custom_object_status(
            c.GROUP,
            c.VERSION,
            namespace,
            c.PLURAL_MOUNT,
            dvm.name,
            {"status": status.to_object()},
            _content_type="application/merge-patch+json",
        )
        assert DynamicVolumeMount.from_object(patched).status == status
        await api.delete(dvm.to_object())
    finally:
        await api.delete(claim_obj)


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{name}", sub
        yield from _walk(sub, f"{path}.{name}")
    items = schema.get("items")
    if isinstance(items, dict):
        yield from _walk(items, f"{path}[]")


async def test_every_field_has_a_description(api: Api) -> None:
    crds = {
        c.PLURAL_CLASS: ("Cluster", ["spc"]),
        c.PLURAL_CLAIM: ("Namespaced", ["dvc"]),
        c.PLURAL_MOUNT: ("Namespaced", ["dvm"]),
    }
    for plural, (scope, short_names) in crds.items():
        crd = (await api.ext.read_custom_resource_definition(f"{plural}.{c.GROUP}")).to_dict()
        spec = crd["spec"]
        assert spec["scope"] == scope
        assert spec["names"]["short_names"] == short_names
        (version,) = spec["versions"]
        assert version["subresources"]["status"] == {}
        columns = {col["name"] for col in version["additional_printer_columns"]}
        assert "Age" in columns
        schema = version["schema"]["open_apiv3_schema"]
        missing = [
            path
            for path, sub in _walk(schema, plural)
            if not sub.get("description") and path != f"{plural}.metadata"
        ]
        assert not missing, f"fields without a description: {missing}"
    claim = await api.ext.read_custom_resource_definition(f"{c.PLURAL_CLAIM}.{c.GROUP}")
    columns = {col.name for col in claim.spec.versions[0].additional_printer_columns}
    assert {"Provider", "Mountpoint", "Ready", "Matched", "Mounted", "Age"} <= columns


def test_kubectl_explain_shows_the_descriptions(control_plane: ControlPlane) -> None:
    # The apiserver publishes CRD schemas to /openapi/v3 asynchronously; give it a moment.
    deadline = time.monotonic() + 30
    while True:
        try:
            out = control_plane.kubectl("explain", "dynamicvolumeclaims.spec.mountpoint")
            if "relative to the pod's dynamic volume root" in " ".join(out.split()):
                break
        except RuntimeError:
            out = ""
        if time.monotonic() > deadline:
            pytest.fail(f"kubectl explain did not show the mountpoint description:\n{out}")
        time.sleep(1)
    spc = control_plane.kubectl("explain", "spc.spec.parameters")
    assert "storage-provider-secret-name" in spc


# --------------------------------------------------------------------------- the webhook


@pytest.fixture
async def admission(kube_client: Any) -> Any:
    """The validating webhook's decision function, over a classes cache of the real API."""
    from dynvol_controllers import ClusterController
    from dynvol_kube import Client, EventRecorder
    from dynvol_providers.registry import load_registry

    client = Client.wrap(kube_client)
    controller = ClusterController(
        client,
        recorder=EventRecorder(client=client, component="dynvol-test"),
        registry=load_registry(),
    )
    await controller.classes.start()
    try:
        await controller.classes.wait_synced(within=30)
        yield controller
    finally:
        await controller.classes.close()


def _review(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "uid": "0d3b0c8e-0000-4000-8000-000000000000",
        "kind": {"group": c.GROUP, "version": c.VERSION, "kind": obj["kind"]},
        "operation": "CREATE",
        "namespace": obj["metadata"].get("namespace"),
        "object": obj,
    }


async def test_webhook_refuses_every_bad_object(admission: Any) -> None:
    """The webhook agrees with the API and the core on the whole table."""
    for case in BAD_OBJECTS + PROVIDER_BAD_CLAIMS:
        decision = admission.validate(_review(case.fresh()))
        assert not decision.allowed, case.id
        assert case.path.split("[")[0] in decision.message, (case.id, decision.message)


async def _wait_cached(admission: Any, name: str, generation: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cached = admission.classes.store.get(name)
        if cached is not None and cached["metadata"].get("generation") == generation:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"class {name} did not reach the webhook's cache")


@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda case: case.id)
async def test_api_accepts_and_webhook_judges_policy_cases(
    api: Api, admission: Any, namespace: str, case: Any
) -> None:
    """The API cannot see across objects; the webhook asks the provider with the class's
    policy, refuses naming the claim's field, and accepts once the class allows it."""
    name = f"policy-{case.id}"[:63]
    spc = case.spc(name)
    stored = await api.create(spc)
    try:
        await _wait_cached(admission, name, stored["metadata"]["generation"])
        claim = case.claim(name, namespace=namespace)
        decision = admission.validate(_review(claim))
        assert not decision.allowed
        assert case.path in decision.message, decision.message
        assert case.message in decision.message, decision.message
        # The API itself takes the claim: only the class can refuse it.
        await api.create(json.loads(json.dumps(claim)))
        await api.delete(claim)
        if case.allowed is not None:
            allowed = case.spc(name, allowed=True)
            current = await api.custom.get_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_CLASS, name
            )
            allowed["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            replaced = await api.custom.replace_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_CLASS, name, allowed
            )
            await _wait_cached(admission, name, replaced["metadata"]["generation"])
            decision = admission.validate(_review(claim))
            assert decision.allowed, decision.message
    finally:
        await api.delete(spc)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"provider": "s3", "connection": {"pinned": {"server": "x"}}},
         "spec.connection.pinned[server]"),
        ({"provider": "s3", "connection": {"pinned": {"endpoint": "http://h/a,dev"}}},
         "spec.connection.pinned[endpoint]"),
        ({"provider": "nfs", "connection": {"pinned": {"exportPrefix": "relative"}}},
         "spec.connection.pinned[exportPrefix]"),
        ({"provider": "rclone", "parameters": {"rclone-allowed-options": "Key-File"}},
         "spec.parameters.rclone-allowed-options"),
        ({"provider": "s3", "parameters": {"s3-mounter": "goofys"}}, "spec.parameters.s3-mounter"),
    ],
)  # fmt: skip
async def test_webhook_refuses_class_settings_the_provider_rejects(
    admission: Any, spec: dict[str, Any], path: str
) -> None:
    obj = {"apiVersion": c.API_VERSION, "kind": SPC, "metadata": {"name": "x"}, "spec": spec}
    StorageProviderClass.from_object(obj)  # well-formed: only the provider can tell
    decision = admission.validate(_review(obj))
    assert not decision.allowed
    assert path in decision.message, decision.message


async def test_webhook_accepts_the_seed_class_and_a_pinned_one(admission: Any) -> None:
    seed = next(o for o in GOOD_OBJECTS if o["kind"] == SPC)
    assert admission.validate(_review(json.loads(json.dumps(seed)))).allowed
    pinned = {
        "apiVersion": c.API_VERSION,
        "kind": SPC,
        "metadata": {"name": "pinned"},
        "spec": {
            "provider": "s3",
            "connection": {"pinned": {"endpoint": "https://s3.example.com"}},
        },
    }
    assert admission.validate(_review(pinned)).allowed


# --------------------------------------------------------------------------- one rule, three judges


def _provider_paths(claim_obj: dict[str, Any]) -> list[str] | None:
    """The paths the claim's provider names in refusing its block (None: it accepts it)."""
    from dynvol_providers.registry import load_registry

    claim = DynamicVolumeClaim.from_object(claim_obj)
    try:
        load_registry().parse_claim_config(claim.provider_config)
    except InvalidObject as exc:
        return list(exc.paths)
    return None


async def test_api_webhook_and_provider_agree_on_every_config_value(
    api: Api, admission: Any, namespace: str
) -> None:
    """On the shared table of good and bad block values, and on every bad object whose bad
    field is in a provider's block, the CRD schema (the real apiserver), the validating
    webhook and the provider's parser give the same verdict, naming the same field."""
    from kubernetes_asyncio.client.exceptions import ApiException

    cases: list[tuple[str, dict[str, Any], str | None]] = [
        (case.id, case.claim(namespace=namespace), case.path) for case in CONFIG_VALUES
    ]
    cases += [
        (case.id, case.fresh(namespace=namespace), case.path)
        for case in BAD_OBJECTS + PROVIDER_BAD_CLAIMS
        if case.kind == DVC
        and case.path.startswith(tuple(f"spec.{b}." for b in TYPED_CONFIG_BLOCKS))
        and not case.strict_only
    ]
    assert len(cases) >= 60
    disagreements = []
    for case_id, obj, path in cases:
        try:
            await api.create(json.loads(json.dumps(obj)))
        except ApiException as exc:
            message = json.loads(exc.body).get("message", "")
            api_ok = False
            api_names = exc.status == 422 and path is not None and path.split("[")[0] in message
        else:
            await api.delete(obj)
            api_ok, api_names = True, False
        decision = admission.validate(_review(json.loads(json.dumps(obj))))
        paths = _provider_paths(json.loads(json.dumps(obj)))
        provider_ok = paths is None
        if path is None:
            agree = api_ok and decision.allowed and provider_ok
        else:
            agree = (
                not api_ok
                and api_names
                and not decision.allowed
                and path.split("[")[0] in decision.message
                and paths is not None
                and any(p == path or p.startswith((f"{path}[", f"{path}.")) for p in paths)
            )
        if not agree:
            disagreements.append(
                f"{case_id}: api {'accepts' if api_ok else 'refuses'}, webhook "
                f"{'accepts' if decision.allowed else 'refuses'} ({decision.message}), "
                f"provider {'accepts' if provider_ok else f'refuses {paths}'}"
            )
    assert not disagreements, "\n".join(disagreements)
