"""Where the apiserver is and how to authenticate to it, without the generated client.

A service in a pod reads its service account (:func:`in_cluster`); a process outside the
cluster reads a kubeconfig file (:func:`from_kubeconfig_file`). Both give an
:class:`Endpoint` that :class:`~dynvol_kube.client.Client` sends its requests to over its
own aiohttp session.

Importing ``kubernetes_asyncio.client`` imports every generated API and model module: about
40 MiB of resident memory and half a second of CPU in every process, for code dynvol never
calls (it speaks plain JSON). So the two common cases are read here: the in-cluster service
account, and kubeconfig files whose credentials are static (client certificate and key,
bearer token or token file, basic auth). A kubeconfig that needs anything else (an ``exec``
credential plugin, an ``auth-provider``, impersonation, a proxy) is left to
kubernetes_asyncio's loader, which supports all of them: :func:`from_kubeconfig_file` returns
``None`` for it and the client falls back to the library (docs/library.md).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "SERVICE_ACCOUNT_DIR",
    "Endpoint",
    "KubeconfigError",
    "TokenSource",
    "from_kubeconfig_file",
    "in_cluster",
]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

#: How long a token read from a file is used before the file is read again. kubelet
#: rotates projected service account tokens well before they expire (at 80 % of their
#: lifetime, an hour at the least), so a minute is far inside that.
TOKEN_REREAD_SECONDS = 60.0

# The kubeconfig fields read here. A cluster or user entry with any other field (other
# than the informational ones) needs kubernetes_asyncio's loader.
_CLUSTER_FIELDS = {
    "server", "certificate-authority", "certificate-authority-data",
    "insecure-skip-tls-verify", "tls-server-name", "extensions",
}  # fmt: skip
_USER_FIELDS = {
    "client-certificate", "client-certificate-data", "client-key", "client-key-data",
    "token", "tokenFile", "username", "password", "extensions",
}  # fmt: skip


class KubeconfigError(ValueError):
    """The configuration cannot be used; the message names the file and the field."""


@attrs.define
class TokenSource:
    """A bearer token, fixed or read from a file (and read again every minute)."""

    token: str | None = None
    path: Path | None = None
    read_at: float = attrs.field(default=0.0, repr=False)

    def current(self) -> str:
        """The token to send now."""
        if self.path is None:
            return _checked(self.token or "", "the token")
        now = time.monotonic()
        if self.token is None or now - self.read_at > TOKEN_REREAD_SECONDS:
            try:
                self.token = _checked(self.path.read_text().strip(), f"the token in {self.path}")
            except OSError as exc:
                if self.token is None:
                    raise KubeconfigError(f"cannot read the token file {self.path}: {exc}") from exc
                # Keep the last token: kubelet swaps the file atomically, so a failed read
                # is transient; the apiserver says so if the old token has expired.
            self.read_at = now
        return self.token or ""


def _checked(token: str, what: str) -> str:
    """``token`` if it can be sent in a header: printable ASCII without spaces."""
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in token):
        raise KubeconfigError(f"{what} has a space, a control or a non-ASCII character")
    return token


@attrs.frozen
class Endpoint:
    """The apiserver's URL, the TLS settings to reach it and the credentials to send."""

    server: str
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    token: TokenSource | None = None
    basic_auth: str | None = None
    source: str = ""
    namespace: str | None = None

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for the next request (none for anonymous access)."""
        if self.token is not None:
            value = self.token.current()
            if value:
                return {"Authorization": f"Bearer {value}"}
        if self.basic_auth is not None:
            return {"Authorization": f"Basic {self.basic_auth}"}
        return {}


def in_cluster(directory: Path = SERVICE_ACCOUNT_DIR) -> Endpoint:
    """The apiserver as a pod sees it: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the pod's
    service account token and CA (the token file is read again as kubelet rotates it)."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeconfigError(
            "no kubeconfig was given (--kubeconfig or $KUBECONFIG), there is no "
            "~/.kube/config, and this is not a pod: KUBERNETES_SERVICE_HOST and "
            "KUBERNETES_SERVICE_PORT are not set"
        )
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    token_path = directory / "token"
    ca_path = directory / "ca.crt"
    if not token_path.is_file():
        raise KubeconfigError(
            f"in the cluster, but there is no service account token at {token_path}"
        )
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
    except (OSError, ssl.SSLError) as exc:
        raise KubeconfigError(f"cannot load the cluster CA {ca_path}: {exc}") from exc
    namespace: str | None = None
    with contextlib.suppress(OSError):
        namespace = (directory / "namespace").read_text().strip() or None
    return Endpoint(
        server=f"https://{host}:{port}", ssl_context=context, token=TokenSource(path=token_path),
        source="the pod's service account", namespace=namespace,
    )  # fmt: skip


