"""Real file servers on 127.0.0.1 for tests of the rclone provider: WebDAV and SFTP.

- :class:`WebdavServer`: ``rclone serve webdav`` of a directory, with basic auth from an
  htpasswd file (the password never reaches the server's argv).
- :class:`SftpServer`: Debian's OpenSSH ``sshd -D`` with its own configuration, host key
  and authorized key, serving only SFTP (``internal-sftp``) in a chroot of a directory.

Both are children of this process (:class:`dynvol.testing.processes.Process`), stopped and
reaped by :meth:`stop`. Each gives the rclone options and the Secret data that reach the
server (:meth:`claim_parameters`, :meth:`secret_data`), in the form the ``rclone``
provider takes them: non-secret options in the claim, secrets (obscured where rclone
obscures them) in the class's Secret.

Neighbours: :mod:`dynvol.testing.minio` (S3), ``tests/e2e/test_providers.py`` (the user).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import attrs

from dynvol.testing.processes import Process, free_port, run, wait_until

__all__ = ["SftpServer", "WebdavServer", "obscure"]

#: rclone reads AWS_CA_BUNDLE even for non-S3 remotes and fails when it names no file here.
_RCLONE_ENV_DROP = ("AWS_CA_BUNDLE",)


def _rclone_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _RCLONE_ENV_DROP}


def obscure(password: str) -> str:
    """``rclone obscure`` of ``password`` (read from stdin, so it is in no argv)."""
    return run(["rclone", "obscure", "-"], input=password, env=_rclone_env()).strip()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@attrs.define(kw_only=True)
class WebdavServer:
    """``rclone serve webdav`` of :attr:`served` on 127.0.0.1, user and password required."""

    dir: Path
    user: str = attrs.field(factory=lambda: "dav-" + secrets.token_hex(4))
    password: str = attrs.field(factory=lambda: secrets.token_hex(16), repr=False)
    port: int = 0
    process: Process | None = None

    @property
    def served(self) -> Path:
        """The directory the server serves (its files are the remote's)."""
        return self.dir / "served"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, *, timeout: float = 30.0) -> WebdavServer:
        if shutil.which("rclone") is None:
            raise FileNotFoundError("rclone is not installed (hack/setup.sh installs it)")
        self.served.mkdir(parents=True, exist_ok=True)
        # {SHA} entries: base64 of the SHA-1 of the password (the htpasswd format rclone
        # reads); a test credential, never a stored one.
        digest = base64.b64encode(hashlib.sha1(self.password.encode()).digest()).decode()
        htpasswd = self.dir / "htpasswd"
        htpasswd.write_text(f"{self.user}:{{SHA}}{digest}\n")
        htpasswd.chmod(0o600)
        (self.dir / "empty.conf").write_text("")
        self.port = free_port()
        self.process = Process.start(
            ["rclone", "serve", "webdav", str(self.served),
             "--addr", f"127.0.0.1:{self.port}", "--htpasswd", str(htpasswd),
             "--config", str(self.dir / "empty.conf"), "--log-level", "NOTICE",
             # Its VFS caches listings (5 min by default): files the tests put in the
             # directory itself must show at once.
             "--dir-cache-time", "1s", "--poll-interval", "0"],
            name="rclone-serve-webdav", env=_rclone_env(), log=self.dir / "webdav.log",
        )  # fmt: skip
        wait_until(
            lambda: _listening(self.port),
            timeout=timeout,
            what="rclone serve webdav to listen",
            alive=self.process,
        )
        return self

    def claim_parameters(self) -> dict[str, str]:
        """The claim's ``rcloneConfig.parameters`` for this server."""
        return {"url": self.url, "vendor": "other"}

    def secret_data(self) -> dict[str, str]:
        """The class's Secret: rclone's ``user`` and obscured ``pass``."""
        return {"user": self.user, "pass": obscure(self.password)}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)
            self.process = None


_SSHD = Path("/usr/sbin/sshd")
#: sshd refuses to start without its privilege separation directory (made by the
#: package's service script, which does not run on machines without an init system).
_PRIVSEP_DIR = Path("/run/sshd")


