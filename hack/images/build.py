#!/usr/bin/env python3
"""Build dynvol's container images on this machine, with no registry and no container engine.

    hack/images/build.py build [IMAGE...]          build (or reuse) OCI archives; print paths
    hack/images/build.py import --address SOCK [IMAGE...]
                                                   build, then import into containerd (k8s.io)
    hack/images/build.py list                      the images, their names and cache keys

IMAGE is one of: pause, busybox, dynvol (default: all three).

Every image is an OCI image layout packed as a tar archive (``oci-layout``, ``index.json``,
``blobs/sha256/...``), written by this script and imported with ``ctr images import``.
Layers are uncompressed tars made by GNU tar with sorted names, zeroed times and numeric
owners, so the same inputs give the same digests.

- ``pause``: a static C program (hack/images/pause.c), the pod sandbox process.
- ``busybox``: the workload image for tests: Debian's busybox-static from this machine.
- ``dynvol``: two layers. The base is a Debian bookworm root file system made with
  ``debootstrap --variant=minbase`` plus python3, fuse3, s3fs, rclone and nfs-common, and a
  virtualenv at /opt/dynvol holding dynvol's runtime dependencies (pinned by
  hack/constraints.txt). The top layer is a wheel of this checkout installed into that
  virtualenv, made in an overlay mount so that it holds only the files the wheel adds.

Everything built is cached under ``$DYNVOL_IMAGE_CACHE`` (default
``~/.cache/dynvol/images``) in directories named ``<name>-<key>``, where the key is a digest
of the inputs: a second run with the same inputs only checks that the archive exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent.parent

#: Bump to rebuild every image (the keys include it).
RECIPE = "3"
SUITE = "bookworm"
#: The Debian packages of the dynvol image's base layer, beyond minbase.
DYNVOL_PACKAGES = (
    "python3",
    "python3-venv",
    "ca-certificates",
    "fuse3",
    "s3fs",
    "rclone",
    "nfs-common",
    "procps",
)
VENV = "/opt/dynvol"
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
    "dynvol": "localhost/dynvol/dynvol:dev",
}


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


def build_busybox() -> Built:
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
            name=IMAGE_NAMES["busybox"],
            layers=[layer],
            out=out / "image.tar",
            config={"Cmd": ["sh"], "WorkingDir": "/", "Env": ["PATH=/bin"]},
        )

    return _cached("busybox", busybox_key(), build)


# --- dynvol ------------------------------------------------------------------------------


def mirror() -> str:
    return os.environ.get("DYNVOL_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def runtime_requirements() -> list[str]:
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def base_key() -> str:
    return key_of(
        RECIPE,
        SUITE,
        mirror(),
        " ".join(DYNVOL_PACKAGES),
        "\n".join(runtime_requirements()),
        (TOP / "hack" / "constraints.txt").read_bytes(),
    )


def source_files() -> list[Path]:
    """The files that go into dynvol's wheel (the importable packages and the metadata)."""
    files = [TOP / "pyproject.toml"]
    for pkg in sorted(TOP.glob("dynvol*")):
        if not pkg.is_dir() or pkg.name.endswith(".egg-info") or not (pkg / "__init__.py").exists():
            continue
        for path in sorted(pkg.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files


def app_key(base: str) -> str:
    parts: list[str | bytes] = [RECIPE, base]
    for path in source_files():
        parts += [str(path.relative_to(TOP)), path.read_bytes()]
    return key_of(*parts)


def chroot(root: Path, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    clean = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    run(["chroot", str(root), *argv], env={**clean, **(env or {})})


def _host_ca_into(root: Path) -> dict[str, str]:
    """pip inside the chroot must trust what the host trusts (a proxy's CA, for one)."""
    host_ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if not host_ca.exists():
        return {}
    shutil.copy(host_ca, root / "tmp" / "host-ca.crt")
    return {"PIP_CERT": "/tmp/host-ca.crt", "SSL_CERT_FILE": "/tmp/host-ca.crt"}


def _slim(root: Path) -> None:
    """Drop what a container never uses: docs, caches, device nodes (the runtime makes /dev)."""
    for rel in (
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/cache/apt",
        "var/lib/apt/lists",
        "var/cache/debconf/templates.dat-old",
        "var/log",
        "tmp",
        "dev",
        "run",
    ):
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()
        elif path.exists():
            path.unlink()
    (root / "tmp").chmod(0o1777)
    for pyc_dir in root.joinpath("usr/lib/python3").rglob("__pycache__"):
        shutil.rmtree(pyc_dir, ignore_errors=True)


def build_dynvol_base() -> tuple[Path, Layer]:
    """The debootstrap root file system and its layer, cached by :func:`base_key`."""
    out = cache_root() / f"dynvol-base-{base_key()}"
    rootfs, layer_tar = out / "rootfs", out / "layer.tar"
    created_by = f"debootstrap --variant=minbase {SUITE} + {' '.join(DYNVOL_PACKAGES)} + venv"
    if layer_tar.exists():
        return rootfs, Layer.from_tar(layer_tar, created_by)
    if shutil.which("debootstrap") is None:
        raise SystemExit("images: debootstrap is missing: apt-get install debootstrap")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log(f"debootstrap {SUITE} into {rootfs} (a few minutes)")
    # debootstrap resolves dependencies naively (it picks fuse for s3fs, which conflicts
    # with fuse3), so it lays down minbase only and apt installs the rest.
    run(
        ["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror()],
        stdout=subprocess.DEVNULL,
    )
    policy = rootfs / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# no service starts while the image is built\nexit 101\n")
    policy.chmod(0o755)
    log(f"apt-get install {' '.join(DYNVOL_PACKAGES)}")
    chroot(rootfs, ["apt-get", "update", "-q"])
    chroot(rootfs, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DYNVOL_PACKAGES])
    chroot(rootfs, ["apt-get", "clean"])
    policy.unlink()
    env = _host_ca_into(rootfs)
    constraints = rootfs / "tmp" / "constraints.txt"
    shutil.copy(TOP / "hack" / "constraints.txt", constraints)
    log(f"virtualenv {VENV} with {', '.join(runtime_requirements())}")
    chroot(rootfs, ["python3", "-m", "venv", VENV])
    chroot(
        rootfs,
        [
            f"{VENV}/bin/pip",
            "install",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "-q",
            "-c",
            "/tmp/constraints.txt",
            *runtime_requirements(),
        ],
        env,
    )
    _slim(rootfs)
    tar_dir(rootfs, layer_tar)
    return rootfs, Layer.from_tar(layer_tar, created_by)


def _whiteouts(upper: Path) -> list[Path]:
    """overlayfs marks deletions with 0:0 character devices; an OCI layer cannot carry them."""
    found = []
    for path in upper.rglob("*"):
        st = path.lstat()
        if (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0:
            found.append(path)
    return found


def build_dynvol() -> Built:
    base_rootfs, base_layer = build_dynvol_base()
    key = app_key(base_layer.digest)

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="dynvol-image-") as tmp:
            wheels = Path(tmp) / "wheels"
            log("building dynvol's wheel")
            python = TOP / ".venv" / "bin" / "python"
            run(
                [
                    str(python if python.exists() else sys.executable),
                    "-m",
                    "pip",
                    "wheel",
                    "--no-deps",
                    "--no-build-isolation",
                    "-q",
                    "-w",
                    str(wheels),
                    str(TOP),
                ],
                cwd=tmp,
            )
            wheel = next(wheels.glob("dynvol-*.whl"))
            upper, work, merged = (Path(tmp) / d for d in ("upper", "work", "merged"))
            for d in (upper, work, merged):
                d.mkdir()
            run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    f"lowerdir={base_rootfs},upperdir={upper},workdir={work}",
                    str(merged),
                ]
            )
            try:
                shutil.copy(wheel, merged / "tmp" / wheel.name)
                chroot(
                    merged,
                    [
                        f"{VENV}/bin/pip",
                        "install",
                        "--no-deps",
                        "--no-index",
                        "--no-cache-dir",
                        "--disable-pip-version-check",
                        "-q",
                        f"/tmp/{wheel.name}",
                    ],
                )
                (merged / "tmp" / wheel.name).unlink()
            finally:
                run(["umount", str(merged)])
            # The upper dir holds the wheel's files plus a removed /tmp entry or two.
            for path in _whiteouts(upper):
                if path.relative_to(upper).parts[0] != "tmp":
                    raise SystemExit(f"images: unexpected deletion in the app layer: {path}")
                path.unlink()
            shutil.rmtree(upper / "tmp", ignore_errors=True)
            tar_dir(upper, out / "layer.tar")
        layer = Layer.from_tar(out / "layer.tar", f"pip install {wheel.name}")
        write_archive(
            name=IMAGE_NAMES["dynvol"],
            layers=[base_layer, layer],
            out=out / "image.tar",
            config={
                "Entrypoint": [f"{VENV}/bin/dynvol"],
                "WorkingDir": "/",
                "Env": [
                    f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8",
                    "PYTHONUNBUFFERED=1",
                ],
            },
        )

    built = _cached("dynvol", key, build)
    prune("dynvol-base-", keep=base_rootfs.parent)
    prune("dynvol-", keep=built.archive.parent, exclude="dynvol-base-")
    return built


def prune(prefix: str, *, keep: Path, exclude: str | None = None, count: int = 2) -> None:
    """Remove all but the ``count`` newest cache entries named ``prefix<key>``, and never
    ``keep`` (every source edit makes a new dynvol archive of ~400 MB)."""
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
}


def build_all(images: Iterable[str]) -> list[Built]:
    built = []
    for image in images:
        b = BUILDERS[image]()
        size = b.archive.stat().st_size
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
    p_build.add_argument("images", nargs="*", default=list(BUILDERS))
    p_import = sub.add_parser("import")
    p_import.add_argument("--address", required=True, help="containerd socket")
    p_import.add_argument("images", nargs="*", default=list(BUILDERS))
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for image, name in IMAGE_NAMES.items():
            print(f"{image}\t{name}")
        return 0
    images = args.images or list(BUILDERS)
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
