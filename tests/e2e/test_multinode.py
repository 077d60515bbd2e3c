"""dynvol end to end on three real nodes (``dynvol.testing.cluster``), from the base manifests.

Each node is its own kubelet, containerd and kube-proxy in its own network and mount
namespaces; pods talk across nodes over the pod network and reach the apiserver and the
webhook through Services, as on a real cluster. dynvol is the base of ``manifests/base``
with the local image; the controller makes its own webhook certificate
(:mod:`dynvol.testing.cluster.deploying`). MinIO listens on the node network's host
address (10.233.0.1), where the DMPs reach it. CoreDNS behind ``kube-dns``
(:mod:`dynvol.testing.cluster.dns`) resolves the cluster's names for every pod.

Every case reads and writes real data from inside containers and checks the bucket from
outside. After each case the fixture waits until no DVM, DMP or mount of the test is left
on any node (read from each node's own mount table).

Run it with ``make test-multinode`` (which sets ``DYNVOL_MULTINODE_E2E=1`` and takes the
machine's cluster lock); the plain e2e tier skips this file.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing import MinioServer
from dynvol.testing.cluster import deploying
from dynvol.testing.cluster.addressing import (
    DNS_SERVICE_ADDRESS,
    HOST_ADDRESS,
    KUBERNETES_SERVICE_ADDRESS,
)
from tests.e2e.conftest import Storage, wait_for
from tests.e2e.nodes import NODES, Cluster, deployed_cluster

pytestmark = pytest.mark.e2e

SYSTEM_NAMESPACE = deploying.SYSTEM_NAMESPACE
XVOLS = "/var/lib/dynamic/xvols"
#: The dynvol image under a second tag: what the node DaemonSet rolls to.
ROLLOUT_IMAGE = "localhost/dynvol/dynvol:rollout"
NODE_PODS = "app.kubernetes.io/name=dynvol,app.kubernetes.io/component=node"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("DYNVOL_MULTINODE_E2E") != "1":
        pytest.skip("three nodes take minutes and most of the CPU: run 'make test-multinode'")
    with deployed_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def node_minio(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[MinioServer]:
    """MinIO on the node network's host address (the bridge exists once the cluster is up)."""
    server = MinioServer(dir=tmp_path_factory.mktemp("minio-multinode"), host=str(HOST_ADDRESS))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class NodesStorage(Storage):
    """A test's namespace, class and bucket on the multi-node cluster."""

    cluster: Cluster
    #: MinIO is on the node network's host address, a private one.
    connection = {"allowPrivateNetworks": True}

    def node_mounts(self, node: str) -> list[str]:
        return self.cluster.node_mounts(node, f"{XVOLS}/{self.class_name}")

    def wait_nothing_left(self) -> None:
        """Wait until no mount of the class is left on any live node."""
        # A lost node's mounts went with it (its mount table is what it was when it died).
        live = {n["metadata"]["name"] for n in self.cluster.items("nodes")}
        for node in sorted(live & set(NODES)):
            wait_for(
                lambda node=node: not self.node_mounts(node),  # type: ignore[misc]
                60,
                f"no mount of class {self.class_name} is left on {node}",
            )


@pytest.fixture
def storage(
    cluster: Cluster, node_minio: MinioServer, request: pytest.FixtureRequest
) -> Iterator[NodesStorage]:
    policy = getattr(request, "param", "independent")
    s = NodesStorage(cluster, node_minio, policy=policy)  # type: ignore[arg-type]
    s.create()
    try:
        yield s
    finally:
        s.destroy()


# --------------------------------------------------------------------------- helpers


def _body(tag: str) -> str:
    return f"{tag} {uuid.uuid4().hex}\n"


def _spread(storage: NodesStorage, name: str, replicas: int) -> dict[str, Any]:
    """A Deployment of ``replicas`` spread evenly over the nodes (at most one apart)."""
    obj = storage.workload("Deployment", name, {"app": name})
    obj["spec"]["replicas"] = replicas
    obj["spec"]["template"]["spec"]["topologySpreadConstraints"] = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            # A cordoned (drained) node is not a place to spread to: without this it still
            # counts, with no pods, and the pods moved off it stay Pending.
            "nodeTaintsPolicy": "Honor",
            "labelSelector": {"matchLabels": {"e2e-workload": name}},
        }
    ]
    return obj


