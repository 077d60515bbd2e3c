"""Fixtures for the DMP agent tests: a slot layout, the agent as a real process in its own
mount namespace, a "container" mount namespace that sees the slot rslave, and helpers to
create DynamicVolumeMounts through the API and wait for their status.

Every process here is waited for, and every mount is undone by the fixtures' finalisers
(the ``rshared_dir`` fixture lazily unmounts its whole tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import mounts_under
from dynvol.testing.processes import Process
from dynvol_core import constants as c
from dynvol_core.dispatch import DmpSpec, dmp_pod_manifest, label_value
from dynvol_core.models import DynamicVolumeMount, MountSpec

DYNVOL = str(Path(sys.executable).with_name("dynvol"))
#: The node the test pods and mount pods are on (there is no kubelet: it is only a name).
NODE = "dmp-test-node"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first-level and deeper)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@attrs.define
class Slot:
    """A pod slot under an rshared root, and where a container sees it.

    The user pod (``pod_name``, ``pod_uid``, in ``namespace`` on :data:`NODE`) and the
    Pod object of the independent mount pod serving it (``dmp_name``, in the system
    namespace) exist in the API, as the node plugin would have made them: the agent reads
    its own Pod and checks every mount against them.
    """

    root: Path
    class_name: str
    pod_uid: str
    path: Path
    container_root: Path
    namespace: str = ""
    pod_name: str = ""
    dmp_name: str = ""


def user_pod_manifest(name: str, class_name: str, *, node: str = NODE) -> dict[str, Any]:
    """A user pod carrying the dynvol volume of ``class_name`` (as the webhook injects it)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "dmp-test"}},
        "spec": {
            "nodeName": node, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            "volumes": [{"name": c.VOLUME_NAME, "csi": {
                "driver": c.DRIVER_NAME, "readOnly": True,
                "volumeAttributes": {c.VOLUME_ATTR_CLASS: class_name,
                                     c.VOLUME_ATTR_POLICY: c.POLICY_INDEPENDENT}}}],
        },
    }  # fmt: skip


async def _ensure_namespace(core: Any, name: str) -> None:
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await core.create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


@pytest.fixture
async def slot(
    rshared_dir: Path, tmp_path: Path, kube_client: Any, namespace: str
) -> AsyncIterator[Slot]:
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    core = client.CoreV1Api(kube_client)
    class_name = f"s3-{secrets.token_hex(3)}"
    pod_name = f"app-{secrets.token_hex(3)}"
    pod = await core.create_namespaced_pod(namespace, user_pod_manifest(pod_name, class_name))
    pod_uid = pod.metadata.uid
    path = rshared_dir / "xvols" / class_name / str(uuid.uuid4()) / pod_uid
    path.mkdir(parents=True)
    dmp = DmpSpec(
        name=f"dmp-{secrets.token_hex(4)}", namespace=c.DEFAULT_SYSTEM_NAMESPACE,
        node_name=NODE, class_name=class_name, policy=c.POLICY_INDEPENDENT,
        image="registry.invalid/dynvol:test", host_path=str(path),
        pod_namespace=namespace, pod_name=pod_name, pod_uid=pod_uid,
    )  # fmt: skip
    await _ensure_namespace(core, c.DEFAULT_SYSTEM_NAMESPACE)
    await core.create_namespaced_pod(c.DEFAULT_SYSTEM_NAMESPACE, dmp_pod_manifest(dmp))
    # Outside the rshared tree, so the container's bind cannot propagate back to the host.
    container_root = tmp_path / "container-root"
    container_root.mkdir()
    try:
        yield Slot(
            rshared_dir, class_name, pod_uid, path, container_root,
            namespace=namespace, pod_name=pod_name, dmp_name=dmp.name,
        )  # fmt: skip
    finally:
        for ns, name in ((namespace, pod_name), (c.DEFAULT_SYSTEM_NAMESPACE, dmp.name)):
            with contextlib.suppress(ApiException):
                await core.delete_namespaced_pod(name, ns, grace_period_seconds=0)


