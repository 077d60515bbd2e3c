#!/usr/bin/env python3
"""Build dynvol's container images on this machine, with no registry and no daemon.

    hack/images/build.py build [IMAGE...]          build (or reuse) OCI archives; print paths
    hack/images/build.py import --address SOCK [IMAGE...]
                                                   build, then import into containerd (k8s.io)
    hack/images/build.py list                      the images and their names

IMAGE is one of: pause, busybox, dynvol (default: these three), coredns, e2e-busybox,
provider-example.

Every image is an OCI image layout packed as a tar archive (``oci-layout``, ``index.json``,
``blobs/sha256/...``) with uncompressed layers, imported with ``ctr images import``.

- ``pause``: a static C program (hack/images/pause.c), the pod sandbox process.
- ``busybox``: the workload image for tests: Debian's busybox-static from this machine.
- ``e2e-busybox``: the same image under the name of the upstream e2e suite's busybox
  (``registry.k8s.io/e2e-test-images/busybox:<tag>``), for ``make test-upstream``.
- ``coredns``: the multi-node cluster's DNS: the static CoreDNS that
  ``hack/tools/build.sh coredns`` builds into ``.tools/bin``, alone on an empty base.
- ``dynvol``: the repository's ``Dockerfile``, built by ``buildah build --isolation
  chroot`` on ``localhost/debian:bookworm-slim``, a base this script makes with debootstrap
  from bookworm, bookworm-updates and bookworm-security, shaped like Debian's slim image.
  The pip configuration and CA bundle of this machine reach the build as build secrets.
- ``provider-example``: a third-party provider's image, built the way its author would:
  ``examples/dynvol-provider-example/Dockerfile``, ``FROM`` the ``dynvol`` image above
  (built first), with the example package pip-installed into dynvol's virtualenv.

The tars this script writes itself (pause, busybox, the Debian base) have sorted names,
zeroed times and numeric owners, so the same inputs give the same digests.

Everything built is cached under ``$DYNVOL_IMAGE_CACHE`` (default
``~/.cache/dynvol/images``) in directories named ``<name>-<key>``, where the key is a digest
of the inputs; buildah's storage (its layer cache) is ``<cache>/buildah``. dynvol's key
covers the Dockerfile, the build context, the pins and the Debian package state (a digest
of the three suites' package indices, read from the mirror on every run): a second run with
the same inputs only checks that the archive exists.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOP = HERE.parent.parent

#: Bump to rebuild every image (the keys include it).
RECIPE = "3"
SUITE = "bookworm"
#: One fixed time for configs and tar entries, for reproducible digests.
EPOCH = 0
CREATED = "1970-01-01T00:00:00Z"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

IMAGE_NAMES = {
    "pause": "localhost/dynvol/pause:dev",
    "busybox": "localhost/dynvol/busybox:dev",
    "coredns": "localhost/dynvol/coredns:dev",
    "dynvol": "localhost/dynvol/dynvol:dev",
    # The busybox above under the name the upstream e2e suite (e2e.test of the pinned
    # Kubernetes, `e2e.test --list-images`) gives its default test image, so that its pods
    # start with imagePullPolicy IfNotPresent and never pull (docs/upstream-e2e.md).
    "e2e-busybox": "registry.k8s.io/e2e-test-images/busybox:1.37.0-2",
    "provider-example": "localhost/dynvol/provider-example:dev",
}

#: What `build` and `import` do without image names (the single-node cluster's images; the
#: multi-node cluster's DNS and the e2e suite's busybox only on request).
DEFAULT_IMAGES = ("pause", "busybox", "dynvol")


def log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    env = os.environ.get("DYNVOL_IMAGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynvol" / "images"


def run(argv: Sequence[str], **kw: object) -> None:
    subprocess.run(list(argv), check=True, **kw)  # type: ignore[call-overload]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def key_of(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Layer:
    """An uncompressed layer tar; for those, digest and diff_id are the same."""

    path: Path
    digest: str
    size: int
    created_by: str

    @classmethod
    def from_tar(cls, path: Path, created_by: str) -> Layer:
        meta = path.with_suffix(".json")
        stat = path.stat()
        if meta.exists():
            saved = json.loads(meta.read_text())
            if saved["size"] == stat.st_size and saved["mtime"] == stat.st_mtime_ns:
                return cls(path, saved["digest"], stat.st_size, created_by)
        digest = "sha256:" + sha256_file(path)
        meta.write_text(
            json.dumps({"digest": digest, "size": stat.st_size, "mtime": stat.st_mtime_ns})
        )
        return cls(path, digest, stat.st_size, created_by)


def tar_dir(src: Path, out: Path) -> None:
    """A reproducible tar of the contents of ``src`` (entries relative to it)."""
    tmp = out.with_suffix(".partial")
    run(
        [
            "tar",
            "--sort=name",
            f"--mtime=@{EPOCH}",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=security.capability",
            "--pax-option=delete=atime,delete=ctime",
            "--format=posix",
            "-C",
            str(src),
            "-cf",
            str(tmp),
            ".",
        ]
    )
    tmp.rename(out)


def write_archive(
    *, name: str, layers: Sequence[Layer], config: dict[str, object], out: Path
) -> None:
    """Write an OCI image layout holding one image as a tar archive at ``out``."""
    image_config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created": CREATED, "created_by": layer.created_by} for layer in layers],
    }
    config_blob = json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(config_blob).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_blob)},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size} for layer in layers
        ],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_blob).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_blob),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    # containerd names the imported image after this annotation.
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                },
            }
        ],
    }

    def add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
        info = tarfile.TarInfo(arcname)
        info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
        tar.addfile(info, fileobj=_BytesReader(data))

    tmp = out.with_suffix(".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(tar, "index.json", json.dumps(index, indent=1).encode())
        add_bytes(tar, f"blobs/sha256/{config_digest[7:]}", config_blob)
        add_bytes(tar, f"blobs/sha256/{manifest_digest[7:]}", manifest_blob)
        seen = set()
        for layer in layers:
            if layer.digest in seen:
                continue
            seen.add(layer.digest)
            info = tar.gettarinfo(str(layer.path), arcname=f"blobs/sha256/{layer.digest[7:]}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
            with layer.path.open("rb") as f:
                tar.addfile(info, fileobj=f)
    tmp.rename(out)
    (out.parent / "image.json").write_text(
        json.dumps(
            {
                "name": name,
                "manifest": manifest_digest,
                "config": config_digest,
                "layers": [{"digest": layer.digest, "size": layer.size} for layer in layers],
            },
            indent=1,
        )
    )


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return chunk


@dataclass(frozen=True)
class Built:
    name: str
    archive: Path
    reused: bool
    seconds: float


def _cached(image: str, key: str, build: Callable[[Path], None]) -> Built:
    """Build into ``<cache>/<image>-<key>/image.tar`` unless it is already there."""
    start = time.monotonic()
    out_dir = cache_root() / f"{image}-{key}"
    archive = out_dir / "image.tar"
    if archive.exists():
        return Built(IMAGE_NAMES[image], archive, True, time.monotonic() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"building {image} into {out_dir}")
    build(out_dir)
    return Built(IMAGE_NAMES[image], archive, False, time.monotonic() - start)


# --- pause -------------------------------------------------------------------------------


def pause_key() -> str:
    return key_of(RECIPE, (HERE / "pause.c").read_bytes())


def build_pause() -> Built:
    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="dynvol-pause-") as tmp:
            root = Path(tmp) / "rootfs"
            root.mkdir()
            run(["gcc", "-static", "-Os", "-s", "-o", str(root / "pause"), str(HERE / "pause.c")])
            tar_dir(root, out / "layer.tar")
        layer = Layer.from_tar(out / "layer.tar", "gcc -static hack/images/pause.c")
        write_archive(
            name=IMAGE_NAMES["pause"],
            layers=[layer],
            out=out / "image.tar",
            config={"Entrypoint": ["/pause"], "WorkingDir": "/"},
        )

    return _cached("pause", pause_key(), build)


# --- busybox -----------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")


def busybox_key() -> str:
    if not BUSYBOX.exists():
        raise SystemExit("images: /bin/busybox is missing: apt-get install busybox-static")
    return key_of(RECIPE, BUSYBOX.read_bytes())


def build_busybox(image: str = "busybox") -> Built:
    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="dynvol-busybox-") as tmp:
            root = Path(tmp) / "rootfs"
            for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev", "data"):
                (root / d).mkdir(parents=True)
            (root / "tmp").chmod(0o1777)
            shutil.copy2(BUSYBOX, root / "bin" / "busybox")
            applets = subprocess.run(
                [str(BUSYBOX), "--list"], check=True, text=True, capture_output=True
            ).stdout.split()
            for applet in applets:
                if applet != "busybox":
                    (root / "bin" / applet).symlink_to("busybox")
            (root / "etc" / "passwd").write_text(
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
            )
            (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
            tar_dir(root, out / "layer.tar")
        layer = Layer.from_tar(out / "layer.tar", "busybox-static from Debian")
        write_archive(
            name=IMAGE_NAMES[image],
            layers=[layer],
            out=out / "image.tar",
            config={"Cmd": ["sh"], "WorkingDir": "/", "Env": ["PATH=/bin"]},
        )

    return _cached(image, busybox_key(), build)


def build_e2e_busybox() -> Built:
    return build_busybox("e2e-busybox")


# --- coredns -----------------------------------------------------------------------------

COREDNS = TOP / ".tools" / "bin" / "coredns"


def coredns_binary() -> bytes:
    if not COREDNS.exists():
        raise SystemExit(f"images: {COREDNS} is missing: run 'hack/tools/build.sh coredns'")
    data = COREDNS.read_bytes()
    # A static binary has no program interpreter (PT_INTERP, program header type 3).
    if not data.startswith(b"\x7fELF\x02\x01") or _has_interpreter(data):
        raise SystemExit(f"images: {COREDNS} is not a static x86-64 ELF binary (CGO_ENABLED=0)")
    return data


def _has_interpreter(elf: bytes) -> bool:
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    size = int.from_bytes(elf[0x36:0x38], "little")
    count = int.from_bytes(elf[0x38:0x3A], "little")
    return any(
        int.from_bytes(elf[phoff + i * size : phoff + i * size + 4], "little") == 3
        for i in range(count)
    )


def build_coredns() -> Built:
    binary = coredns_binary()

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="dynvol-coredns-") as tmp:
            root = Path(tmp) / "rootfs"
            for d in ("etc/coredns", "tmp"):
                (root / d).mkdir(parents=True)
            (root / "tmp").chmod(0o1777)
            (root / "coredns").write_bytes(binary)
            (root / "coredns").chmod(0o755)
            tar_dir(root, out / "layer.tar")
        layer = Layer.from_tar(out / "layer.tar", "hack/tools/build.sh coredns (static)")
        write_archive(
            name=IMAGE_NAMES["coredns"],
            layers=[layer],
            out=out / "image.tar",
            config={"Entrypoint": ["/coredns"], "WorkingDir": "/"},
        )

    return _cached("coredns", key_of(RECIPE, binary), build)


# --- dynvol ------------------------------------------------------------------------------
#
# The Dockerfile is the one definition of dynvol's image. It is built with buildah
# (``--isolation chroot``: no daemon, no container runtime) in a storage of this cache's
# own, on a base made here with debootstrap: Debian bookworm with its updates and security
# suites, shaped like Debian's official slim image. The result is pushed to an OCI archive
# that ``import`` feeds to containerd.

#: The Debian suites of the base image, all from the component ``main``.
SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
BASE_NAME = "localhost/debian:bookworm-slim"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
HOST_APT_SOURCES = Path("/etc/apt")

#: dpkg leaves these out of every package installed on the base (as the slim image does);
#: copyright files stay, they are the packages' licences.
DPKG_SLIM = """\
# A container image needs no documentation, manuals or translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
#: apt keeps no downloaded packages or binary caches, fetches no translations, keeps its
#: lists compressed and does not treat Suggests as important.
_APT_CLEAN = (
    '"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb'
    ' /var/cache/apt/*.bin || true"'
)
APT_SLIM = f"""\
DPkg::Post-Invoke {{ {_APT_CLEAN}; }};
APT::Update::Post-Invoke {{ {_APT_CLEAN}; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
Apt::AutoRemove::SuggestsImportant "false";
"""
#: Services never start while packages are installed into an image.
POLICY_RC_D = "#!/bin/sh\n# no service starts inside an image build\nexit 101\n"


