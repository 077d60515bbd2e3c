"""Process wiring: the only place where the services meet.

``dynvol node`` runs the CSI node plugin (:mod:`dynvol_csi`) and the node reconciler
(:mod:`dynvol_controllers`) in one process: the reconciler learns each pod's slot from the
plugin's published volumes and is nudged whenever kubelet publishes or unpublishes one.
The plugin's publish guard (:mod:`dynvol_csi.guards`) reads the pod and its class from the
apiserver through the same client (:class:`ApiLookup`); the full node process always has
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from dynvol.status import DEFAULT_METRICS_ADDRESS, status_server, until_started
from dynvol_controllers import NodeReconciler, NodeReconcilerSettings
from dynvol_core.errors import DynvolError
from dynvol_core.models import DynamicVolumeMount
from dynvol_core.mountinfo import unmount_order
from dynvol_core.paths import PodSlot, XvolsLayout
from dynvol_csi import NodePlugin, NodePluginConfig
from dynvol_csi.guards import DirectoryLookup, GuardUnavailable, PodGuard, PublishGuard
from dynvol_csi.mounting import lazy_unmount, read_mountinfo
from dynvol_csi.validation import PublishRequest
from dynvol_kube import APIError, APINotFound, Client, Metrics, run_until_signalled
from dynvol_kube.resources import CLASSES, PODS
from dynvol_providers import load_registry

log = logging.getLogger("dynvol.node")


@attrs.frozen(kw_only=True)
class NodeSettings:
    """What the node process needs beyond the CSI plugin's configuration."""

    kubeconfig: str | None
    reconciler: NodeReconcilerSettings
    blocked_plugins: tuple[str, ...] = ()


@attrs.frozen
class ApiLookup:
    """The publish guard's view of pods and classes: a GET each, so it is never stale.

    Read errors other than 404 become :class:`GuardUnavailable` (kubelet retries), so an
    apiserver outage refuses publishes rather than letting them through unchecked.
    """

    client: Client

    async def pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            obj: Mapping[str, Any] = await self.client.get(PODS, name, namespace=namespace)
        except APINotFound:
            return None
        except APIError as exc:
            raise GuardUnavailable(f"cannot read pod {namespace}/{name}: {exc}") from exc
        return obj

    async def storage_class(self, name: str) -> Mapping[str, Any] | None:
        try:
            obj: Mapping[str, Any] = await self.client.get(CLASSES, name)
        except APINotFound:
            return None
        except APIError as exc:
            raise GuardUnavailable(f"cannot read StorageProviderClass {name}: {exc}") from exc
        return obj


def api_guard(client: Client, node_id: str) -> PodGuard:
    """The publish guard of a node process that talks to the apiserver."""
    return PodGuard(ApiLookup(client), node_id)


#: ``--publish-guard`` of ``dynvol node --csi-only``: the apiserver, a directory, or none.
GUARD_API = "api"
GUARD_OBJECTS_PREFIX = "objects:"
GUARD_OFF = "off"


@attrs.frozen
class _Unchecked:
    """Lets every valid publish through: only for ``--csi-only --publish-guard off``.

    That mode runs no reconciler, so no DMP ever mounts storage into the slots it binds;
    the CSI integration tests and the benchmark use it to exercise the binding itself.
    """

    async def check(self, request: PublishRequest) -> None:
        return None


def parse_publish_guard(text: str) -> str:
    """Check a ``--publish-guard`` value; returns it unchanged.

    :raises ValueError: with the accepted forms.
    """
    if text in (GUARD_API, GUARD_OFF):
        return text
    if text.startswith(GUARD_OBJECTS_PREFIX) and text[len(GUARD_OBJECTS_PREFIX) :].startswith("/"):
        return text
    raise ValueError(
        f"--publish-guard {text!r}: use {GUARD_API!r} (read pods and classes from the "
        f"apiserver), '{GUARD_OBJECTS_PREFIX}/ABSOLUTE/DIR' (read them from JSON files) or "
        f"{GUARD_OFF!r} (check nothing; for tests and benchmarks)"
    )


async def serve_plugin_only(
    config: NodePluginConfig,
    *,
    publish_guard: str,
    kubeconfig: str | None,
    metrics_address: str = DEFAULT_METRICS_ADDRESS,
) -> int:
    """``dynvol node --csi-only``: the CSI plugin alone, with the publish guard chosen."""
    client: Client | None = None
    guard: PublishGuard
    metrics = Metrics()
    started = until_started(metrics)
    status = status_server(metrics_address, metrics)
    try:
        if publish_guard == GUARD_API:
            client = await Client.from_kubeconfig(
                kubeconfig, user_agent="dynvol-node", metrics=metrics
            )
            guard = api_guard(client, config.node_id)
        elif publish_guard.startswith(GUARD_OBJECTS_PREFIX):
            directory = Path(publish_guard[len(GUARD_OBJECTS_PREFIX) :])
            guard = PodGuard(DirectoryLookup(directory), config.node_id)
        else:
            log.warning(
                "--publish-guard off: NodePublishVolume does not check pods or classes "
                "(--csi-only runs no reconciler, so nothing is ever mounted into the slots)"
            )
            guard = _Unchecked()
        plugin = NodePlugin(config, guard, metrics=metrics)

        async def start() -> None:
            await status.start()
            await plugin.start()
            started()

        async def drain() -> None:
            plugin.close()
            try:
                await plugin.wait_closed()
            finally:
                plugin.abort()
                await status.close()

        await run_until_signalled(start, drain)
        return 0
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


