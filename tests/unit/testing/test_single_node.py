"""The single node's layout, state file, configuration, certificates and status text.

What the e2e fixtures and ``make demo`` read from the state directory must stay where it
is (``run/state.json``, ``kubeconfig``, ``containerd/containerd.sock``); every process's
command line must name the directory (``down`` finds them by it); the node is 127.0.0.1.
"""

from __future__ import annotations

import datetime
import importlib.machinery
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dynvol.testing.cluster import single
from dynvol.testing.cluster.addressing import HOST_ADDRESS
from dynvol.testing.cluster.configs import control_plane_specs
from dynvol.testing.cluster.layout import Layout
from dynvol.testing.localcluster import LocalCluster

TOP = Path(__file__).resolve().parents[3]
PORTS = {name: 20000 + i for i, name in enumerate(single.PORT_NAMES)}


@pytest.fixture
def layout(tmp_path: Path) -> single.SingleNodeLayout:
    return single.SingleNodeLayout(tmp_path / "cluster")


def test_layout_keeps_the_paths_its_users_read(layout: single.SingleNodeLayout) -> None:
    d = layout.dir
    assert layout.state_file == d / "run" / "state.json"
    assert layout.kubeconfig == d / "kubeconfig"
    assert layout.containerd_sock == d / "containerd" / "containerd.sock"
    # dynvol.testing.localcluster, which the e2e tier and make demo use, agrees.
    local = LocalCluster(dir=d, top=TOP)
    assert local.kubeconfig == layout.kubeconfig


def test_state_file_round_trip(layout: single.SingleNodeLayout) -> None:
    assert layout.read_state() == {}
    layout.run.mkdir(parents=True)
    layout.write_state({"phase": "prepared", "ports": PORTS, "procs": {}})
    assert layout.read_state() == {"phase": "prepared", "ports": PORTS, "procs": {}}
    assert not layout.state_file.with_suffix(".tmp").exists()
    local = LocalCluster(dir=layout.dir, top=TOP)
    assert local.apiserver_port() == PORTS["apiserver"]
    layout.state_file.write_text("{not json")
    assert layout.read_state() == {}