@attrs.define
class Container:
    """A process in its own mount namespace with the slot bound rslave at its root path."""

    process: Process
    root: Path

    def sh(self, script: str, *, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.process.pid), "-m", "sh", "-c", script],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def read(self, relative: str) -> str | None:
        result = self.sh(f"cat '{self.root / relative}'")
        return result.stdout if result.returncode == 0 else None

    def mounts(self) -> list[str]:
        return mounts_under(self.root, pid=str(self.process.pid))


@pytest.fixture
def container(slot: Slot, tmp_path: Path) -> Iterator[Container]:
    ready = tmp_path / "container.ready"
    script = (
        f"mount --bind '{slot.path}' '{slot.container_root}' && "
        f"mount --make-rslave '{slot.container_root}' && touch '{ready}' && exec sleep 3600"
    )
    proc = Process.start(
        ["unshare", "-m", "--propagation", "unchanged", "sh", "-c", script],
        name="container", log=tmp_path / "container.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert proc.poll() is None, f"container setup failed{proc.log_tail()}"
            assert time.monotonic() < deadline, "container setup timed out"
            time.sleep(0.02)
        yield Container(proc, slot.container_root)
    finally:
        # Its mount namespace (and the binds in it) goes away with its last process.
        proc.stop(timeout=5)


@pytest.fixture
def writer(container: Container, tmp_path: Path) -> Iterator[Callable[[str], Process]]:
    """Starts a shell inside the container's mount namespace; stopped afterwards."""
    started: list[Process] = []

    def start(script: str) -> Process:
        proc = Process.start(
            ["nsenter", "-t", str(container.process.pid), "-m", "sh", "-c", script],
            name="writer", log=tmp_path / f"writer-{len(started)}.log",
        )  # fmt: skip
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop(timeout=5)


#: ``hold(path, seconds=..., first=..., then=...)``: see :func:`holder`.
Hold = Callable[..., Awaitable[Process]]


@pytest.fixture
def holder(writer: Callable[[str], Process], tmp_path: Path) -> Hold:
    """``await hold(path, seconds=S, first="a", then="b")``: a writer in the container that
    opens ``path`` for writing, writes the line ``first``, keeps the file open ``S`` seconds,
    then writes the line ``then`` and closes it (without ``then``: keeps it open until the
    test ends). Returns once the file is open, with the writer's process."""
    count = 0

    async def hold(
        path: Path, *, seconds: float = 120, first: str | None = None, then: str | None = None
    ) -> Process:
        nonlocal count
        count += 1
        opened = tmp_path / f"opened-{count}"
        script = f"exec 3> '{path}'"
        if first is not None:
            script += f" && echo {first} >&3"
        script += f" && touch '{opened}' && sleep {seconds:g}"
        if then is not None:
            script += f" && echo {then} >&3 && exec 3>&-"
        proc = writer(script)
        await wait_for_marker(opened, proc, what=f"the writer of {path} did not start")
        return proc

    return hold


@attrs.define
class AgentRunner:
    """Starts and stops ``dynvol dmp`` in its own mount namespace."""

    name: str
    kubeconfig: Path
    xvols: Path
    secrets_dir: Path
    work_dir: Path
    log: Path
    process: Process | None = None
    started: list[Process] = attrs.field(factory=list)

    def start(
        self,
        *,
        log_format: str | None = None,
        metrics_address: str | None = None,
        extra: Sequence[str] = (),
    ) -> Process:
        """Start the agent; ``log_format``, ``metrics_address`` and ``extra`` add options."""
        assert self.process is None
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        logging = ["--log-format", log_format] if log_format is not None else []
        serving = ["--metrics-address", metrics_address] if metrics_address is not None else []
        self.process = Process.start(
            ["unshare", "-m", "--propagation", "unchanged", DYNVOL, "--log-level", "DEBUG",
             *logging, "dmp", "--name", self.name, "--namespace", c.DEFAULT_SYSTEM_NAMESPACE,
             "--xvols", str(self.xvols), "--secrets-dir", str(self.secrets_dir),
             "--kubeconfig", str(self.kubeconfig), "--work-dir", str(self.work_dir),
             "--health-interval", "5", *serving, *extra],
            name="dynvol-dmp", env=env, log=self.log,
        )  # fmt: skip
        self.started.append(self.process)
        return self.process

    def daemons(self) -> list[int]:
        assert self.process is not None
        return [
            pid for pid in descendants(self.process.pid)
            if process_name(pid) in ("s3fs", "rclone")
        ]  # fmt: skip

    def stop(self, *, timeout: float = 30.0) -> int:
        assert self.process is not None
        proc, self.process = self.process, None
        orphans = descendants(proc.pid)
        status = proc.stop(timeout=timeout)
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return status

    def log_tail(self) -> str:
        return self.started[-1].log_tail(60) if self.started else ""


@pytest.fixture
def agent_factory(
    control_plane: Any, slot: Slot, tmp_path: Path
) -> Iterator[Callable[[dict[str, str]], AgentRunner]]:
    runners: list[AgentRunner] = []

    def make(secret_data: dict[str, str]) -> AgentRunner:
        secrets_dir = tmp_path / f"secrets-{len(runners)}"
        secrets_dir.mkdir(mode=0o700)
        for key, value in secret_data.items():
            (secrets_dir / key).write_text(value)
        runner = AgentRunner(
            name=slot.dmp_name,  # the mount pod whose Pod object the slot fixture made
            kubeconfig=control_plane.kubeconfig,
            xvols=slot.path,
            secrets_dir=secrets_dir,
            work_dir=tmp_path / f"work-{len(runners)}",
            log=tmp_path / f"dmp-{len(runners)}.log",
        )
        runners.append(runner)
        return runner

    try:
        yield make
    finally:
        for runner in runners:
            if runner.process is not None:
                runner.stop(timeout=20)


@attrs.define
class Mounts:
    """Create, read and wait for DynamicVolumeMounts through the API."""

    api: Any
    namespace: str
    classes: list[str] = attrs.field(factory=list)

    @property
    def custom(self) -> Any:
        from kubernetes_asyncio import client

        return client.CustomObjectsApi(self.api)

    async def create_class(
        self,
        parameters: dict[str, str] | None = None,
        *,
        name: str,
        allowed_namespaces: list[str] | None = None,
        provider: str = "s3",
    ) -> str:
        # MinIO listens on 127.0.0.1: the class must allow loopback endpoints.
        spec: dict[str, Any] = {
            "provider": provider,
            "parameters": parameters or {},
            "connection": {"allowLoopback": True},
        }
        if allowed_namespaces is not None:
            spec["allowedNamespaces"] = allowed_namespaces
        await self.custom.create_cluster_custom_object(
            c.GROUP, c.VERSION, c.PLURAL_CLASS,
            {"apiVersion": c.API_VERSION, "kind": c.KIND_CLASS, "metadata": {"name": name},
             "spec": spec},
        )  # fmt: skip
        self.classes.append(name)
        return name

    async def create_claim(
        self, config: dict[str, Any], mountpoint: str, *, provider: str = "s3"
    ) -> tuple[str, str]:
        """A claim (its name and UID) as the user would write it."""
        name = f"claim-{secrets.token_hex(4)}"
        obj = await self.custom.create_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.PLURAL_CLAIM,
            {"apiVersion": c.API_VERSION, "kind": c.KIND_CLAIM,
             "metadata": {"name": name, "namespace": self.namespace},
             "spec": {"storageProvider": provider, "mountpoint": mountpoint,
                      f"{provider}Config": config,
                      "selector": {"matchLabels": {"app": "dmp-test"}}}},
        )  # fmt: skip
        return name, obj["metadata"]["uid"]

    async def edit(self, name: str, **fields: Any) -> None:
        """Change spec fields of the DynamicVolumeMount ``name`` in place, as the node
        plugin does when its claim changes (``fields`` by their wire names)."""
        await self.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.PLURAL_MOUNT, name, {"spec": fields},
            _content_type="application/merge-patch+json",
        )  # fmt: skip

    async def create(
        self,
        *,
        slot: Slot,
        config: dict[str, Any],
        mountpoint: str = "/data",
        read_only: bool = False,
        **changes: Any,
    ) -> str:
        """A DynamicVolumeMount of a new claim into ``slot``'s pod, assigned to its mount
        pod, as the node plugin writes it; ``changes`` override spec fields (a forgery)."""
        name = f"dvm-{secrets.token_hex(4)}"
        provider = changes.pop("provider", "s3")
        claim_name, claim_uid = await self.create_claim(config, mountpoint, provider=provider)
        spec = MountSpec(
            claim_name=claim_name, claim_uid=claim_uid, pod_name=slot.pod_name,
            pod_uid=slot.pod_uid, node_name=NODE, dmp_name=slot.dmp_name, provider=provider,
            storage_provider_class=slot.class_name, config=config, read_only=read_only,
            mountpoint=mountpoint, slot_path=str(slot.path),
            dmp_target_path=f"{c.DMP_XVOLS_DIR}{mountpoint}",
        )  # fmt: skip
        dvm = DynamicVolumeMount(
            name=name,
            namespace=self.namespace,
            labels={c.LABEL_DMP: label_value(slot.dmp_name)},
            spec=attrs.evolve(spec, **changes),
        )
        await self.custom.create_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.PLURAL_MOUNT, dvm.to_object()
        )
        return name

    async def events(self, name: str) -> list[dict[str, Any]]:
        """The Events about the DynamicVolumeMount ``name``."""
        from kubernetes_asyncio import client

        listing = await client.CoreV1Api(self.api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [self.api.sanitize_for_serialization(e) for e in listing.items]

    async def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, self.namespace, c.PLURAL_MOUNT, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def delete(self, name: str) -> None:
        await self.custom.delete_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.PLURAL_MOUNT, name
        )

    async def wait(
        self,
        name: str,
        predicate: Callable[[dict[str, Any] | None], bool],
        *,
        limit: float = 30.0,
        what: str = "condition",
        agent: AgentRunner | None = None,
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + limit
        while True:
            obj = await self.get(name)
            if predicate(obj):
                return obj
            if time.monotonic() > deadline:
                status = (obj or {}).get("status")
                logs = agent.log_tail() if agent is not None else ""
                raise AssertionError(f"timed out waiting for {what}; status={status}{logs}")
            await asyncio.sleep(0.1)

    async def cleanup(self) -> None:
        """Drop finalizers of whatever is left, so the namespace can go."""
        from kubernetes_asyncio.client.exceptions import ApiException

        listing = await self.custom.list_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.PLURAL_MOUNT
        )
        for obj in listing.get("items", []):
            with contextlib.suppress(ApiException):
                await self.custom.patch_namespaced_custom_object(
                    c.GROUP, c.VERSION, self.namespace, c.PLURAL_MOUNT,
                    obj["metadata"]["name"], {"metadata": {"finalizers": None}},
                    _content_type="application/merge-patch+json",
                )  # fmt: skip
                await self.delete(obj["metadata"]["name"])
        for name in self.classes:
            with contextlib.suppress(ApiException):
                await self.custom.delete_cluster_custom_object(
                    c.GROUP, c.VERSION, c.PLURAL_CLASS, name
                )