def from_kubeconfig_file(
    path: str | os.PathLike[str], *, context: str | None = None
) -> Endpoint | None:
    """The endpoint of ``context`` (default: the current context) in the kubeconfig at
    ``path``; ``None`` when its credentials need kubernetes_asyncio's loader."""
    import yaml  # only here: a pod's service account needs no YAML parser

    file = Path(path).expanduser()
    try:
        config = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise KubeconfigError(f"cannot read the kubeconfig {file}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise KubeconfigError(f"{file} is not YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise KubeconfigError(f"{file} is not a kubeconfig (not a mapping)")
    name = context or config.get("current-context")
    if not name:
        raise KubeconfigError(f"{file}: no context was given and current-context is not set")
    ctx = _entry(config, "contexts", name, "context", file)
    cluster = _entry(config, "clusters", ctx.get("cluster"), "cluster", file)
    user = _entry(config, "users", ctx.get("user"), "user", file) if ctx.get("user") else {}
    if set(cluster) - _CLUSTER_FIELDS or set(user) - _USER_FIELDS:
        return None  # exec, auth-provider, impersonation, proxy-url, ...: the library's
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise KubeconfigError(f"{file}: cluster {ctx.get('cluster')!r} has no http(s) server")
    base = file.parent
    where = f"{file} (context {name!r})"
    ssl_context: ssl.SSLContext | None = None
    if server.startswith("https://"):
        ssl_context = _ssl_context(cluster, user, base, where)
    token: TokenSource | None = None
    if user.get("token"):
        token = TokenSource(token=str(user["token"]))
    elif user.get("tokenFile"):
        token = TokenSource(path=_path(base, user["tokenFile"]))
    basic: str | None = None
    if user.get("username"):
        pair = f"{user['username']}:{user.get('password', '')}".encode()
        basic = base64.b64encode(pair).decode()
    return Endpoint(
        server=server.rstrip("/"), ssl_context=ssl_context,
        server_hostname=cluster.get("tls-server-name") or None, token=token,
        basic_auth=basic, source=where, namespace=ctx.get("namespace") or None,
    )  # fmt: skip


def _entry(
    config: Mapping[str, Any], section: str, name: object, field: str, file: Path
) -> dict[str, Any]:
    for item in config.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(field) or {}
            if not isinstance(value, dict):
                raise KubeconfigError(f"{file}: {section}[{name!r}].{field} is not a mapping")
            return value
    raise KubeconfigError(f"{file}: {section} has no entry named {name!r}")


def _path(base: Path, value: object) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _decoded(value: object, field: str, where: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KubeconfigError(f"{where}: {field} is not base64: {exc}") from exc


def _ssl_context(
    cluster: Mapping[str, Any], user: Mapping[str, Any], base: Path, where: str
) -> ssl.SSLContext:
    try:
        if cluster.get("certificate-authority-data"):
            data = _decoded(
                cluster["certificate-authority-data"], "certificate-authority-data", where
            )
            context = ssl.create_default_context(cadata=data.decode("ascii", "replace"))
        elif cluster.get("certificate-authority"):
            ca = _path(base, cluster["certificate-authority"])
            context = ssl.create_default_context(cafile=str(ca))
        else:
            context = ssl.create_default_context()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise KubeconfigError(f"{where}: cannot load the cluster's CA: {exc}") from exc
    if cluster.get("insecure-skip-tls-verify"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    cert = _pem(user, "client-certificate", base, where)
    key = _pem(user, "client-key", base, where)
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise KubeconfigError(
                f"{where}: a client certificate needs both the certificate and the key"
            )
        try:
            with _files(cert, key) as (cert_file, key_file):
                context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise KubeconfigError(f"{where}: cannot load the client certificate: {exc}") from exc
    return context


def _pem(user: Mapping[str, Any], field: str, base: Path, where: str) -> bytes | Path | None:
    if user.get(f"{field}-data"):
        return _decoded(user[f"{field}-data"], f"{field}-data", where)
    if user.get(field):
        return _path(base, user[field])
    return None


@contextlib.contextmanager
def _files(*items: bytes | Path) -> Iterator[tuple[str, ...]]:
    """Paths for ``load_cert_chain`` (which reads files only): inline data goes to a private
    temporary directory that is removed as soon as the context has read it."""
    if all(isinstance(item, Path) for item in items):
        yield tuple(str(item) for item in items)
        return
    with tempfile.TemporaryDirectory(prefix="dynvol-kubeconfig-") as tmp:
        paths = []
        for index, item in enumerate(items):
            if isinstance(item, Path):
                paths.append(str(item))
                continue
            target = Path(tmp) / f"{index}.pem"
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(item)
            paths.append(str(target))
        yield tuple(paths)