def _node_of(storage: NodesStorage, selector: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in storage.pods(selector)}


def _dmp_nodes(storage: NodesStorage) -> list[str]:
    return sorted(
        p["spec"].get("nodeName", "")
        for p in storage.dmps()
        if not p["metadata"].get("deletionTimestamp")
    )


def _counts(storage: NodesStorage, claim: str) -> tuple[Any, Any, Any]:
    status = storage.claim_status(claim)
    return status.get("matchedPods"), status.get("mountedPods"), status.get("failedPods") or 0


def _all_read_and_write(storage: NodesStorage, pods: list[str], tag: str) -> None:
    """Every pod reads one object through the mount and writes its own; the bucket has them."""
    body = _body(tag)
    storage.put(f"{tag}.txt", body)
    for pod in pods:
        storage.wait_content(pod, f"/dynamic/data/{tag}.txt", body)
        storage.sh(pod, f"echo from {pod} > /dynamic/data/{tag}-{pod}.txt")
    for pod in pods:
        assert storage.get(f"{tag}-{pod}.txt") == f"from {pod}\n", pod


# --------------------------------------------------------------------------- cases


def test_one_claim_mounts_in_six_replicas_over_three_nodes(storage: NodesStorage) -> None:
    storage.cluster.apply(_spread(storage, "web", 6))
    bystander = storage.workload("Pod", "bystander", {"app": "other"})
    bystander["spec"]["nodeName"] = "node-3"
    storage.cluster.apply(bystander)
    pods = storage.wait_ready("app=web", 6)
    storage.wait_ready("app=other", 1)
    where = _node_of(storage, "app=web")
    assert sorted(where.values()) == sorted([*NODES, *NODES]), f"two per node: {where}"

    began = storage.claim("web", mountpoint="/data", selector={"app": "web"})
    _all_read_and_write(storage, pods, "six")
    print(f"claim -> data in 6 pods on 3 nodes: {time.monotonic() - began:.1f}s")

    # Independent policy: one DMP per matched pod, on that pod's node, none elsewhere.
    wait_for(lambda: len(_dmp_nodes(storage)) == 6, 60, "six DMPs exist")
    assert _dmp_nodes(storage) == sorted(where.values())
    dvms = [d for d in storage.dvms() if d["spec"]["claimName"] == "web"]
    assert sorted(d["spec"]["nodeName"] for d in dvms) == sorted(where.values())
    assert {d["spec"]["podName"] for d in dvms} == set(pods), "no DVM for the bystander"
    wait_for(lambda: _counts(storage, "web") == (6, 6, 0), 60, "the claim counts 6 of 6")
    assert storage.exec("bystander", "test -e /dynamic/data").returncode != 0
    for node in NODES:
        assert storage.node_mounts(node), f"{node} has the class's mounts in its own table"


def test_nodes_share_no_mounts(cluster: Cluster) -> None:
    """Each node's /var/lib/kubelet is its own: no pod volume of one is in another's table."""
    uids: dict[str, set[str]] = {}
    for node in NODES[:2]:
        points = cluster.node_mounts(node, "/var/lib/kubelet/pods")
        uids[node] = {p.split("/")[5] for p in points if p.count("/") > 5}
        assert uids[node], f"{node} has pod volumes mounted (the node plugin's at least)"
    assert not uids["node-1"] & uids["node-2"]
    host = Path("/proc/self/mountinfo").read_text()
    assert not any(uid in host for uid in uids["node-1"]), "no pod volume is on the host"
    assert str(cluster.dir / "nodes") not in host, "nothing of a node is mounted on the host"


#: Run in a pod of the dynvol image (glibc's resolver, Python): resolves NAME through the
#: pod's resolv.conf, GETs https://NAME/healthz checking the certificate against CA (the
#: webhook configuration's caBundle) and the name, and asks the cluster DNS directly for a
#: name outside the cluster, printing the response code.
_DNS_PROBE = """
import json, socket, ssl, struct, sys, urllib.request
name, ca, server, outside = sys.argv[1:5]
out = {"address": socket.gethostbyname(name)}
ctx = ssl.create_default_context(cadata=ca)
with urllib.request.urlopen(f"https://{name}/healthz", context=ctx, timeout=10) as resp:
    out["status"] = resp.status
query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(p)]) + p.encode() for p in outside.split(".")) + b"\\0"
query += struct.pack(">HH", 1, 1)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(5)
    sock.sendto(query, (server, 53))
    reply = sock.recv(512)
ident, flags, _, answers = struct.unpack(">HHHH", reply[:8])
out.update(id=ident, rcode=flags & 0xF, answers=answers)
print(json.dumps(out))
"""


