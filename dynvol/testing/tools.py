"""The control plane's binaries for an installed dynvol: ``dynvol dev tools install``.

A dynvol checkout builds its test binaries with ``make tools`` (``hack/tools``). Outside a
checkout, the package carries the Go modules that pin the same Kubernetes release and an
etcd (package data under ``dynvol/testing/gotools``), and :func:`install` builds etcd,
kube-apiserver and kubectl from them with the machine's Go into a cache keyed by the
Kubernetes version, ``$XDG_CACHE_HOME/dynvol/tools/<version>/bin`` (``DYNVOL_TOOLS_CACHE``
or ``--dir`` moves the cache). :func:`dynvol.testing.controlplane.default_bin_dir` looks
there after ``KUBEBUILDER_ASSETS``, ``DYNVOL_TOOLS_BIN`` and a checkout's ``.tools/bin``.

A binary is built again only when it is missing or its module (go.mod and go.sum) changed;
a second run takes a moment. Neighbours: :mod:`dynvol.commands.dev` (the command) and
:mod:`dynvol.testing.controlplane` (the lookup).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import attrs

__all__ = [
    "GoBinary",
    "InstallResult",
    "ToolsBuildFailed",
    "install",
    "installed_bin_dir",
    "pinned_binaries",
    "pinned_versions",
    "tools_cache_root",
]

#: The Go modules shipped with the package, by name (a directory of ``gotools``).
MODULES = ("kubernetes", "etcd")
_MODULE_FILES = ("go.mod", "go.sum")
_RELEASE = re.compile(r"v1\.[0-9]{1,3}\.[0-9]{1,3}")


class ToolsBuildFailed(RuntimeError):
    """Go is missing or a build failed; the message says which and what to do."""


@attrs.frozen(kw_only=True)
class GoBinary:
    """One binary built from one of the shipped modules."""

    name: str
    module: str
    package: str
    version: str
    ldflags: str


@attrs.frozen(kw_only=True)
class InstallResult:
    """What :func:`install` did: where the binaries are, which it built and which it kept."""

    bin_dir: Path
    built: tuple[str, ...]
    cached: tuple[str, ...]
    seconds: float


def module_dir(module: str) -> Path:
    """The shipped Go module ``module`` (package data)."""
    if module not in MODULES:
        raise ValueError(f"no Go module {module!r}: one of {', '.join(MODULES)}")
    return Path(str(resources.files("dynvol.testing") / "gotools" / module))


def _required(gomod: str, module: str) -> str:
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)$", gomod, re.M)
    if found is None:
        raise ToolsBuildFailed(f"the shipped go.mod does not require {module}")
    return found.group(1)


def pinned_versions() -> dict[str, str]:
    """The versions the shipped modules pin: ``{"kubernetes": "v1.37.2", "etcd": ...}``."""
    kube = (module_dir("kubernetes") / "go.mod").read_text()
    etcd = (module_dir("etcd") / "go.mod").read_text()
    return {
        "kubernetes": _required(kube, "k8s.io/kubernetes"),
        "etcd": _required(etcd, "go.etcd.io/etcd/server/v3"),
    }


def _k8s_ldflags(version: str) -> str:
    major, minor, _ = version.removeprefix("v").split(".")
    base = "-X k8s.io/component-base/version."
    return (
        f"-s -w {base}gitVersion={version} {base}gitMajor={major} {base}gitMinor={minor} "
        f"{base}gitTreeState=clean"
    )


def pinned_binaries() -> tuple[GoBinary, ...]:
    """etcd, kube-apiserver and kubectl at the shipped pins."""
    versions = pinned_versions()
    kube = versions["kubernetes"]
    if not _RELEASE.fullmatch(kube):
        raise ToolsBuildFailed(f"the shipped Kubernetes pin {kube!r} is not a release")
    return (
        GoBinary(
            name="etcd",
            module="etcd",
            package="go.etcd.io/etcd/server/v3",
            version=versions["etcd"],
            ldflags="-s -w",
        ),
        *(
            GoBinary(
                name=name,
                module="kubernetes",
                package=f"k8s.io/kubernetes/cmd/{name}",
                version=kube,
                ldflags=_k8s_ldflags(kube),
            )
            for name in ("kube-apiserver", "kubectl")
        ),
    )


def tools_cache_root() -> Path:
    """``$DYNVOL_TOOLS_CACHE``, else ``$XDG_CACHE_HOME/dynvol/tools`` (``~/.cache`` when
    unset): the cache ``hack/tools/build.sh`` uses too."""
    env = os.environ.get("DYNVOL_TOOLS_CACHE", "")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dynvol" / "tools"


def installed_bin_dir(root: Path | None = None) -> Path:
    """Where :func:`install` puts the binaries: ``<root>/<Kubernetes version>/bin``."""
    base = tools_cache_root() if root is None else root
    return base / pinned_versions()["kubernetes"] / "bin"


def _digest(module: str) -> str:
    sha = hashlib.sha256()
    for name in _MODULE_FILES:
        sha.update((module_dir(module) / name).read_bytes())
    return sha.hexdigest()[:12]


def install(
    root: Path | None = None,
    *,
    go: str = "go",
    log: Callable[[str], None] = print,
    timeout: float = 3600.0,
) -> InstallResult:
    """Build etcd, kube-apiserver and kubectl with Go into ``installed_bin_dir(root)``.

    Binaries already there from the same module are kept. Raises
    :class:`ToolsBuildFailed` when Go is missing or a build fails, with Go's output.
    """
    start = time.monotonic()
    bin_dir = installed_bin_dir(root)
    version_dir = bin_dir.parent
    record_path = version_dir / "built.json"
    try:
        record: dict[str, str] = json.loads(record_path.read_text())
    except (FileNotFoundError, ValueError):
        record = {}
    todo = []
    cached = []
    for binary in pinned_binaries():
        stamp = f"{binary.version}-{_digest(binary.module)}"
        if os.access(bin_dir / binary.name, os.X_OK) and record.get(binary.name) == stamp:
            cached.append(binary.name)
        else:
            todo.append((binary, stamp))
    go_path = shutil.which(go) if todo else ""
    if todo:
        if go_path is None:
            raise ToolsBuildFailed(
                f"'{go}' is not on PATH: install Go (1.26 or newer for Kubernetes "
                f"{pinned_versions()['kubernetes']}), or set KUBEBUILDER_ASSETS or "
                "DYNVOL_TOOLS_BIN to a directory with etcd, kube-apiserver and kubectl"
            )
        bin_dir.mkdir(parents=True, exist_ok=True)
    # The machine's Go builds every pin; never fetch another toolchain (as hack/tools does).
    env = {**os.environ, "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "local")}
    built = []
    for binary, stamp in todo:
        src = version_dir / "src" / binary.module
        src.mkdir(parents=True, exist_ok=True)
        for name in _MODULE_FILES:
            shutil.copyfile(module_dir(binary.module) / name, src / name)
        partial = bin_dir / f".{binary.name}.partial"
        log(f"tools: building {binary.name} {binary.version} into {bin_dir}")
        began = time.monotonic()
        argv = [
            str(go_path),
            "build",
            "-mod=readonly",
            "-trimpath",
            "-ldflags",
            binary.ldflags,
            "-o",
            str(partial),
            binary.package,
        ]
        try:
            result = subprocess.run(
                argv,
                cwd=src,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            partial.unlink(missing_ok=True)
            raise ToolsBuildFailed(f"building {binary.name} took over {timeout:.0f}s") from exc
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ToolsBuildFailed(
                f"building {binary.name} {binary.version} failed ({' '.join(argv)} in {src}):\n"
                f"{result.stderr.strip()}"
            )
        partial.replace(bin_dir / binary.name)
        record[binary.name] = stamp
        record_path.write_text(json.dumps(record, indent=2, sort_keys=True))
        built.append(binary.name)
        log(f"tools: built {binary.name} in {time.monotonic() - began:.0f}s")
    return InstallResult(
        bin_dir=bin_dir,
        built=tuple(built),
        cached=tuple(cached),
        seconds=time.monotonic() - start,
    )