@dataclass(frozen=True)
class Mirrors:
    """Where apt gets Debian's packages: the host's own configuration, or the environment's
    ``DYNVOL_DEBIAN_MIRROR`` and ``DYNVOL_DEBIAN_SECURITY_MIRROR``."""

    main: str
    security: str

    def of(self, suite: str) -> str:
        return self.security if suite.endswith("-security") else self.main

    def sources(self) -> str:
        """The base image's /etc/apt/sources.list.d/debian.sources (deb822)."""
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        return (
            f"Types: deb\nURIs: {self.main}\nSuites: {SUITE} {SUITE}-updates\n"
            f"Components: main\nSigned-By: {keyring}\n\n"
            f"Types: deb\nURIs: {self.security}\nSuites: {SUITE}-security\n"
            f"Components: main\nSigned-By: {keyring}\n"
        )


def _check_mirror(uri: str, what: str) -> str:
    uri = uri.strip().rstrip("/")
    scheme, sep, rest = uri.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or any(c.isspace() for c in uri):
        raise SystemExit(f"images: {what} {uri!r} is not an http(s) URI")
    return uri


def host_suite_uris(apt_dir: Path = HOST_APT_SOURCES) -> dict[str, str]:
    """The first URI the host's apt uses for each suite (one-line and deb822 sources)."""
    found: dict[str, str] = {}
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            words = raw.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                if words[1].startswith("["):
                    while words and not words[0].endswith("]"):
                        words.pop(0)
                    words = ["deb", *words[1:]]
                if len(words) >= 3:
                    found.setdefault(words[2], words[1])
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        if not path.is_file():
            continue
        for para in path.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in para.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            uris = fields.get("uris", "").split()
            for suite in fields.get("suites", "").split():
                if uris:
                    found.setdefault(suite, uris[0])
    return found