def test_pods_on_every_node_resolve_cluster_names_and_nothing_else(cluster: Cluster) -> None:
    """Every node's pods get the cluster DNS in resolv.conf; the apiserver's and the
    webhook's Service names resolve to their ClusterIPs, the webhook answers by name with a
    certificate for it, and a name outside the cluster is refused (nothing is forwarded)."""
    namespace = f"dns-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        for node in NODES:
            cluster.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"probe-{node}", "namespace": namespace},
                    "spec": {
                        "nodeName": node,
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {
                                "name": "main",
                                "image": deploying.IMAGE,
                                "imagePullPolicy": "Never",
                                "command": ["sleep", "infinity"],
                            }
                        ],
                    },
                }
            )
        cluster.kubectl(
            "-n", namespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=120s",
            timeout=130,
        )  # fmt: skip
        webhook = cluster.get("service", deploying.WEBHOOK_SERVICE, SYSTEM_NAMESPACE)
        webhook_ip = webhook["spec"]["clusterIP"]
        hooks = cluster.items("mutatingwebhookconfigurations")
        bundles = {
            h["clientConfig"]["caBundle"]
            for c in hooks
            for h in c.get("webhooks", [])
            if h["clientConfig"].get("service", {}).get("name") == deploying.WEBHOOK_SERVICE
        }
        assert len(bundles) == 1, f"one caBundle for the webhook Service: {bundles}"
        ca = base64.b64decode(bundles.pop()).decode()
        short = f"{deploying.WEBHOOK_SERVICE}.{SYSTEM_NAMESPACE}.svc"
        for node in NODES:
            pod = f"probe-{node}"

            def run(*argv: str, pod: str = pod) -> subprocess.CompletedProcess[str]:
                return cluster.kubectl(
                    "-n", namespace, "exec", pod, "--", *argv, check=False, timeout=60
                )  # fmt: skip

            resolv = run("cat", "/etc/resolv.conf").stdout
            assert f"nameserver {DNS_SERVICE_ADDRESS}" in resolv.splitlines(), resolv
            assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in (
                resolv
            ), resolv
            full = run("getent", "hosts", "kubernetes.default.svc.cluster.local")
            assert full.returncode == 0, f"{node}: {full.stderr}"
            assert full.stdout.split()[0] == str(KUBERNETES_SERVICE_ADDRESS), full.stdout
            # The short name goes through the search list, as in any pod.
            hook = run("getent", "hosts", short)
            assert hook.returncode == 0, f"{node}: {hook.stderr}"
            assert hook.stdout.split()[0] == webhook_ip, hook.stdout
            outside = run("getent", "hosts", "example.com")
            assert outside.returncode != 0, outside.stdout
            assert not outside.stdout.strip(), outside.stdout
            probe = run(
                "python3", "-c", _DNS_PROBE, short, ca, str(DNS_SERVICE_ADDRESS), "example.com"
            )  # fmt: skip
            assert probe.returncode == 0, f"{node}: {probe.stderr}"
            got = json.loads(probe.stdout)
            assert got["address"] == webhook_ip
            assert got["status"] == 200, f"{node}: the webhook answers by its Service name"
            # REFUSED (5): no server block for the name and no forwarder to ask.
            assert (got["id"], got["rcode"], got["answers"]) == (0x1234, 5, 0), got
    finally:
        cluster.kubectl(
            "delete", "namespace", namespace, "--wait=true", "--timeout=120s",
            check=False, timeout=130,
        )  # fmt: skip