def test_default_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DYNVOL_CLUSTER_DIR", str(tmp_path / "x"))
    assert single.default_dir() == tmp_path / "x"
    monkeypatch.delenv("DYNVOL_CLUSTER_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert single.default_dir() == tmp_path / "state" / "dynvol" / "local-cluster"


def test_node_files(layout: single.SingleNodeLayout) -> None:
    server = single.write_node_files(layout, PORTS)
    assert server == f"https://127.0.0.1:{PORTS['apiserver']}"

    admin = json.loads(layout.kubeconfig.read_text())
    assert admin["clusters"][0]["cluster"]["server"] == server
    assert admin["users"][0]["user"]["client-certificate"] == str(layout.pki / "admin.crt")
    assert layout.kubeconfig.stat().st_mode & 0o077 == 0
    for component in ("kube-controller-manager", "kube-scheduler", "kubelet"):
        config = json.loads(layout.kubeconfig_for(component).read_text())
        assert config["users"][0]["user"]["client-key"] == str(layout.pki / f"{component}.key")

    kubelet = json.loads(layout.kubelet_config.read_text())
    assert kubelet["address"] == kubelet["healthzBindAddress"] == "127.0.0.1"
    assert (kubelet["port"], kubelet["healthzPort"]) == (PORTS["kubelet"], PORTS["kubelet-healthz"])
    assert kubelet["containerRuntimeEndpoint"] == f"unix://{layout.containerd_sock}"
    assert kubelet["clusterDNS"] == []
    assert "cgroupRoot" not in kubelet, "the single node's pods are in the default kubepods"
    assert kubelet["makeIPTablesUtilChains"] is False

    (cni,) = [json.loads(p.read_text()) for p in layout.cni_conf.glob("*.conflist")]
    (bridge,) = cni["plugins"]
    assert bridge["bridge"] == single.BRIDGE
    assert (bridge["isGateway"], bridge["isDefaultGateway"], bridge["ipMasq"]) == (False,) * 3
    assert [p["type"] for p in cni["plugins"]] == ["bridge"], "no port mappings"
    assert bridge["ipam"]["ranges"] == [[{"subnet": single.POD_SUBNET}]]
    assert bridge["ipam"]["dataDir"] == str(layout.cni / "ipam")

    toml = layout.containerd_config.read_text()
    assert f'address = "{layout.containerd_sock}"' in toml
    assert 'stream_server_address = "127.0.0.1"' in toml
    assert f'conf_dir = "{layout.cni_conf}"' in toml
    assert f'root = "{layout.containerd / "root"}"' in toml


def test_processes_start_in_order_and_name_the_directory(
    layout: single.SingleNodeLayout, tmp_path: Path
) -> None:
    specs = single.process_specs(layout, PORTS, tmp_path / "bin")
    assert tuple(s.name for s in specs) == single.PROCESSES
    for spec in specs:
        assert any(str(layout.dir) in arg for arg in spec.argv), spec.name
    argv = {s.name: s.argv for s in specs}
    apiserver = argv["kube-apiserver"]
    assert "--bind-address=127.0.0.1" in apiserver
    assert f"--secure-port={PORTS['apiserver']}" in apiserver
    assert "--kubelet-preferred-address-types=Hostname,InternalIP" in apiserver
    assert "--endpoint-reconciler-type=none" in apiserver
    assert f"--service-cluster-ip-range={single.SERVICE_SUBNET}" in apiserver
    assert "--name=dynvol-local" in argv["etcd"]
    assert f"--cert-dir={layout.dir / 'scheduler-certs'}" in argv["kube-scheduler"]
    assert "--node-monitor-grace-period=20s" not in argv["kube-controller-manager"]
    kubelet = argv["kubelet"]
    assert "--hostname-override=127.0.0.1" in kubelet
    assert "--root-dir=/var/lib/kubelet" in kubelet
    assert not any(a.endswith("nsenter") for spec in specs for a in spec.argv[:1])


def test_the_multi_node_control_plane_is_unchanged(tmp_path: Path) -> None:
    """The shared specs keep the multi-node cluster's values by default."""
    layout = Layout(tmp_path)
    ports = {n: 30000 + i for i, n in enumerate(("etcd", "etcd-peer", "etcd-metrics"))}
    ports |= {"apiserver": 6443, "kcm": 30010, "scheduler": 30011}
    argv = {s.name: s.argv for s in control_plane_specs(layout, ports, tmp_path / "bin")}
    assert f"--bind-address={HOST_ADDRESS}" in argv["kube-apiserver"]
    assert "--kubelet-preferred-address-types=InternalIP" in argv["kube-apiserver"]
    assert not any("endpoint-reconciler" in a for a in argv["kube-apiserver"])
    assert "--name=dynvol-multinode" in argv["etcd"]
    assert "--node-monitor-grace-period=20s" in argv["kube-controller-manager"]


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_pki_signs_every_identity(layout: single.SingleNodeLayout) -> None:
    single.write_pki(layout)
    ca = _load_cert(layout.pki / "ca.crt")
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "dynvol-local-cluster-ca"
    )
    for name, (cn, orgs, hosts) in single.certificates().items():
        cert = _load_cert(layout.pki / f"{name}.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        got_orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        assert got_orgs == list(orgs)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if hosts:
            assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
            names += san.get_values_for_type(x509.DNSName)
            assert sorted(names) == sorted(hosts)
        else:
            assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (layout.pki / f"{name}.key").stat().st_mode & 0o077 == 0
    assert "127.0.0.1" in single.certificates()["kubelet-serving"][2]  # type: ignore[operator]
    sa = serialization.load_pem_private_key((layout.pki / "sa.key").read_bytes(), None)
    assert isinstance(sa, rsa.RSAPrivateKey)


def test_pki_keeps_its_ca_and_replaces_an_older_runs(layout: single.SingleNodeLayout) -> None:
    single.write_pki(layout)
    first = (layout.pki / "ca.crt").read_bytes()
    sa = (layout.pki / "sa.key").read_bytes()
    single.write_pki(layout)
    assert (layout.pki / "ca.crt").read_bytes() == first
    assert (layout.pki / "sa.key").read_bytes() == sa

    # An RSA CA, as an openssl-made PKI of an older hack/local-cluster had.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (layout.pki / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (layout.pki / "ca.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    single.write_pki(layout)
    renewed = _load_cert(layout.pki / "ca.crt")
    assert isinstance(renewed.public_key(), ec.EllipticCurvePublicKey)
    admin = _load_cert(layout.pki / "admin.crt")
    assert admin.issuer == renewed.subject


def _report(*, running: bool, phase: str = "running") -> dict[str, object]:
    return {
        "dir": "/d",
        "phase": phase,
        "supervisor": 10 if running else None,
        "kubeconfig": "/d/kubeconfig",
        "processes": {"etcd": {"pid": 11, "running": running}},
        "mounts": 3,
        "running": running,
        **({"nodes": "NAME  STATUS\n127.0.0.1  Ready"} if running else {}),
    }


def test_status_text() -> None:
    up = single.format_status(_report(running=True)).splitlines()
    assert up[:3] == ["dir:        /d", "phase:      running", "supervisor: 10"]
    assert up[3].split() == ["etcd", "11", "running"]
    assert up[4] == "mounts:     3 under /var/lib/kubelet, /run/containerd and DIR"
    assert up[5:] == ["kubeconfig: /d/kubeconfig", "NAME  STATUS", "127.0.0.1  Ready"]
    stopped = single.format_status(_report(running=False)).splitlines()
    assert stopped[1] == "phase:      running (but something stopped)"
    assert stopped[3].split() == ["etcd", "11", "STOPPED"]
    assert not any(line.startswith("kubeconfig") for line in stopped)
    down = single.format_status(_report(running=False, phase="down")).splitlines()
    assert down[1] == "phase:      down"


def test_kubelet_rules_to_delete() -> None:
    listing = "\n".join(
        [
            "-P INPUT ACCEPT",
            "-N KUBE-FIREWALL",
            "-A INPUT -j KUBE-FIREWALL",
            "-A OUTPUT -m comment --comment x -j KUBE-FIREWALL",
            "-A KUBE-FIREWALL -j DROP",
            "-A INPUT -j ACCEPT",
            "-A INPUT -j",
        ]
    )
    assert single.kubelet_rules_to_delete(listing) == [
        ["INPUT", "-j", "KUBE-FIREWALL"],
        ["OUTPUT", "-m", "comment", "--comment", "x", "-j", "KUBE-FIREWALL"],
    ]


def test_command_line_takes_only_one_node() -> None:
    args = single.parser().parse_args(["up", "--apiserver-port", "0", "--images", "pause"])
    assert (args.apiserver_port, args.images, args.nodes) == (0, "pause", 1)
    with pytest.raises(SystemExit):
        single.parser().parse_args(["up", "--nodes", "2"])


def _entry_point() -> ModuleType:
    path = TOP / "hack" / "local-cluster"
    loader = importlib.machinery.SourceFileLoader("local_cluster_entry", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_entry_point_dispatches_on_nodes() -> None:
    entry = _entry_point()
    assert entry.requested_nodes(["up"]) == 1
    assert entry.requested_nodes(["up", "--nodes", "1"]) == 1
    assert entry.requested_nodes(["status", "--nodes=3"]) == 3
    with pytest.raises(SystemExit, match="expected a number"):
        entry.requested_nodes(["up", "--nodes", "many"])
