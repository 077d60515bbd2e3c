"""A real, local Kubernetes control plane (etcd + kube-apiserver) for tests and development.

This is what dynvol's integration tests run against, and what other controllers and
provider authors can use to test against dynvol's CRDs: ``dynvol dev control-plane up``
from a shell, or :class:`ControlPlane` (and the ``control_plane`` pytest fixture of
:mod:`dynvol.testing.pytest_plugin`) from Python. Everything listens on 127.0.0.1 on free
ports and keeps its data under one directory.

There is no kube-controller-manager: namespaces are not finalised and owner references are
not garbage-collected. Tests that need those behaviours arrange them themselves.

The binaries (etcd, kube-apiserver, kubectl) are found the way envtest users expect, first
match wins (:func:`default_bin_dir`): ``KUBEBUILDER_ASSETS`` (the directory
``setup-envtest use -p path`` prints), ``DYNVOL_TOOLS_BIN``, the checkout's ``.tools/bin``
(``make tools``), then the cache that ``dynvol dev tools install`` builds into
(``$XDG_CACHE_HOME/dynvol/tools/<version>/bin``), which is how an installed dynvol gets
them outside a checkout. The CRDs come from the package (:mod:`dynvol.crds`); a project's
own CRDs are added with ``extra_crd_paths``.

In a checkout the Kubernetes release is the default one ``make tools`` links into
``.tools/bin`` (the newest pinned in ``hack/tools/versions.env``), or the one
``DYNVOL_KUBERNETES_VERSION`` names, from ``.tools/k8s/<version>/bin``: ``make test`` runs
the integration tier once per supported release that way. A control plane asked for one
release refuses to start with the binaries of another.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import attrs

from dynvol.testing.processes import Process, free_port, run, wait_until

#: Flags that keep a test apiserver small and quick. ServiceAccount admission is off
#: because no controller-manager creates the "default" service accounts.
_APISERVER_FLAGS = (
    "--allow-privileged=true",
    "--authorization-mode=RBAC",
    "--disable-admission-plugins=ServiceAccount",
    "--enable-priority-and-fairness=false",
    "--profiling=false",
    "--service-cluster-ip-range=10.96.0.0/24",
    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
    "--endpoint-reconciler-type=none",
    "--v=1",
)


def repo_root() -> Path | None:
    """The dynvol checkout this module runs from, if it runs from one.

    Only the checkout whose source this is: an installed dynvol is not in a checkout even
    when its virtualenv lies inside one.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "manifests" / "base" / "crds").is_dir() and (root / "hack").is_dir():
        return root
    return None


#: The directory of etcd, kube-apiserver and kubectl that setup-envtest makes (envtest's own
#: variable, honoured first).
KUBEBUILDER_ASSETS_ENV = "KUBEBUILDER_ASSETS"
#: dynvol's own override of where the binaries are.
TOOLS_BIN_ENV = "DYNVOL_TOOLS_BIN"