@pytest.mark.parametrize("storage", ["shared"], indirect=True)
def test_shared_policy_one_dmp_per_node_and_class(storage: NodesStorage) -> None:
    storage.cluster.apply(_spread(storage, "team", 6))
    pods = storage.wait_ready("app=team", 6)
    storage.claim("team", mountpoint="/data", selector={"app": "team"})
    _all_read_and_write(storage, pods, "shared")
    wait_for(lambda: _dmp_nodes(storage) == list(NODES), 60, "one shared DMP on each node")
    wait_for(lambda: _counts(storage, "team") == (6, 6, 0), 60, "the claim counts 6 of 6")
    dvms = [d for d in storage.dvms() if d["spec"]["claimName"] == "team"]
    by_node: dict[str, set[str]] = {}
    for d in dvms:
        by_node.setdefault(d["spec"]["nodeName"], set()).add(d["spec"]["dmpName"])
    assert sorted(by_node) == list(NODES)
    assert all(len(names) == 1 for names in by_node.values()), f"one DMP per node: {by_node}"


def test_scale_up_and_down_across_nodes(storage: NodesStorage) -> None:
    cluster = storage.cluster
    obj = storage.workload("Deployment", "grow", {"app": "grow"})
    obj["spec"]["replicas"] = 2
    try:
        # Start on node-1 only; the others join when the Deployment grows.
        cluster.kubectl("cordon", "node-2", "node-3")
        cluster.apply(obj)
        pods = storage.wait_ready("app=grow", 2)
        assert set(_node_of(storage, "app=grow").values()) == {"node-1"}
        storage.claim("grow", mountpoint="/data", selector={"app": "grow"})
        _all_read_and_write(storage, pods, "first")
        wait_for(lambda: _dmp_nodes(storage) == ["node-1", "node-1"], 60, "DMPs on node-1 only")

        # The new pods can only go to the nodes that had none.
        cluster.kubectl("uncordon", "node-2", "node-3")
        cluster.kubectl("cordon", "node-1")
        cluster.kubectl("-n", storage.namespace, "scale", "deployment/grow", "--replicas=6")
        pods = storage.wait_ready("app=grow", 6, timeout=180)
    finally:
        cluster.kubectl("uncordon", *NODES, check=False)
    where = _node_of(storage, "app=grow")
    assert set(where.values()) == set(NODES), f"pods on every node: {where}"
    _all_read_and_write(storage, pods, "grown")
    wait_for(lambda: _counts(storage, "grow") == (6, 6, 0), 60, "the claim counts 6 of 6")
    wait_for(lambda: _dmp_nodes(storage) == sorted(where.values()), 60, "a DMP beside each pod")

    cluster.kubectl("-n", storage.namespace, "scale", "deployment/grow", "--replicas=1")
    wait_for(lambda: len(storage.pods("app=grow")) == 1, 120, "one pod is left")
    (left,) = storage.wait_ready("app=grow", 1)
    (node,) = _node_of(storage, "app=grow").values()
    wait_for(lambda: _dmp_nodes(storage) == [node], 120, f"the only DMP is on {node}")
    wait_for(lambda: _counts(storage, "grow") == (1, 1, 0), 60, "the claim counts 1 of 1")
    for other in set(NODES) - {node}:
        wait_for(lambda o=other: not storage.node_mounts(o), 60, f"{other} has no mount left")  # type: ignore[misc]
    _all_read_and_write(storage, [left], "shrunk")