def phase_is(phase: str) -> Callable[[dict[str, Any] | None], bool]:
    return lambda obj: obj is not None and (obj.get("status") or {}).get("phase") == phase


def gone(obj: dict[str, Any] | None) -> bool:
    """The predicate for :meth:`Mounts.wait` that a DynamicVolumeMount was released."""
    return obj is None


def ready_condition(obj: dict[str, Any] | None) -> dict[str, Any]:
    """The Ready condition of the DynamicVolumeMount ``obj`` (which must have one)."""
    assert obj is not None
    conditions: list[dict[str, Any]] = obj["status"]["conditions"]
    return {x["type"]: x for x in conditions}["Ready"]


def ready_reason(obj: dict[str, Any] | None) -> str:
    """The reason of the Ready condition of ``obj``, or "" while it has none."""
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("reason", ""))
    return ""


def files_open(obj: dict[str, Any] | None) -> bool:
    """The mount waits in phase Unmounting for a file open in it (reason FilesOpen)."""
    return (
        obj is not None
        and (obj.get("status") or {}).get("phase") == "Unmounting"
        and ready_reason(obj) == "FilesOpen"
    )


async def finished(proc: Process, *, within: float, what: str = "the writer") -> None:
    """Wait until ``proc`` exits by itself, within ``within`` seconds, with status 0."""
    await eventually(
        lambda: proc.poll() is not None, what=f"{what} to finish", within=within, interval=0.1
    )
    assert proc.poll() == 0, proc.log_tail()


