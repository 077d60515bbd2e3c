"""The real single-node cluster of ``hack/local-cluster``, and dynvol deployed on it.

One place for what ``make demo``, the e2e tier and ``bench/bench_e2e.py`` all do: use the
cluster that runs in the state directory or bring one up (and say so, so the caller can
take down only what it started), import the dynvol image built from this checkout, deploy
dynvol with ``kubectl apply -k manifests/overlays/local`` and wait until its webhooks are
registered, and remove it again in the order that leaves no finalizer stuck.

Every command runs with the pinned kubectl against the cluster's own kubeconfig; a failed
command raises :class:`ClusterError` with its output, and a wait that runs out raises
``TimeoutError`` (from :func:`dynvol.testing.wait_until`). ``progress`` gets one line per step
and ``output`` every line of the long-running scripts (both quiet by default).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from dynvol.testing.controlplane import default_bin_dir, repo_root
from dynvol.testing.processes import wait_until

__all__ = ["APISERVER_PORT", "SYSTEM_NAMESPACE", "ClusterError", "LocalCluster", "default_dir"]

#: The local overlay points dynvol's pods at the apiserver on this port.
APISERVER_PORT = 6443
SYSTEM_NAMESPACE = "dynvol-system"
_WORKLOADS = ("daemonset/dynvol-node", "deployment/dynvol-controller")


class ClusterError(Exception):
    """A step against the local cluster failed; the message says which and why."""


def default_dir() -> Path:
    """The cluster's state directory: ``$DYNVOL_CLUSTER_DIR``, else under XDG state."""
    if os.environ.get("DYNVOL_CLUSTER_DIR"):
        return Path(os.environ["DYNVOL_CLUSTER_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dynvol" / "local-cluster"


def _checkout() -> Path:
    root = repo_root()
    if root is None:
        raise ClusterError("the local cluster is driven from a dynvol checkout (hack/, manifests/)")
    return root


def _quiet(_: str) -> None:
    pass


@attrs.define
class LocalCluster:
    """The cluster in ``dir``; see the module docstring."""

    dir: Path = attrs.field(factory=default_dir, converter=Path)
    top: Path = attrs.field(factory=_checkout)
    progress: Callable[[str], None] = _quiet
    output: Callable[[str], None] = _quiet

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def overlay(self) -> Path:
        return self.top / "manifests" / "overlays" / "local"

    # -- commands -------------------------------------------------------------------------

    def kubectl_argv(self, *args: str) -> list[str]:
        """The pinned kubectl against this cluster (for callers that run it themselves)."""
        return [str(default_bin_dir() / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        argv = self.kubectl_argv(*args)
        proc = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {shlex.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def apply(self, *objs: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))

    def items(self, kind: str, *args: str) -> list[dict[str, Any]]:
        """``kubectl get KIND ARGS -o json``'s items."""
        out = self.kubectl("get", kind, *args, "-o", "json").stdout
        return json.loads(out)["items"]  # type: ignore[no-any-return]

    def _script(self, argv: list[str], *, timeout: float) -> None:
        """Run a long script, handing its output to ``output`` line by line."""
        lines: list[str] = []
        with subprocess.Popen(
            argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as proc:
            watchdog = threading.Timer(timeout, proc.kill)
            watchdog.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line.rstrip())
                    self.output(line.rstrip())
                proc.wait()
            finally:
                watchdog.cancel()
        if proc.returncode != 0:
            tail = "\n".join(lines[-40:])
            raise ClusterError(f"{shlex.join(argv)} failed ({proc.returncode}):\n{tail}")

    # -- the cluster ----------------------------------------------------------------------

    def running(self) -> bool:
        script = str(self.top / "hack" / "local-cluster")
        status = subprocess.run(
            [script, "status", "--dir", str(self.dir)], capture_output=True, timeout=60
        )
        return status.returncode == 0

    def apiserver_port(self) -> int | None:
        try:
            state = json.loads((self.dir / "run" / "state.json").read_text())
        except (OSError, ValueError):
            return None
        port = state.get("ports", {}).get("apiserver")
        return int(port) if port is not None else None

    def up(self) -> bool:
        """Use the running cluster or bring one up; returns whether this call started it.

        ``hack/local-cluster up`` imports the images it builds; a cluster that was already
        running gets the dynvol image of this checkout imported here.
        """
        if self.running():
            port = self.apiserver_port()
            if port != APISERVER_PORT:
                raise ClusterError(
                    f"the running cluster's apiserver is on port {port}, but "
                    f"manifests/overlays/local expects {APISERVER_PORT}: run "
                    "'hack/local-cluster down' and try again"
                )
            self.progress(f"local cluster already running ({self.dir}); it stays up afterwards")
            self.import_images("dynvol")
            return False
        self.progress("bringing up the local cluster (hack/local-cluster up)")
        self._script(
            [str(self.top / "hack" / "local-cluster"), "up", "--dir", str(self.dir),
             "--apiserver-port", str(APISERVER_PORT)],
            timeout=1800,
        )  # fmt: skip
        return True

    def down(self) -> None:
        self.progress("bringing the local cluster down (hack/local-cluster down)")
        self._script(
            [str(self.top / "hack" / "local-cluster"), "down", "--dir", str(self.dir)],
            timeout=300,
        )

    def import_images(self, *images: str) -> None:
        self.progress(f"importing the {', '.join(images)} image(s) built from this checkout")
        self._script(
            [str(self.top / ".venv" / "bin" / "python"), str(self.top / "hack/images/build.py"),
             "import", "--address", str(self.dir / "containerd" / "containerd.sock"), *images],
            timeout=900,
        )  # fmt: skip

    # -- dynvol on it ---------------------------------------------------------------------

    def deployed(self) -> bool:
        found = self.kubectl(
            "-n", SYSTEM_NAMESPACE, "get", "daemonset", "dynvol-node", "--ignore-not-found",
            "-o", "name", check=False,
        )  # fmt: skip
        return bool(found.stdout.strip())

    def deploy(self) -> bool:
        """Apply the local overlay and wait until dynvol serves; returns whether it existed.

        An existing deployment is restarted, because the image may have been rebuilt under
        the same tag.
        """
        existed = self.deployed()
        self.progress("deploying dynvol: kubectl apply -k manifests/overlays/local")
        self.kubectl("apply", "-k", str(self.overlay))
        if existed:
            self.kubectl("-n", SYSTEM_NAMESPACE, "rollout", "restart", *_WORKLOADS)
        for what in _WORKLOADS:
            self.kubectl(
                "-n", SYSTEM_NAMESPACE, "rollout", "status", what, "--timeout=180s", timeout=200
            )
        # The controller registers its webhooks (with its development CA) once it serves.
        wait_until(
            lambda: bool(self.kubectl(
                "get", "mutatingwebhookconfiguration", "dynvol", "--ignore-not-found",
                "-o", "jsonpath={.webhooks[0].clientConfig.caBundle}", check=False,
            ).stdout.strip()),
            timeout=60, interval=0.5, what="the controller to register its webhooks",
        )  # fmt: skip
        return existed

    def undeploy(self) -> None:
        """Remove dynvol; first wait until no DynamicVolumeMount is left.

        Mounts carry the DMP's finalizer: while any exists, dynvol must stay to release it
        (deleting the CRDs first would leave them, and the CRDs, stuck Terminating).
        """
        self.progress("removing dynvol")
        wait_until(
            lambda: not self.items("dynamicvolumemounts", "-A"),
            timeout=120, interval=0.5, what="no DynamicVolumeMount to be left",
        )  # fmt: skip
        # Registered by the controller itself (local overlay), not part of the kustomization.
        self.kubectl(
            "delete", "mutatingwebhookconfiguration,validatingwebhookconfiguration", "dynvol",
            "--ignore-not-found", check=False,
        )  # fmt: skip
        self.kubectl(
            "delete", "-k", str(self.overlay), "--ignore-not-found", "--wait=true",
            "--timeout=120s", check=False, timeout=150,
        )  # fmt: skip