def test_drain_moves_pods_with_their_mounts_and_leaves_nothing(storage: NodesStorage) -> None:
    storage.cluster.apply(_spread(storage, "drain", 3))
    storage.claim("drain", mountpoint="/data", selector={"app": "drain"})
    pods = storage.wait_ready("app=drain", 3)
    _all_read_and_write(storage, pods, "before")
    drained = "node-2"
    try:
        done = storage.cluster.kubectl(
            "drain", drained, "--ignore-daemonsets", "--delete-emptydir-data",
            "--timeout=180s", timeout=200, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"the drain was blocked: {done.stderr}"
        wait_for(
            lambda: (
                len(storage.pods("app=drain")) == 3
                and drained not in _node_of(storage, "app=drain").values()
            ),
            120,
            "the three pods run on the other nodes",
        )
        pods = storage.wait_ready("app=drain", 3)
        _all_read_and_write(storage, pods, "after")
        assert storage.get("before.txt") is not None
        wait_for(lambda: drained not in _dmp_nodes(storage), 60, f"no DMP on {drained}")
        wait_for(
            lambda: not [d for d in storage.dvms() if d["spec"]["nodeName"] == drained],
            60,
            f"no DVM on {drained}",
        )
        wait_for(lambda: not storage.node_mounts(drained), 60, f"no mount on {drained}")
        wait_for(lambda: _counts(storage, "drain") == (3, 3, 0), 60, "the claim counts 3 of 3")
    finally:
        storage.cluster.kubectl("uncordon", drained, check=False)


#: The rolling-update case's workload: the container's own process (a process started by
#: ``kubectl exec`` ends with its session) waits for the expected content, then reads the
#: claim's file (and lists its directory) every ~50 ms, counts the reads (a byte each) and
#: logs every failure or wrong content with the time, until told to stop.
_READER = r"""
trap 'exit 143' TERM
f=/dynamic/data/roll.txt
while [ ! -e /tmp/reader.want ]; do sleep 0.2; done
want=$(cat /tmp/reader.want)
while [ ! -e /tmp/reader.stop ]; do
  if ! out=$(cat "$f" 2>&1); then
    echo "$(date +%T) up=$(cut -d' ' -f1 /proc/uptime) read failed: $out" >> /tmp/reader.err
  elif [ "$out" != "$want" ]; then
    echo "$(date +%T) up=$(cut -d' ' -f1 /proc/uptime) wrong content: $out" >> /tmp/reader.err
  fi
  if ! ls /dynamic/data > /dev/null 2>/tmp/reader.ls; then
    echo "$(date +%T) up=$(cut -d' ' -f1 /proc/uptime) list failed: $(cat /tmp/reader.ls)" \
      >> /tmp/reader.err
  fi
  printf . >> /tmp/reader.reads
  sleep 0.05
done
while true; do sleep 1; done
"""


def _reader_state(storage: NodesStorage, pod: str) -> tuple[int, str]:
    """How many reads the pod's reader loop made, and what it logged."""
    out = storage.sh(
        pod,
        "wc -c < /tmp/reader.reads 2>/dev/null || echo 0; echo ---;"
        " cat /tmp/reader.err 2>/dev/null || true",
    )
    head, _, errors = out.partition("---\n")
    return int(head.strip()), errors.strip()


def _readers_run(storage: NodesStorage, pods: list[str]) -> dict[str, tuple[int, str]]:
    """Every reader's state, after checking that each one still reads (its count grows)."""
    first = {pod: _reader_state(storage, pod) for pod in pods}
    time.sleep(1.5)
    now = {pod: _reader_state(storage, pod) for pod in pods}
    for pod in pods:
        assert now[pod][0] > first[pod][0], f"{pod}'s reader loop reads: {first[pod]} {now[pod]}"
    return now


def _node_pods(cluster: Cluster) -> dict[str, tuple[str, str, bool]]:
    """node -> (pod name, image, ready) of dynvol's node plugin pods not being deleted."""
    found = {}
    for pod in cluster.items("pods", "-n", SYSTEM_NAMESPACE, "-l", NODE_PODS):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod.get("status", {}).get("conditions", [])
        )
        found[pod["spec"].get("nodeName", "")] = (
            pod["metadata"]["name"],
            container["image"],
            ready,
        )
    return found