def slot_lookup_for(plugin: NodePlugin, layout: XvolsLayout) -> Callable[[str], PodSlot | None]:
    """``slot_lookup(pod_uid)`` over the plugin's published volumes."""

    def lookup(pod_uid: str) -> PodSlot | None:
        for record in plugin.volumes.records().values():
            if record.pod_uid == pod_uid and record.phase == "published":
                return record.slot(layout)
        return None

    return lookup


def _unmount_orphan(layout: XvolsLayout, dvm: DynamicVolumeMount) -> None:
    """Lazily unmount what a DMP that is gone left at a mount's target on the host."""
    slot = layout.parse_slot(PurePosixPath(dvm.spec.slot_path))
    if slot is None:
        log.warning(
            "mount %s/%s names no slot of this node (%s); nothing to unmount",
            dvm.namespace,
            dvm.name,
            dvm.spec.slot_path,
        )
        return
    target = slot.target(dvm.spec.mountpoint)
    for mount_point in unmount_order(
        read_mountinfo(mentioning=[target]), target, include_self=True
    ):
        lazy_unmount(mount_point)


async def own_image(client: Client, *, container: str = "node") -> str:
    """The image of this pod's ``container`` (or its only container), read through
    ``$POD_NAME`` and ``$POD_NAMESPACE`` (the downward API): what the DMPs run unless told.

    One image for the node plugin and its DMPs keeps them at the same version, and lets an
    overlay change the image in one place (kustomize ``images:``, the chart's value).
    """
    name, namespace = os.environ.get("POD_NAME", ""), os.environ.get("POD_NAMESPACE", "")
    if not name or not namespace:
        raise DynvolError("--dmp-image is not set and $POD_NAME/$POD_NAMESPACE are not either")
    try:
        pod = await client.get(PODS, name, namespace=namespace)
    except APIError as exc:
        raise DynvolError(
            f"cannot read this pod ({namespace}/{name}) for its image: {exc}"
        ) from exc
    containers = (pod.get("spec") or {}).get("containers") or []
    named = [c_ for c_ in containers if c_.get("name") == container] or containers[:1]
    if not named or not named[0].get("image"):
        raise DynvolError(f"pod {namespace}/{name} has no container {container!r} with an image")
    return str(named[0]["image"])


async def serve_node(
    config: NodePluginConfig,
    settings: NodeSettings,
    *,
    metrics_address: str = DEFAULT_METRICS_ADDRESS,
) -> int:
    """Run the CSI node plugin and the node reconciler until signalled.

    First SIGTERM/SIGINT: stop reconciling, drain the CSI server, exit 0. Second: exit 1 at
    once (:func:`dynvol_kube.run_until_signalled`). The plugin starts first, because kubelet
    may be waiting on it; the reconciler stops first, so nothing is created for a node whose
    plugin is going away. The status server (``metrics_address``) starts before both and
    stops after them, so that the probes see the start-up and the drain.
    """
    layout = XvolsLayout(config.root)
    reconciler: NodeReconciler | None = None
    client: Client | None = None
    plugin: NodePlugin | None = None
    metrics = Metrics()
    started = until_started(metrics)
    status = status_server(metrics_address, metrics)

    async def start() -> None:
        nonlocal client, plugin, reconciler
        await status.start()
        # The client comes first: the plugin's publish guard reads through it.
        client = await Client.from_kubeconfig(
            settings.kubeconfig, user_agent="dynvol-node", metrics=metrics
        )
        plugin = NodePlugin(config, api_guard(client, config.node_id), metrics=metrics)
        await plugin.start()
        reconciler_settings = settings.reconciler
        if not reconciler_settings.dmp.image:
            image = await own_image(client)
            log.info("DMPs run this pod's image, %s", image)
            dmp = attrs.evolve(reconciler_settings.dmp, image=image)
            reconciler_settings = attrs.evolve(reconciler_settings, dmp=dmp)

        async def on_orphaned(dvm: DynamicVolumeMount) -> None:
            await asyncio.to_thread(_unmount_orphan, layout, dvm)

        reconciler = NodeReconciler(
            client,
            config.node_id,
            reconciler_settings,
            slot_lookup=slot_lookup_for(plugin, layout),
            registry=load_registry(blocked=settings.blocked_plugins),
            on_orphaned=on_orphaned,
        )
        plugin.volumes.add_listener(reconciler.nudge)
        await reconciler.start()
        started()
        log.info("dynvol node %s: reconciling", config.node_id)

    async def close() -> None:
        if reconciler is not None:
            with contextlib.suppress(Exception):
                await reconciler.close()
        if plugin is not None:
            plugin.close()
            with contextlib.suppress(Exception):
                await plugin.wait_closed()
            plugin.abort()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        await status.close()

    try:
        await run_until_signalled(start, close)
    except DynvolError as exc:
        log.error("dynvol node: %s", exc)
        return 1
    return 0