def _env_dir(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value else None


def default_bin_dir() -> Path:
    """Where the control plane's binaries are; the first of, in order:

    ``$KUBEBUILDER_ASSETS``, ``$DYNVOL_TOOLS_BIN``, the checkout's ``.tools/bin`` when this
    module runs from a dynvol checkout (``make tools``), and otherwise the cache that
    ``dynvol dev tools install`` builds into. A checkout never falls back to the cache, so
    its tests run what ``make tools`` built.
    """
    for name in (KUBEBUILDER_ASSETS_ENV, TOOLS_BIN_ENV):
        env = _env_dir(name)
        if env is not None:
            return env
    root = repo_root()
    if root is not None:
        return root / ".tools" / "bin"
    from dynvol.testing.tools import installed_bin_dir

    return installed_bin_dir()


def where_tools_come_from() -> str:
    """The ways to provide the binaries, for the error when one is missing."""
    from dynvol.testing.tools import installed_bin_dir

    return (
        f"set {KUBEBUILDER_ASSETS_ENV} to a directory with etcd, kube-apiserver and kubectl "
        "(what 'setup-envtest use -p path' prints), or set "
        f"{TOOLS_BIN_ENV} to one, or run 'dynvol dev tools install' to build the pinned "
        f"versions with Go into {installed_bin_dir()} "
        "(in a dynvol checkout, 'make tools' links them into .tools/bin)"
    )


#: Names the Kubernetes release to run, one of those ``hack/tools/versions.env`` pins;
#: unset, the default release linked into :func:`default_bin_dir` runs.
KUBERNETES_VERSION_ENV = "DYNVOL_KUBERNETES_VERSION"
_RELEASE = re.compile(r"v1\.[0-9]{1,3}\.[0-9]{1,3}")
#: The binaries that come from the Kubernetes release (the rest: etcd, MinIO, csi-sanity).
KUBERNETES_BINARIES = frozenset(
    {
        "kube-apiserver",
        "kubectl",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "e2e.test",
    }
)


def requested_kubernetes_version() -> str | None:
    """The release ``DYNVOL_KUBERNETES_VERSION`` asks for, or ``None`` for the default.

    Raises :class:`ValueError` naming the variable when it is not a release name: the value
    becomes a path, so nothing but ``v1.MINOR.PATCH`` is taken.
    """
    value = os.environ.get(KUBERNETES_VERSION_ENV, "")
    if not value:
        return None
    if not _RELEASE.fullmatch(value):
        raise ValueError(
            f"{KUBERNETES_VERSION_ENV}={value!r} is not a Kubernetes release: "
            "expected v1.MINOR.PATCH, one of those hack/tools/versions.env pins"
        )
    return value


def kubernetes_bin_dir(version: str | None = None, *, bin_dir: Path | None = None) -> Path:
    """Where ``hack/tools/build.sh`` links the binaries of Kubernetes ``version``.

    ``k8s/<version>/bin`` beside ``bin_dir`` (default :func:`default_bin_dir`, so
    ``.tools/k8s/<version>/bin``); with no version (and no ``DYNVOL_KUBERNETES_VERSION``),
    ``bin_dir`` itself, which holds the default release.
    """
    if version is None:
        version = requested_kubernetes_version()
    elif not _RELEASE.fullmatch(version):
        raise ValueError(f"{version!r} is not a Kubernetes release (v1.MINOR.PATCH)")
    base = default_bin_dir() if bin_dir is None else bin_dir
    if version is None:
        return base
    if base == _env_dir(KUBEBUILDER_ASSETS_ENV):
        # One release per envtest directory: the release check at start decides.
        return base
    if _RELEASE.fullmatch(base.parent.name):
        # The layout of `dynvol dev tools install`: <cache>/<version>/bin.
        return base.parent.parent / version / "bin"
    return base.parent / "k8s" / version / "bin"


def default_crd_paths() -> tuple[Path, ...]:
    """dynvol's CRDs, from the installed package (:func:`dynvol.crds.crd_dir`), and in a
    checkout the PriorityClass every Dynamic Mount Pod names (priority admission refuses a
    pod whose class does not exist)."""
    from dynvol.crds import crd_dir

    root = repo_root()
    if root is None:
        return (crd_dir(),)
    return (crd_dir(), root / "manifests" / "base" / "priorityclass.yaml")


class ToolsMissing(RuntimeError):
    """A binary the control plane needs is not there; the message says how to get it."""


class WrongRelease(RuntimeError):
    """The binaries found are another Kubernetes release than the one asked for.

    Not a :class:`ToolsMissing`: a tier that would run against the wrong release fails
    rather than skips.
    """


def _openssl(*args: str) -> None:
    run(["openssl", *args])


def _make_pki(pki: Path) -> None:
    """A CA and a serving certificate for 127.0.0.1, plus the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=dynvol-dev-ca",
        "-keyout",
        str(pki / "ca.key"),
        "-out",
        str(pki / "ca.crt"),
    )
    ext = pki / "serving.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        str(pki / "serving.key"),
        "-out",
        str(pki / "serving.csr"),
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(pki / "serving.csr"),
        "-CA",
        str(pki / "ca.crt"),
        "-CAkey",
        str(pki / "ca.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        str(ext),
        "-out",
        str(pki / "serving.crt"),
    )
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


@attrs.define(kw_only=True)
class ControlPlane:
    """etcd and kube-apiserver as children of this process; ``start()`` then ``stop()``."""

    dir: Path
    bin_dir: Path = attrs.field(factory=default_bin_dir)
    #: The Kubernetes release to run; the default release in ``bin_dir`` when ``None``.
    kubernetes_version: str | None = attrs.field(factory=requested_kubernetes_version)
    #: dynvol's CRDs (files or directories); ``()`` applies none of them.
    crd_paths: Sequence[Path] = attrs.field(factory=default_crd_paths)
    #: A project's own CRDs (files, directories of YAML files, or kustomizations), applied
    #: after dynvol's; each must exist.
    extra_crd_paths: Sequence[Path] = ()
    extra_apiserver_flags: Sequence[str] = ()
    etcd: Process | None = None
    apiserver: Process | None = None
    server: str = ""
    etcd_url: str = ""
    token: str = ""
    versions: dict[str, str] = attrs.field(factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    @property
    def kubernetes_bin_dir(self) -> Path:
        """Where the Kubernetes binaries of :attr:`kubernetes_version` are."""
        if self.kubernetes_version is None:
            return self.bin_dir
        return kubernetes_bin_dir(self.kubernetes_version, bin_dir=self.bin_dir)

    def binary(self, name: str) -> Path:
        if name in KUBERNETES_BINARIES:
            path = self.kubernetes_bin_dir / name
            build = "make tools"
            if self.kubernetes_version is not None:
                # tools-oldest leaves .tools/bin alone; the variable also relinks it.
                build = (
                    "make tools-oldest' for the oldest supported release, or "
                    f"'KUBERNETES_VERSION={self.kubernetes_version} make tools"
                )
        else:
            path, build = self.bin_dir / name, "make tools"
        if not os.access(path, os.X_OK):
            raise ToolsMissing(
                f"{path} is missing: run '{build}' to build it in a dynvol checkout; "
                f"elsewhere {where_tools_come_from()}"
            )
        return path

    def start(self, *, timeout: float = 90.0) -> ControlPlane:
        """Start etcd and the apiserver, apply the CRDs and write the kubeconfig."""
        for path in self.extra_crd_paths:
            if not Path(path).exists():
                raise FileNotFoundError(f"extra_crd_paths: {path} does not exist")
        etcd_bin, apiserver_bin = self.binary("etcd"), self.binary("kube-apiserver")
        self.dir.mkdir(parents=True, exist_ok=True)
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        self.versions = {
            "etcd": run([str(etcd_bin), "--version"]).splitlines()[0].split(":")[-1].strip(),
            "kube-apiserver": run([str(apiserver_bin), "--version"]).split()[-1],
        }
        wanted = self.kubernetes_version
        if wanted is not None and self.versions["kube-apiserver"] != wanted:
            raise WrongRelease(
                f"{apiserver_bin} is {self.versions['kube-apiserver']}, not the {wanted} "
                f"that {KUBERNETES_VERSION_ENV} asks for: "
                f"run 'KUBERNETES_VERSION={wanted} make tools' to build it"
            )
        try:
            self._start_etcd(etcd_bin, logs)
            self._start_apiserver(apiserver_bin, logs, timeout)
            self._write_kubeconfig()
            self._apply_crds()
        except BaseException:
            self.stop()
            raise
        (self.dir / "control-plane.json").write_text(
            json.dumps(
                {
                    "server": self.server,
                    "versions": self.versions,
                    "pids": {
                        "etcd": self.etcd.pid if self.etcd else None,
                        "kube-apiserver": self.apiserver.pid if self.apiserver else None,
                    },
                }
            )
        )
        return self

    def _start_etcd(self, etcd_bin: Path, logs: Path) -> None:
        client, peer = free_port(), free_port()
        data = self.dir / "etcd"
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.etcd = Process.start(
            [
                str(etcd_bin),
                "--name",
                "dynvol-dev",
                "--data-dir",
                str(data),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"dynvol-dev=http://127.0.0.1:{peer}",
                "--listen-metrics-urls",
                f"http://127.0.0.1:{free_port()}",
                "--quota-backend-bytes",
                str(4 << 30),
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ],
            name="etcd",
            log=logs / "etcd.log",
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=1) as resp:
                    return bool(json.load(resp).get("health") == "true")
            except (OSError, ValueError):
                return False

        wait_until(healthy, timeout=30, what="etcd /health", alive=self.etcd)

    def _start_apiserver(self, apiserver_bin: Path, logs: Path, timeout: float) -> None:
        pki = self.dir / "pki"
        _make_pki(pki)
        self.token = secrets.token_hex(16)
        tokens = pki / "tokens.csv"
        tokens.write_text(f"{self.token},dynvol-admin,dynvol-admin,system:masters\n")
        tokens.chmod(0o600)
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        self.apiserver = Process.start(
            [
                str(apiserver_bin),
                "--etcd-servers",
                self.etcd_url,
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(port),
                "--cert-dir",
                str(pki),
                "--tls-cert-file",
                str(pki / "serving.crt"),
                "--tls-private-key-file",
                str(pki / "serving.key"),
                "--client-ca-file",
                str(pki / "ca.crt"),
                "--token-auth-file",
                str(tokens),
                "--service-account-key-file",
                str(pki / "sa.pub"),
                "--service-account-signing-key-file",
                str(pki / "sa.key"),
                *_APISERVER_FLAGS,
                *self.extra_apiserver_flags,
            ],
            name="kube-apiserver",
            log=logs / "kube-apiserver.log",
        )
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def ready() -> bool:
            req = urllib.request.Request(
                f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                    return bool(resp.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        wait_until(
            ready,
            timeout=timeout,
            interval=0.2,
            what="kube-apiserver /readyz",
            alive=self.apiserver,
        )

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dynvol-dev",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "dynvol-admin", "user": {"token": self.token}}],
            "contexts": [
                {"name": "dynvol-dev", "context": {"cluster": "dynvol-dev", "user": "dynvol-admin"}}
            ],
            "current-context": "dynvol-dev",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)

    def kubectl(self, *args: str, timeout: float = 60.0) -> str:
        """Run the pinned kubectl against this control plane."""
        return run(
            [str(self.binary("kubectl")), "--kubeconfig", str(self.kubeconfig), *args],
            timeout=timeout,
        )

    def _apply_crds(self) -> None:
        applied = False
        for path in (*self.crd_paths, *self.extra_crd_paths):
            if path.is_dir() and not any(path.glob("*.yaml")):
                continue
            flag = "-k" if (path / "kustomization.yaml").exists() else "-f"
            self.kubectl("apply", "--server-side", flag, str(path))
            applied = True
        if applied:
            self.kubectl(
                "wait", "--for", "condition=Established", "crd", "--all", "--timeout", "60s"
            )

    def stop(self) -> None:
        """Stop the apiserver, then etcd; both are reaped."""
        for proc in (self.apiserver, self.etcd):
            if proc is not None:
                proc.stop(timeout=15)
        self.apiserver = self.etcd = None

    def remove(self) -> None:
        """Stop and delete everything under :attr:`dir`."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether ``pid`` is gone (or a zombie) within ``timeout``; for ``down``, which is
    not the parent of the supervisor it stops."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False