def test_rolling_update_of_the_node_plugin_keeps_every_mount_readable(
    storage: NodesStorage,
) -> None:
    """Issue 10: the node DaemonSet rolls to a new image node by node (maxUnavailable 1)
    while a reader loop in a pod on every node reads the claim's file every ~50 ms; no
    read fails (no ENOTCONN), the content stays right, and new claims mount afterwards."""
    cluster = storage.cluster
    workload = _spread(storage, "roll", 3)
    (main,) = workload["spec"]["template"]["spec"]["containers"]
    main["command"] = ["sh", "-c", _READER]
    storage.cluster.apply(workload)
    storage.claim("roll", mountpoint="/data", selector={"app": "roll"})
    pods = storage.wait_ready("app=roll", 3)
    assert sorted(_node_of(storage, "app=roll").values()) == list(NODES)
    body = _body("roll")
    storage.put("roll.txt", body)
    for pod in pods:
        storage.wait_content(pod, "/dynamic/data/roll.txt", body)
        storage.sh(
            pod,
            f"printf '%s' {shlex.quote(body.rstrip())} > /tmp/reader.new"
            " && mv /tmp/reader.new /tmp/reader.want",
        )
    restarts = {p["metadata"]["uid"] for p in storage.pods("app=roll")}
    before = _readers_run(storage, pods)
    for pod, (count, errors) in before.items():
        assert count > 0, f"{pod}'s reader reads: {before[pod]}"
        assert not errors, f"{pod}'s reader reads cleanly: {before[pod]}"

    # The same image under a second tag on every node: a new template, so a real rollout.
    for node in NODES:
        sock = str(cluster.layout.node(node).containerd_sock)
        subprocess.run(
            ["ctr", "--address", sock, "-n", "k8s.io", "images", "tag", "--force",
             deploying.IMAGE, ROLLOUT_IMAGE],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    old = _node_pods(cluster)
    assert sorted(old) == list(NODES)
    assert all(i == deploying.IMAGE for _, i, _ in old.values()), old
    ds = cluster.get("daemonset", "dynvol-node", SYSTEM_NAMESPACE)
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    began = time.monotonic()
    cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "set", "image", "daemonset/dynvol-node", f"node={ROLLOUT_IMAGE}"
    )  # fmt: skip
    updated: dict[str, float] = {}
    most_unavailable = 0
    while len(updated) < len(NODES):
        assert time.monotonic() - began < 240, f"the rollout is stuck; updated: {updated}"
        now = _node_pods(cluster)
        unavailable = [n for n in NODES if n not in now or not now[n][2]]
        most_unavailable = max(most_unavailable, len(unavailable))
        for node, (name, image, ready) in now.items():
            if image == ROLLOUT_IMAGE and ready and node not in updated:
                assert name != old[node][0]
                updated[node] = time.monotonic() - began
        time.sleep(0.3)
    cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "rollout", "status", "daemonset/dynvol-node", "--timeout=60s",
        timeout=70,
    )  # fmt: skip
    took = time.monotonic() - began
    order = sorted(updated, key=updated.__getitem__)
    print(f"node plugin rolled node by node in {took:.1f}s: {[(n, updated[n]) for n in order]}")
    assert most_unavailable <= 1, "at most one node was without a ready node plugin at a time"
    assert len(set(updated.values())) == len(NODES), f"one node after another: {updated}"

    after = _readers_run(storage, pods)
    for pod in pods:
        count, errors = after[pod]
        assert not errors, f"{pod}'s reader logged failures during the rollout:\n{errors}"
        # Each loop read all along the rollout (at least once a second; it aims at 20).
        assert count - before[pod][0] >= took, f"{pod} read {count - before[pod][0]} times"
    assert {p["metadata"]["uid"] for p in storage.pods("app=roll")} == restarts
    assert not any(
        c.get("restartCount") for p in storage.pods("app=roll")
        for c in p["status"].get("containerStatuses", [])
    ), "no workload container restarted"  # fmt: skip
    assert storage.get("roll.txt") == body, "the data is intact in the bucket"
    # The old mounts still carry new data both ways, and a new claim mounts.
    _all_read_and_write(storage, pods, "rolled")
    _move_dmps_to_the_new_image(storage, pods, after)
    for pod in pods:
        storage.sh(pod, "touch /tmp/reader.stop")
    storage.cluster.apply(_spread(storage, "fresh", 3))
    storage.claim("fresh", mountpoint="/data", selector={"app": "fresh"})
    fresh = storage.wait_ready("app=fresh", 3)
    _all_read_and_write(storage, fresh, "fresh")
    wait_for(lambda: _counts(storage, "fresh") == (3, 3, 0), 60, "the new claim counts 3 of 3")


def _gap(errors: str) -> float:
    """The span of a reader's logged failures (``up=<uptime>`` stamps), plus one period."""
    stamps = [
        float(word[3:]) for line in errors.splitlines() for word in line.split()
        if word.startswith("up=")
    ]  # fmt: skip
    return max(stamps) - min(stamps) + 0.05 if stamps else 0.0