@attrs.define(kw_only=True)
class SftpServer:
    """OpenSSH's sshd on 127.0.0.1 serving SFTP only, chrooted to :attr:`root`.

    The client logs in as ``root`` (the tests run as root, and sshd only lets in users
    of this machine) with a fresh Ed25519 key, and can do nothing but SFTP inside
    :attr:`root`: ``ForceCommand internal-sftp``, no forwarding, no TTY, no password.
    The files it writes are at :attr:`served` (``/data`` in the chroot).

    sshd wants every component of the chroot's path root-owned and writable by no one
    else, which rules out ``/tmp`` (mode 1777); the chroot is a fresh directory under
    :attr:`chroot_parent` (``/run``), removed by :meth:`stop`.
    """

    dir: Path
    user: str = "root"
    chroot_parent: Path = Path("/run")
    port: int = 0
    process: Process | None = None
    client_key_pem: str = attrs.field(default="", repr=False)
    host_public_key: str = ""
    _root: Path | None = None
    _made_privsep: bool = False

    @property
    def root(self) -> Path:
        """The chroot (made by :meth:`start`)."""
        if self._root is None:
            raise RuntimeError("the SFTP server has not been started")
        return self._root

    @property
    def served(self) -> Path:
        """The directory the remote's ``data`` path is."""
        return self.root / "data"

    def start(self, *, timeout: float = 30.0) -> SftpServer:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not os.access(_SSHD, os.X_OK):
            raise FileNotFoundError(
                f"{_SSHD} is missing: openssh-server is not installed (hack/setup.sh)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self._root = Path(tempfile.mkdtemp(prefix="dynvol-sftp-", dir=self.chroot_parent))
        self._root.chmod(0o755)
        self.served.mkdir()

        def private(key: Ed25519PrivateKey) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )

        def public(key: Ed25519PrivateKey) -> str:
            return (
                key.public_key()
                .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                .decode()
            )

        host_key, client_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        host_key_path = self.dir / "ssh_host_ed25519_key"
        host_key_path.write_bytes(private(host_key))
        host_key_path.chmod(0o600)
        self.host_public_key = public(host_key)
        self.client_key_pem = private(client_key).decode()
        authorized = self.dir / "authorized_keys"
        authorized.write_text(public(client_key) + "\n")
        authorized.chmod(0o600)
        self.port = free_port()
        config = self.dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress 127.0.0.1:{self.port}",
                    f"HostKey {host_key_path}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    f"AllowUsers {self.user}",
                    "PermitRootLogin prohibit-password",
                    # Its own files are 0600 in a 0700 directory, but under /tmp (1777).
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "DisableForwarding yes",
                    "PermitTTY no",
                    "PermitUserRC no",
                    "PrintMotd no",
                    "LogLevel INFO",
                    "Subsystem sftp internal-sftp",
                    f"ChrootDirectory {self.root}",
                    "ForceCommand internal-sftp",
                    "",
                ]
            )
        )
        if not _PRIVSEP_DIR.is_dir():
            _PRIVSEP_DIR.mkdir(mode=0o755)
            self._made_privsep = True
        # -D: in the foreground, our child; -e: its log to stderr (the log file).
        self.process = Process.start(
            [str(_SSHD), "-D", "-e", "-f", str(config)],
            name="sshd",
            log=self.dir / "sshd.log",
        )
        wait_until(
            lambda: _listening(self.port),
            timeout=timeout,
            what="sshd to listen",
            alive=self.process,
        )
        return self

    def claim_parameters(self) -> dict[str, str]:
        """The claim's ``rcloneConfig.parameters``: where the server is, and no remote
        shell commands (the server runs nothing but SFTP)."""
        return {
            "host": "127.0.0.1",
            "port": str(self.port),
            "shell_type": "none",
            "disable_hashcheck": "true",
        }

    def secret_data(self) -> dict[str, str]:
        """The class's Secret: rclone's ``user`` and ``key_pem`` (the private key on one
        line, its line ends written ``\\n``, as rclone's sftp backend reads it)."""
        return {"user": self.user, "key_pem": self.client_key_pem.strip().replace("\n", "\\n")}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)
            self.process = None
        if self._made_privsep:
            with contextlib.suppress(OSError):
                _PRIVSEP_DIR.rmdir()
            self._made_privsep = False
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
