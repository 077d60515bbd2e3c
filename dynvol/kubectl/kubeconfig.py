"""Which kubeconfig, context and namespace a command uses, chosen as kubectl chooses them.

The file is ``--kubeconfig``, else the files of ``$KUBECONFIG`` (colon-separated; the first
one that names a context wins), else ``~/.kube/config``; without any, the in-cluster
service account. The namespace is ``-n``, else the context's namespace, else ``default``.
:class:`dynvol_kube.Client` reads the credentials; this module reads only the context's
name and namespace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import yaml

__all__ = ["KubeconfigError", "Target", "resolve"]

_IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeconfigError(Exception):
    """The kubeconfig cannot be read, or does not have the context asked for."""


@attrs.frozen
class Target:
    """Where a command goes: the kubeconfig file (None: in-cluster), context, namespace."""

    kubeconfig: str | None
    context: str | None
    namespace: str


def _files(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit)]
    env = os.environ.get("KUBECONFIG", "")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    default = Path.home() / ".kube" / "config"
    return [default] if default.exists() else []


def _load(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KubeconfigError(f"kubeconfig {path} is not a mapping")
    return data


def resolve(kubeconfig: str | None, context: str | None, namespace: str | None) -> Target:
    """The target of a command given its ``--kubeconfig``, ``--context`` and ``-n``."""
    # An explicit file must exist (kubectl says so too); missing $KUBECONFIG files are skipped.
    configs = [(p, _load(p)) for p in _files(kubeconfig) if kubeconfig or p.exists()]
    if not configs:
        if namespace is None and _IN_CLUSTER_NAMESPACE.exists():
            namespace = _IN_CLUSTER_NAMESPACE.read_text().strip()
        return Target(None, context, namespace or "default")
    current = context or next(
        (c["current-context"] for _, c in configs if isinstance(c.get("current-context"), str)),
        None,
    )
    contexts: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, config in configs:
        for entry in config.get("contexts") or []:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                body = entry.get("context")
                contexts.setdefault(entry["name"], (path, body if isinstance(body, dict) else {}))
    if current is None:
        return Target(str(configs[0][0]), None, namespace or "default")
    if current not in contexts:
        names = ", ".join(sorted(contexts)) or "none"
        where = ", ".join(str(p) for p, _ in configs)
        raise KubeconfigError(
            f"context {current!r} is not in the kubeconfig ({where}); it has: {names}"
        )
    path, body = contexts[current]
    if namespace is None:
        found = body.get("namespace")
        namespace = found if isinstance(found, str) and found else None
    return Target(str(path), current, namespace or "default")