async def eventually(
    check: Callable[[], Any],
    *,
    what: str,
    within: float = 30.0,
    interval: float = 0.05,
    agent: AgentRunner | None = None,
) -> Any:
    """Call ``check`` (in a thread) until it returns something true, and return that;
    fail after ``within`` seconds naming ``what`` (and with ``agent``'s log tail)."""
    deadline = time.monotonic() + within
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            logs = agent.log_tail() if agent is not None else ""
            raise AssertionError(f"timed out waiting for {what}{logs}")
        await asyncio.sleep(interval)


async def wait_for_marker(marker: Path, proc: Process, *, what: str, within: float = 10.0) -> None:
    """Wait until ``proc`` (which must keep running meanwhile) created the file ``marker``."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(marker.exists):
        assert proc.poll() is None, proc.log_tail()
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def assign(
    mounts: Mounts,
    slot: Slot,
    agent: AgentRunner,
    config: dict[str, Any],
    *,
    mountpoint: str = "/data",
    provider: str = "s3",
    class_parameters: dict[str, str] | None = None,
    read_only: bool = False,
    what: str = "Mounted",
    agent_args: Sequence[str] = (),
) -> str:
    """Create the slot's class, start ``agent`` (with ``agent_args``), assign it a
    DynamicVolumeMount of ``config`` at ``mountpoint`` and wait until it is Mounted; the
    mount's name."""
    await mounts.create_class(class_parameters, name=slot.class_name, provider=provider)
    agent.start(extra=agent_args)
    name = await mounts.create(
        slot=slot, config=config, mountpoint=mountpoint, read_only=read_only, provider=provider
    )
    await mounts.wait(name, phase_is("Mounted"), what=what, agent=agent)
    return name