def mirrors() -> Mirrors:
    host = host_suite_uris()
    main = os.environ.get("DYNVOL_DEBIAN_MIRROR") or host.get(SUITE) or DEFAULT_MIRROR
    security = (
        os.environ.get("DYNVOL_DEBIAN_SECURITY_MIRROR")
        or host.get(f"{SUITE}-security")
        or DEFAULT_SECURITY_MIRROR
    )
    return Mirrors(
        _check_mirror(main, f"DYNVOL_DEBIAN_MIRROR (or the host's apt source for {SUITE})"),
        _check_mirror(
            security,
            f"DYNVOL_DEBIAN_SECURITY_MIRROR (or the host's apt source for {SUITE}-security)",
        ),
    )


def mirror() -> str:
    return mirrors().main


def packages_indices(in_release: str) -> list[str]:
    """The SHA256 lines of a suite's InRelease that name main's amd64 package lists: they
    change exactly when a package of that suite is added, updated or removed."""
    lines, in_sha256 = [], False
    for line in in_release.splitlines():
        if not line[:1].isspace():
            in_sha256 = line.strip() == "SHA256:"
            continue
        words = line.split()
        if in_sha256 and len(words) == 3 and words[2].startswith("main/binary-amd64/Packages"):
            lines.append(" ".join(words))
    return sorted(lines)