def _move_dmps_to_the_new_image(
    storage: NodesStorage, pods: list[str], readers: dict[str, tuple[int, str]]
) -> None:
    """Issue 12: the DMPs that served through the rollout still run the old image; `kubectl
    dynvol upgrade-dmps` moves them onto the new one, one at a time, and each pod's reader
    sees one short gap; afterwards the mounts read and write as before."""
    served = {d["spec"]["dmpName"] for d in storage.dvms() if d["spec"]["claimName"] == "roll"}
    images = {
        p["metadata"]["name"]: p["spec"]["containers"][0]["image"] for p in storage.dmps()
        if p["metadata"]["name"] in served
    }  # fmt: skip
    assert sorted(images) == sorted(served), (images, served)
    assert set(images.values()) == {deploying.IMAGE}, f"the rollout restarted no DMP: {images}"
    plugin = Path(sys.executable).parent / "kubectl-dynvol"
    began = time.monotonic()
    proc = subprocess.run(
        [str(plugin), "--kubeconfig", str(storage.cluster.kubeconfig), "upgrade-dmps",
         "-o", "json", "--timeout", "120"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    took = time.monotonic() - began
    assert proc.returncode == 0, f"upgrade-dmps failed: {proc.stderr}\n{proc.stdout}"
    moved = {d["name"]: d for d in json.loads(proc.stdout)["dmps"]}
    assert served <= set(moved), f"every DMP of the claim was moved: {sorted(moved)}"
    now = {
        p["metadata"]["name"]: p["spec"]["containers"][0]["image"] for p in storage.dmps()
        if p["metadata"]["name"] in served
    }  # fmt: skip
    assert set(now.values()) == {ROLLOUT_IMAGE}, now
    wait_for(lambda: _counts(storage, "roll") == (3, 3, 0), 60, "the claim counts 3 of 3")
    after = _readers_run(storage, pods)
    gaps = {}
    for pod in pods:
        count, errors = after[pod]
        new = errors[len(readers[pod][1]) :].strip()
        assert count > readers[pod][0], f"{pod}'s reader reads again"
        gaps[pod] = _gap(new)
    for name in sorted(served):
        d = moved[name]
        print(
            f"upgrade-dmps moved {name} on {d['node']}: running after {d['running_after_s']}s, "
            f"{d['mounts']} mount(s) Mounted again after {d['mounted_after_s']}s"
        )
    print(f"upgrade-dmps took {took:.1f}s for {len(moved)} DMP(s); the gap each pod's "
          f"reader saw: {', '.join(f'{p} {g:.2f}s' for p, g in gaps.items())}")  # fmt: skip
    _all_read_and_write(storage, pods, "moved")
    assert not any(
        c.get("restartCount") for p in storage.pods("app=roll")
        for c in p["status"].get("containerStatuses", [])
    ), "no workload container restarted"  # fmt: skip
    assert storage.get("roll.txt") is not None, "the data is intact in the bucket"


def _controllers(cluster: Cluster) -> dict[str, str]:
    """The controller pods that are not being deleted, by name, with their nodes."""
    return {
        p["metadata"]["name"]: p["spec"].get("nodeName", "")
        for p in cluster.items(
            "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/component=controller"
        )
        if not p["metadata"].get("deletionTimestamp")
    }  # fmt: skip


def _lease(cluster: Cluster) -> dict[str, Any]:
    """The controller's Lease spec (holderIdentity is ``<pod name>_<pid>``)."""
    lease = cluster.items("leases", "-n", SYSTEM_NAMESPACE, "--field-selector",
                          "metadata.name=dynvol-controller")  # fmt: skip
    assert lease, "the controller's Lease exists"
    spec: dict[str, Any] = lease[0]["spec"]
    return spec


def _leader(cluster: Cluster) -> str:
    """The pod name of the controller replica holding the Lease."""
    holder = _lease(cluster).get("holderIdentity") or ""
    return holder.rpartition("_")[0]


def _epoch(micro_time: str) -> float:
    """Seconds since the epoch of a MicroTime (``2026-12-01T18:36:28.123456Z``)."""
    return datetime.datetime.fromisoformat(micro_time.replace("Z", "+00:00")).timestamp()


def _lose_node_and_check(storage: NodesStorage, lost: str, tag: str) -> float:
    """Lose ``lost`` (its processes killed, its Node deleted) while a claim has a pod on it;
    assert its DVMs are released and the claim's counts are right within 60 s, and that
    the claim mounts on the remaining nodes afterwards. Returns the wall-clock time of the
    loss (the kill)."""
    storage.cluster.apply(_spread(storage, tag, 3))
    storage.claim(tag, mountpoint="/data", selector={"app": tag})
    pods = storage.wait_ready(f"app={tag}", 3)
    _all_read_and_write(storage, pods, "before")
    assert lost in _node_of(storage, f"app={tag}").values()

    lost_at = time.time()
    storage.cluster.stop_node(lost)
    storage.cluster.kubectl("delete", "node", lost, "--wait=true", timeout=60)
    began = time.monotonic()
    wait_for(
        lambda: not [d for d in storage.dvms() if d["spec"]["nodeName"] == lost],
        60,
        f"the DVMs of {lost} are released",
    )
    released = time.monotonic() - began

    def counts_right() -> bool:
        live = [
            p for p in storage.pods(f"app={tag}")
            if p["spec"].get("nodeName") != lost and p.get("status", {}).get("phase") == "Running"
        ]  # fmt: skip
        # The lost node's pods stay until pod GC (40 s after the Node went, at the earliest);
        # the claim's counts leave them out at once.
        matched, mounted, _ = _counts(storage, tag)
        return matched == len(live) and mounted == len(live)

    wait_for(
        counts_right,
        max(1.0, 60 - (time.monotonic() - began)),
        "the claim's counts leave out the lost node's pods",
    )
    print(
        f"node loss -> DVMs released: {released:.1f}s; "
        f"counts right: {time.monotonic() - began:.1f}s"
    )
    assert lost not in _dmp_nodes(storage), f"no DMP object is left on {lost}"

    def replica_gone() -> bool:
        on = storage.cluster.items(
            "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/component=controller",
            "--field-selector", f"spec.nodeName={lost}",
        )  # fmt: skip
        return not on

    # A controller replica that ran there stops being a webhook endpoint before pod GC
    # could remove it (40 s after the Node went, at the earliest), whose replacements of
    # the lost pods a dead endpoint would otherwise admit without their volume.
    wait_for(
        replica_gone,
        max(1.0, 35 - (time.monotonic() - began)),
        f"no controller pod is left on {lost}",
    )
    print(f"no controller pod on {lost}: {time.monotonic() - began:.1f}s")
    # Kubernetes' part: pod GC deletes the lost node's pods (still Ready in their status:
    # no kubelet is left to say otherwise), then their replacements start elsewhere.
    wait_for(
        lambda: lost not in _node_of(storage, f"app={tag}").values(),
        180,
        f"pod GC deletes the pods of {lost}",
    )
    pods = storage.wait_ready(f"app={tag}", 3, timeout=180)
    _all_read_and_write(storage, pods, "after")
    wait_for(lambda: _counts(storage, tag) == (3, 3, 0), 60, "the claim counts 3 of 3")
    return lost_at


# The two node-loss cases run last, in this order: each lost node stays lost for the rest
# of the module (the first loses a node without a controller, which three nodes and two
# controller replicas always leave; the second the leader's, of the two left).


def test_node_loss_releases_its_mounts_within_a_minute(storage: NodesStorage) -> None:
    """The lost node is one that runs no controller replica: the leader goes on."""
    controllers = _controllers(storage.cluster)
    lost = next(n for n in reversed(NODES) if n not in controllers.values())
    leader = _leader(storage.cluster)
    _lose_node_and_check(storage, lost, "loss")
    assert _leader(storage.cluster) == leader, "the Lease stayed with its holder"


def test_losing_the_leading_controllers_node_releases_its_mounts_within_a_minute(
    storage: NodesStorage,
) -> None:
    """The lost node runs the controller replica holding the Lease: the standby on another
    node (the base spreads the two) takes the Lease once it expires and releases the lost
    node's mounts, within the same minute."""
    controllers = _controllers(storage.cluster)
    leader = _leader(storage.cluster)
    assert leader in controllers, (leader, controllers)
    lost = controllers[leader]
    standbys = {pod for pod, node in controllers.items() if node != lost}
    assert standbys, f"a controller replica runs on a node other than {lost}: {controllers}"
    before = _lease(storage.cluster)
    lost_at = _lose_node_and_check(storage, lost, "leaderloss")
    after = _lease(storage.cluster)
    assert _leader(storage.cluster) in standbys, (after, standbys)
    assert int(after.get("leaseTransitions") or 0) > int(before.get("leaseTransitions") or 0)
    takeover = _epoch(after["acquireTime"]) - lost_at
    print(
        f"leader's node lost -> the standby leads: {takeover:.1f}s "
        f"(lease {before.get('leaseDurationSeconds')}s)"
    )