async def release(
    mounts: Mounts, name: str, agent: AgentRunner, *, limit: float = 30.0, what: str = "released"
) -> None:
    """Delete the DynamicVolumeMount ``name`` and wait until its finalizer let it go."""
    await mounts.delete(name)
    await mounts.wait(name, gone, limit=limit, what=what, agent=agent)


def assert_nothing_mounted(slot: Slot, agent: AgentRunner) -> None:
    """No mount is left below the slot on the host, and no FUSE daemon under the agent."""
    assert mounts_under(slot.path) == []
    assert agent.daemons() == []


def assert_no_mounter_files(agent: AgentRunner) -> None:
    """No mounter's files (credentials among them) are left in the agent's work dir."""
    assert [p.name for p in agent.work_dir.iterdir()] == [".staging"]
    assert list((agent.work_dir / ".staging").iterdir()) == []


def assert_read_only(container: Container, relative: str) -> None:
    """Writing ``relative`` below the container's root fails: the file system is read-only."""
    result = container.sh(f"echo x > '{container.root / relative}'")
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr


@pytest.fixture
async def mounts(kube_client: Any, namespace: str) -> AsyncIterator[Mounts]:
    helper = Mounts(kube_client, namespace)
    try:
        yield helper
    finally:
        await helper.cleanup()


@pytest.fixture
def s3_keys(minio: MinioServer) -> dict[str, str]:
    return {"access-key-id": minio.access_key, "secret-access-key": minio.secret_key}