def debian_state(m: Mirrors, *, timeout: float = 30.0) -> str:
    """A digest of the Debian package state the base is built from (three small downloads)."""
    parts: list[str | bytes] = []
    for suite in SUITES:
        url = f"{m.of(suite)}/dists/{suite}/InRelease"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                text = response.read().decode("utf-8", "replace")
        except (OSError, urllib.error.URLError) as err:
            raise DebianUnreachable(f"{url}: {err}") from err
        indices = packages_indices(text)
        if not indices:
            raise DebianUnreachable(f"{url} lists no main/binary-amd64/Packages")
        parts += [suite, "\n".join(indices)]
    return key_of(*parts)


class DebianUnreachable(Exception):
    """The Debian archive could not be asked for its package state."""


def _slim_rootfs(root: Path) -> None:
    """Remove what the slim image does not carry from a root made by debootstrap (the dpkg
    excludes keep later packages from bringing it back)."""
    doc = root / "usr/share/doc"
    for entry in doc.iterdir() if doc.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            for sub in entry.iterdir():
                if sub.name != "copyright":
                    shutil.rmtree(sub) if sub.is_dir() and not sub.is_symlink() else sub.unlink()
            if not any(entry.iterdir()):
                entry.rmdir()
        else:
            entry.unlink()
    for rel in ("usr/share/man", "usr/share/groff", "usr/share/info", "usr/share/lintian",
                "usr/share/linda"):  # fmt: skip
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir()
    locale = root / "usr/share/locale"
    for entry in locale.iterdir() if locale.is_dir() else ():
        if entry.name != "locale.alias":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for rel in ("var/lib/apt/lists", "var/cache/apt", "var/log", "tmp", "dev", "run"):
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()
    (root / "var/lib/apt/lists/partial").mkdir()
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    # debootstrap copies the host's name and resolver; the runtime provides both.
    for rel in ("etc/resolv.conf", "etc/hostname"):
        (root / rel).unlink(missing_ok=True)


def _base_key(m: Mirrors, state: str) -> str:
    return key_of(RECIPE, " ".join(SUITES), m.main, m.security, state, DPKG_SLIM, APT_SLIM)


