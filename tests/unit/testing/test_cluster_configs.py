"""Each node's configuration is its own: addresses, cgroup root, sockets, pod network."""

from __future__ import annotations

import json
from pathlib import Path

from dynvol.testing.cluster.addressing import plan_nodes
from dynvol.testing.cluster.configs import node_specs, write_node_files
from dynvol.testing.cluster.layout import Layout


def test_nodes_get_disjoint_configuration(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    plans = plan_nodes(3)
    configs = []
    for plan in plans:
        write_node_files(layout, plan, dns=[])
        config = layout.node(plan.name).config
        kubelet = json.loads((config / "kubelet.json").read_text())
        proxy = json.loads((config / "kube-proxy.json").read_text())
        cni = json.loads((layout.node(plan.name).cni_conf / "10-dynvol.conflist").read_text())
        toml = (config / "containerd.toml").read_text()
        assert kubelet["address"] == kubelet["healthzBindAddress"] == str(plan.address)
        assert proxy["mode"] == "iptables"
        assert proxy["hostnameOverride"] == plan.name
        assert proxy["bindAddress"] == str(plan.address)
        (ipam,) = cni["plugins"][0]["ipam"]["ranges"][0]
        assert ipam["subnet"] == str(plan.pod_cidr)
        assert f'stream_server_address = "{plan.address}"' in toml
        configs.append((kubelet["cgroupRoot"], kubelet["containerRuntimeEndpoint"], ipam["subnet"]))
    for column in zip(*configs, strict=True):
        assert len(set(column)) == len(plans), column


def test_node_processes_run_in_the_nodes_namespaces(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (plan,) = plan_nodes(1)
    specs = node_specs(layout, plan, tmp_path / "bin")
    assert [s.name for s in specs] == ["node-1/containerd", "node-1/kubelet", "node-1/kube-proxy"]
    for spec in specs:
        assert spec.argv[0].endswith("nsenter")
        assert f"--net=/run/netns/{plan.netns}" in spec.argv
        assert f"--mount={layout.mount_ns(plan.name)}" in spec.argv
    kubelet = specs[1].argv
    assert f"--node-ip={plan.address}" in kubelet
    assert "--root-dir=/var/lib/kubelet" in kubelet