def build_debian_base(m: Mirrors, state: str) -> Path:
    """The slim-shaped bookworm base as an OCI archive, cached by the Debian state."""
    out = cache_root() / f"debian-base-{_base_key(m, state)}"
    archive = out / "image.tar"
    if archive.exists():
        return archive
    if shutil.which("debootstrap") is None:
        raise SystemExit("images: debootstrap is missing: apt-get install debootstrap")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="dynvol-debian-") as tmp:
        root = Path(tmp) / "rootfs"
        log(f"debootstrap {SUITE} from {m.main} (a few minutes)")
        run(
            ["debootstrap", "--variant=minbase", "--components=main", SUITE, str(root), m.main],
            stdout=subprocess.DEVNULL,
        )
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(m.sources())
        (root / "etc/dpkg/dpkg.cfg.d/90slim").write_text(DPKG_SLIM)
        (root / "etc/apt/apt.conf.d/90slim").write_text(APT_SLIM)
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        log(f"apt-get upgrade from {', '.join(SUITES)}")
        chroot(root, ["apt-get", "update", "-qq"])
        chroot(root, ["apt-get", "upgrade", "-y", "-qq"], quiet=True)
        chroot(root, ["apt-get", "clean"])
        _slim_rootfs(root)
        tar_dir(root, out / "layer.tar")
    layer = Layer.from_tar(out / "layer.tar", f"debootstrap --variant=minbase {' '.join(SUITES)}")
    write_archive(
        name=BASE_NAME,
        layers=[layer],
        out=archive,
        config={
            "Cmd": ["bash"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
    )
    (out / "layer.tar").unlink()
    (out / "layer.json").unlink(missing_ok=True)
    return archive


def buildah(*args: str) -> list[str]:
    """buildah with this cache's own storage, which the machine's other users never see.

    ``skip_mount_home``: by default the overlay driver bind-mounts its storage directory
    onto itself while it has something mounted (to make it private), and counts that in
    the storage's run directory, which every mount namespace shares. When a buildah in
    another namespace holds a mount at the same time (the nodes lane building the example
    provider's image while the api lane's image test has the image mounted), the count
    never drops to zero in between and the bind mount is left in the test step's
    namespace: its leak check failed a cold ``make test``. Reproduced and gone with the
    option by a buildah ``mount`` in the machine's namespace overlapping one in an
    ``unshare --mount`` of its own. The containers' own overlays are made and removed by
    buildah either way.
    """
    if shutil.which("buildah") is None:
        raise SystemExit("images: buildah is missing: apt-get install buildah (hack/setup.sh)")
    store = cache_root() / "buildah"
    return [
        "buildah",
        "--root",
        str(store / "storage"),
        "--runroot",
        str(store / "run"),
        "--storage-driver",
        "overlay",
        "--storage-opt",
        "overlay.skip_mount_home=true",
        *args,
    ]


def _output(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), check=True, text=True, capture_output=True).stdout


def storage_images() -> list[dict[str, object]]:
    """The images in buildah's storage (``buildah images NAME`` fails on a missing NAME)."""
    return list(json.loads(_output(buildah("images", "--json")) or "[]"))


def load_base(archive: Path) -> str:
    """Make the base ``BASE_NAME`` in buildah's storage; returns its image ID."""
    want = json.loads((archive.parent / "image.json").read_text())["config"].removeprefix("sha256:")
    if any(
        image.get("id") == want and BASE_NAME in (image.get("names") or [])
        for image in storage_images()
    ):
        return want
    log(f"loading {BASE_NAME} into buildah's storage")
    image_id = _output(buildah("pull", "--quiet", f"oci-archive:{archive}")).strip()
    run(buildah("tag", image_id, BASE_NAME))
    return image_id


#: The files of the build context outside the Python packages, and the build's recipe.
CONTEXT_TOP_FILES = (
    "pyproject.toml",
    "README.md",
    "hack/constraints.txt",
    "hack/images/pinned.py",
    "hack/images/slim.py",
    "Dockerfile",
    ".dockerignore",
)


def context_files() -> list[Path]:
    """The build context as .dockerignore lets it through (the metadata, the pins, the
    Python packages): the files the image is made of, and so part of its cache key."""
    files = [TOP / rel for rel in CONTEXT_TOP_FILES]
    for pkg in sorted(TOP.glob("dynvol*")):
        if not pkg.is_dir() or pkg.name.endswith(".egg-info"):
            continue
        for path in sorted(pkg.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files


def app_key(base: str, state: str) -> str:
    parts: list[str | bytes] = [RECIPE, base, state]
    for path in context_files():
        parts += [str(path.relative_to(TOP)), path.read_bytes()]
    return key_of(*parts)


def chroot(
    root: Path, argv: Sequence[str], env: dict[str, str] | None = None, *, quiet: bool = False
) -> None:
    clean = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    run(
        ["chroot", str(root), *argv],
        env={**clean, **(env or {})},
        stdout=subprocess.DEVNULL if quiet else None,
    )


def host_ca() -> Path | None:
    """The CA bundle this machine's pip trusts (a proxy's CA, for one)."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


def host_pip_config(listed: str) -> str:
    """A pip configuration file for the build from ``pip config list`` on this machine
    (files and ``PIP_*`` variables). Settings naming a host path are left out: the build
    cannot see them (the CA goes in as its own secret)."""
    sections: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        name, sep, quoted = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot or not key:
            continue
        value = quoted.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if value.startswith("/") or key in ("cert", "client-cert") or "\n" in value:
            continue
        section = "global" if section == ":env:" else section
        sections.setdefault(section, {})[key] = value
    return "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(items.items()))
        for section, items in sorted(sections.items())
    )


def _pip_config_list() -> str:
    pip = TOP / ".venv" / "bin" / "pip"
    argv = [str(pip)] if pip.exists() else [sys.executable, "-m", "pip"]
    done = subprocess.run([*argv, "config", "list"], text=True, capture_output=True, check=False)
    return done.stdout if done.returncode == 0 else ""


def finish_archive(pushed: Path, out: Path, name: str) -> dict[str, object]:
    """Copy the archive ``buildah push`` wrote to ``out``, naming the image for containerd
    (``ctr images import`` names an image after ``io.containerd.image.name``, as in the
    archives written here), and return its metadata for image.json: the digests, the size
    of each layer as stored (gzip) and unpacked, and the config's environment."""
    with tarfile.open(pushed) as src:
        members = {m.name.removeprefix("./"): m for m in src.getmembers()}

        def read(name_in_tar: str) -> bytes:
            f = src.extractfile(members[name_in_tar])
            if f is None:
                raise SystemExit(f"images: {pushed} has no file {name_in_tar}")
            return f.read()

        def blob(digest: str) -> dict[str, Any]:
            return dict(json.loads(read(f"blobs/sha256/{digest.removeprefix('sha256:')}")))

        index = json.loads(read("index.json"))
        if len(index.get("manifests", [])) != 1:
            raise SystemExit(f"images: {pushed} should hold one image")
        entry = index["manifests"][0]
        entry.setdefault("annotations", {})["io.containerd.image.name"] = name
        manifest = blob(entry["digest"])
        config = blob(manifest["config"]["digest"])
        layers = []
        for desc in manifest["layers"]:
            f = src.extractfile(members[f"blobs/sha256/{desc['digest'].removeprefix('sha256:')}"])
            assert f is not None
            unpacked = 0
            stream = gzip.GzipFile(fileobj=f) if desc["mediaType"].endswith("+gzip") else f
            while chunk := stream.read(1 << 20):
                unpacked += len(chunk)
            layers.append({"digest": desc["digest"], "size": desc["size"], "unpacked": unpacked})
        tmp = out.with_suffix(".partial")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as dst:
            for member_name, member in members.items():
                if member_name == "index.json":
                    data = json.dumps(index, indent=1).encode()
                    info = tarfile.TarInfo("index.json")
                    info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
                    dst.addfile(info, fileobj=_BytesReader(data))
                elif member.isfile():
                    dst.addfile(member, fileobj=src.extractfile(member))
                else:
                    dst.addfile(member)
        tmp.rename(out)
    return {
        "name": name,
        "manifest": entry["digest"],
        "config": manifest["config"]["digest"],
        "layers": layers,
        "size": sum(layer["unpacked"] for layer in layers),
        "stored": sum(int(layer["size"]) for layer in layers),
        "env": config.get("config", {}).get("Env", []),
    }


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One build of ``name`` at a time on this machine: checkouts share the cache and
    buildah's storage, where the image's tag is the same for all of them."""
    path = cache_root() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build of {name} on this machine")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_dynvol() -> Built:
    with _locked("dynvol"):
        return _build_dynvol()


def _build_dynvol() -> Built:
    m = mirrors()
    try:
        state = debian_state(m)
    except DebianUnreachable as err:
        # Offline: the newest archive built before is the best there is, but say so.
        newest = _newest("dynvol-", exclude="dynvol-base-")
        if newest is None:
            raise SystemExit(f"images: cannot read the Debian package state: {err}") from err
        log(f"WARNING: cannot read the Debian package state ({err}); reusing {newest}")
        return Built(IMAGE_NAMES["dynvol"], newest / "image.tar", True, 0.0)
    base_archive = build_debian_base(m, state)
    base_config = json.loads((base_archive.parent / "image.json").read_text())["config"]
    key = app_key(base_config, state)

    def build(out: Path) -> None:
        load_base(base_archive)
        name = IMAGE_NAMES["dynvol"]
        with tempfile.TemporaryDirectory(prefix="dynvol-build-") as tmp:
            secrets = []
            pip_conf = Path(tmp) / "pip.conf"
            pip_conf.write_text(host_pip_config(_pip_config_list()))
            pip_conf.chmod(0o600)
            secrets += ["--secret", f"id=pipconf,src={pip_conf}"]
            ca = host_ca()
            if ca is not None:
                secrets += ["--secret", f"id=cacert,src={ca}"]
            log(f"buildah build {TOP / 'Dockerfile'} on {BASE_NAME}")
            run(
                buildah(
                    "build",
                    "--isolation",
                    "chroot",
                    "--layers",
                    # A failed step's container goes too: left behind, it pins its image,
                    # and the storage could no longer be pruned.
                    "--force-rm",
                    "--pull=never",
                    "--build-arg",
                    f"BASE={BASE_NAME}",
                    "--build-arg",
                    f"DEBIAN_STATE={state}",
                    *secrets,
                    "-f",
                    str(TOP / "Dockerfile"),
                    "-t",
                    name,
                    str(TOP),
                ),
                stdout=sys.stderr,
            )
        pushed = out / "pushed.tar"
        pushed.unlink(missing_ok=True)
        run(buildah("push", "--quiet", "--format", "oci", name, f"oci-archive:{pushed}:{name}"))
        meta = finish_archive(pushed, out / "image.tar", name)
        pushed.unlink()
        (out / "image.json").write_text(json.dumps(meta, indent=1))

    built = _cached("dynvol", key, build)
    meta = json.loads((built.archive.parent / "image.json").read_text())
    log(
        f"dynvol: image size {meta['size'] / 1e6:.1f} MB unpacked, "
        f"{meta['stored'] / 1e6:.1f} MB compressed (archive {built.archive})"
    )
    prune("debian-base-", keep=base_archive.parent)
    prune("dynvol-", keep=built.archive.parent, exclude="dynvol-base-")
    prune_storage()
    return built


# --- provider-example ----------------------------------------------------------------------

EXAMPLE = TOP / "examples" / "dynvol-provider-example"


def example_context_files() -> list[Path]:
    """The example's build context as its .dockerignore lets it through, and the recipe."""
    files = [
        EXAMPLE / name for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")
    ]
    for path in sorted((EXAMPLE / "src").rglob("*")):
        skipped = "__pycache__" in path.parts or any(p.endswith(".egg-info") for p in path.parts)
        if path.is_file() and not skipped and path.suffix != ".pyc":
            files.append(path)
    return files


def build_provider_example() -> Built:
    """The example provider's image on top of the dynvol image of this checkout, cached by
    the dynvol image's manifest digest and the example's files."""
    base = build_dynvol()
    manifest = json.loads((base.archive.parent / "image.json").read_text())["manifest"]
    parts: list[str | bytes] = [RECIPE, manifest]
    for path in example_context_files():
        parts += [str(path.relative_to(EXAMPLE)), path.read_bytes()]
    key = key_of(*parts)

    def build(out: Path) -> None:
        # buildah's storage is shared by every checkout on this machine, and all of them
        # tag their dynvol image localhost/dynvol/dynvol:dev: build on this checkout's
        # archive under a name of its own digest.
        base_name = f"localhost/dynvol/dynvol:{manifest.removeprefix('sha256:')[:16]}"
        image_id = _output(buildah("pull", "--quiet", f"oci-archive:{base.archive}")).strip()
        run(buildah("tag", image_id, base_name))
        name = IMAGE_NAMES["provider-example"]
        with tempfile.TemporaryDirectory(prefix="dynvol-build-") as tmp:
            pip_conf = Path(tmp) / "pip.conf"
            pip_conf.write_text(host_pip_config(_pip_config_list()))
            pip_conf.chmod(0o600)
            secrets = ["--secret", f"id=pipconf,src={pip_conf}"]
            ca = host_ca()
            if ca is not None:
                secrets += ["--secret", f"id=cacert,src={ca}"]
            log(f"buildah build {EXAMPLE / 'Dockerfile'} FROM {base_name}")
            run(
                buildah(
                    "build", "--isolation", "chroot", "--layers", "--force-rm", "--pull=never",
                    "--build-arg", f"DYNVOL_IMAGE={base_name}", *secrets,
                    "-f", str(EXAMPLE / "Dockerfile"), "-t", name, str(EXAMPLE),
                ),
                stdout=sys.stderr,
            )  # fmt: skip
        pushed = out / "pushed.tar"
        pushed.unlink(missing_ok=True)
        run(buildah("push", "--quiet", "--format", "oci", name, f"oci-archive:{pushed}:{name}"))
        meta = finish_archive(pushed, out / "image.tar", name)
        pushed.unlink()
        (out / "image.json").write_text(json.dumps(meta, indent=1))

    with _locked("provider-example"):
        built = _cached("provider-example", key, build)
    prune("provider-example-", keep=built.archive.parent)
    return built


def _newest(prefix: str, *, exclude: str | None = None) -> Path | None:
    entries = [
        p
        for p in cache_root().glob(f"{prefix}*")
        if (p / "image.tar").exists() and not (exclude and p.name.startswith(exclude))
    ]
    return max(entries, key=lambda p: p.stat().st_mtime, default=None)


def prune_storage() -> None:
    """Keep buildah's storage bounded. Its unnamed images are the layer cache that makes a
    rebuild after a code change fast, so they go only once the storage has grown large."""
    used = _du(cache_root() / "buildah" / "storage")
    if used > STORAGE_LIMIT:
        log(f"buildah storage holds {used / 1e9:.1f} GB; pruning unnamed images")
        run(buildah("rmi", "--prune"), stdout=subprocess.DEVNULL)


#: Past this, the layer cache is dropped (each code change adds ~50 MB of layers).
STORAGE_LIMIT = 3_000_000_000


def _du(path: Path) -> int:
    done = subprocess.run(["du", "-sb", str(path)], text=True, capture_output=True, check=False)
    return int(done.stdout.split()[0]) if done.returncode == 0 and done.stdout else 0


def prune(prefix: str, *, keep: Path, exclude: str | None = None, count: int = 2) -> None:
    """Remove all but the ``count`` newest cache entries named ``prefix<key>``, and never
    ``keep`` (every source edit makes a new dynvol archive)."""
    entries = [
        p
        for p in cache_root().glob(f"{prefix}*")
        if p.is_dir() and not (exclude and p.name.startswith(exclude))
    ]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[count:]:
        if old != keep:
            log(f"pruning {old}")
            shutil.rmtree(old, ignore_errors=True)


BUILDERS: dict[str, Callable[[], Built]] = {
    "pause": build_pause,
    "busybox": build_busybox,
    "dynvol": build_dynvol,
    "e2e-busybox": build_e2e_busybox,
    "coredns": build_coredns,
    "provider-example": build_provider_example,
}


def build_all(images: Iterable[str]) -> list[Built]:
    built = []
    for image in images:
        b = BUILDERS[image]()
        meta_path = b.archive.parent / "image.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        size = int(meta.get("size") or b.archive.stat().st_size)
        log(
            f"{image}: {b.name} {'cached' if b.reused else 'built'} in {b.seconds:.1f}s, "
            f"{size / 1e6:.1f} MB: {b.archive}"
        )
        built.append(b)
    return built


def import_images(address: str, built: Iterable[Built]) -> None:
    """Import into containerd's k8s.io namespace unless that exact image is already there."""
    for b in built:
        manifest = json.loads((b.archive.parent / "image.json").read_text())["manifest"]
        listed = subprocess.run(
            ["ctr", "--address", address, "-n", "k8s.io", "images", "ls"],
            check=True,
            text=True,
            capture_output=True,
        ).stdout
        if any(line.split()[:1] == [b.name] and manifest in line for line in listed.splitlines()):
            continue
        start = time.monotonic()
        run(
            ["ctr", "--address", address, "-n", "k8s.io", "images", "import", str(b.archive)],
            stdout=subprocess.DEVNULL,
        )
        log(f"imported {b.name} in {time.monotonic() - start:.1f}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build")
    p_build.add_argument("images", nargs="*", default=list(DEFAULT_IMAGES))
    p_import = sub.add_parser("import")
    p_import.add_argument("--address", required=True, help="containerd socket")
    p_import.add_argument("images", nargs="*", default=list(DEFAULT_IMAGES))
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for image, name in IMAGE_NAMES.items():
            print(f"{image}\t{name}")
        return 0
    images = args.images or list(DEFAULT_IMAGES)
    unknown = set(images) - set(BUILDERS)
    if unknown:
        parser.error(f"unknown image(s) {sorted(unknown)}; choose from {sorted(BUILDERS)}")
    if os.geteuid() != 0:
        parser.error("run as root: debootstrap, chroot and overlay mounts need it")
    built = build_all(images)
    if args.cmd == "import":
        import_images(args.address, built)
    else:
        for b in built:
            print(b.archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
