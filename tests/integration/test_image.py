"""dynvol's image, as the Dockerfile defines it and hack/images/build.py builds it.

The image is built (or reused from the cache) with buildah, exactly as the end-to-end tier
gets it, then looked at without running a container: the OCI archive's config is read
directly, and the archive is unpacked by ``buildah from`` + ``buildah mount`` into a root
that commands run in with ``chroot``, inside a private mount namespace (``unshare``) that
gives them /dev, /proc and the host's resolver and disappears with them.

Needs root and buildah; skipped without them on a developer machine, failed under
``CI=true``. The first run builds the image (about two minutes); later runs reuse it until
the Dockerfile, the sources, the pins or Debian's packages change.

The pure helpers of the build (mirror discovery, Debian package state, pip config, pins)
are checked first, without root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import load_script

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]
IMAGE = "localhost/dynvol/dynvol:dev"
#: The issue's goal: 200 MB. Where the megabytes are is listed in docs/images.md. The image
#: was 374 MB before the Dockerfile built it, 270 MB with ICU (s3fs's libxml2 is built
#: without it now), 234 MB with aiohttp, 222 MB before hack/images/slim.py, 197 MB since.
SIZE_LIMIT = 200_000_000
CLEAN_ENV = {
    "PATH": "/opt/dynvol/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


build = load_script("dynvol_image_build", TOP / "hack" / "images" / "build.py")
pinned = load_script("dynvol_image_pinned", TOP / "hack" / "images" / "pinned.py")
slim = load_script("dynvol_image_slim", TOP / "hack" / "images" / "slim.py")
PROJECT = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]


# --- the build's pure helpers --------------------------------------------------------------


def test_host_suite_uris_reads_one_line_and_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://ignored.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://two.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n"
    )
    found = build.host_suite_uris(tmp_path)
    # The one-line file is read first; deb-src entries are not where binaries come from.
    assert found == {
        "bookworm": "http://one.example/debian",
        "bookworm-updates": "http://two.example/debian",
        "bookworm-security": "http://sec.example/debian-security",
    }


@pytest.mark.parametrize(
    "uri", ["file:///srv/mirror", "ftp://m.example/debian", "http://", "http://a b/debian", ""]
)
def test_a_mirror_must_be_an_http_uri(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNVOL_DEBIAN_MIRROR", uri or " ")
    with pytest.raises(SystemExit, match="DYNVOL_DEBIAN_MIRROR"):
        build.mirrors()


def test_base_sources_name_all_three_suites() -> None:
    m = build.Mirrors("http://m.example/debian", "http://s.example/debian-security")
    text = m.sources()
    assert "URIs: http://m.example/debian\nSuites: bookworm bookworm-updates\n" in text
    assert "URIs: http://s.example/debian-security\nSuites: bookworm-security\n" in text
    assert m.of("bookworm-security") == "http://s.example/debian-security"
    assert m.of("bookworm-updates") == "http://m.example/debian"


IN_RELEASE = """\
Origin: Debian
Date: Sat, 01 Jan 2026 00:00:00 UTC
MD5Sum:
 0123 100 main/binary-amd64/Packages
SHA256:
 aaaa 100 main/binary-amd64/Packages
 bbbb 40 main/binary-amd64/Packages.xz
 cccc 30 main/binary-arm64/Packages.xz
 dddd 20 contrib/binary-amd64/Packages.xz
 eeee 10 main/i18n/Translation-en
"""


def test_package_state_is_the_amd64_main_package_lists_only() -> None:
    assert build.packages_indices(IN_RELEASE) == [
        "aaaa 100 main/binary-amd64/Packages",
        "bbbb 40 main/binary-amd64/Packages.xz",
    ]
    # A new date (the archive re-signed) is not a new package; a new package list is.
    resigned = IN_RELEASE.replace("Sat, 01 Jan", "Sun, 02 Jan")
    assert build.packages_indices(resigned) == build.packages_indices(IN_RELEASE)
    updated = IN_RELEASE.replace("bbbb 40", "ffff 41")
    assert build.packages_indices(updated) != build.packages_indices(IN_RELEASE)


def test_pip_config_for_the_build_leaves_host_paths_out() -> None:
    listed = (
        "global.cert='/etc/ssl/certs/ca-certificates.crt'\n"
        "global.index-url='https://pypi.mirror.example/simple'\n"
        ":env:.default-timeout='180'\n"
        ":env:.find-links='/opt/wheels'\n"
        "install.trusted-host='pypi.mirror.example'\n"
        "not a setting\n"
    )
    assert build.host_pip_config(listed) == (
        "[global]\ndefault-timeout = 180\nindex-url = https://pypi.mirror.example/simple\n"
        "[install]\ntrusted-host = pypi.mirror.example\n"
    )


def test_pins_name_every_distribution_at_its_version() -> None:
    pins = pinned.pins("Foo_Bar==1.0\n# a comment\nbaz==2 # trailing\n\n")
    assert pins == {"foo-bar": "1.0", "baz": "2"}
    installed = {"foo-bar": "1.0", "baz": "3", "qux": "1", "dynvol": "0.1.0"}
    assert pinned.unpinned(installed, pins, own="dynvol") == [
        "baz 3 is installed but the constraints pin 2",
        "qux 1 is not pinned by the constraints",
    ]
    with pytest.raises(SystemExit, match="name==version"):
        pinned.pins("foo>=1\n")


def test_the_repository_pins_the_build_tools() -> None:
    pins = pinned.pins((TOP / "hack" / "constraints.txt").read_text())
    assert {"pip", "setuptools", "wheel"} <= set(pins)


def test_missing_requirements_are_found() -> None:
    requires = {"a": ["b>=1", "c[extra]==2", "d; python_version < '3.0'"], "b": []}
    assert pinned.missing(requires, {"a", "b"}) == ["a needs c, which is not installed"]


def test_the_cache_key_follows_the_context() -> None:
    names = {str(p.relative_to(TOP)) for p in build.context_files()}
    assert {"Dockerfile", ".dockerignore", "hack/constraints.txt", "pyproject.toml"} <= names
    assert "dynvol/cli.py" in names
    assert "dynvol_core/__init__.py" in names
    assert not any("__pycache__" in n or n.startswith(("tests/", "docs/")) for n in names)
    assert build.app_key("base", "state") != build.app_key("base", "other state")


# --- the image ---------------------------------------------------------------------------


def _need(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI must build and check the image)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def built() -> Any:
    _need(os.geteuid() == 0, "building the image needs root (debootstrap, buildah)")
    _need(shutil.which("buildah") is not None, "buildah is missing (make setup)")
    _need(shutil.which("debootstrap") is not None, "debootstrap is missing (make setup)")
    return build.build_dynvol()


def _buildah(*args: str) -> str:
    done = subprocess.run(build.buildah(*args), text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


@pytest.fixture(scope="module")
def root(built: Any) -> Iterator[Path]:
    """The archive that containerd imports, unpacked by buildah and mounted; unmounted and
    removed afterwards, whatever the tests did."""
    container = _buildah("from", "--quiet", f"oci-archive:{built.archive}")
    try:
        mounted = Path(_buildah("mount", container))
        try:
            yield mounted
        finally:
            _buildah("umount", container)
    finally:
        _buildah("rm", container)


@pytest.fixture(scope="module")
def oci(built: Any) -> dict[str, Any]:
    """The archive's index entry, manifest and config, read straight from the tar."""
    with tarfile.open(built.archive) as tar:

        def read(name: str) -> Any:
            f = tar.extractfile(name)
            assert f is not None, name
            return json.load(f)

        (entry,) = read("index.json")["manifests"]
        manifest = read(f"blobs/sha256/{entry['digest'].removeprefix('sha256:')}")
        config = read(f"blobs/sha256/{manifest['config']['digest'].removeprefix('sha256:')}")
        names = tar.getnames()
    return {"entry": entry, "manifest": manifest, "config": config, "names": names}


def in_image(root: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted into the image, in a mount namespace of its own that has the
    host's /dev, a /proc and the host's resolver; those mounts end with the process."""
    script = (
        'set -e; r="$1"; shift; mkdir -p "$r/dev" "$r/proc"; '
        'mount --rbind /dev "$r/dev"; mount -t proc proc "$r/proc"; '
        'if [ -e /etc/resolv.conf ]; then : > "$r/etc/resolv.conf"; '
        'mount --bind /etc/resolv.conf "$r/etc/resolv.conf"; fi; '
        'exec chroot "$r" "$@"'
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(root), *argv],
        env=CLEAN_ENV, text=True, capture_output=True, timeout=timeout,
    )  # fmt: skip


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args[-3:]} exited {done.returncode}: {done.stderr}"
    return done.stdout


def test_buildahs_storage_is_no_mount_point_while_an_image_is_mounted(root: Path) -> None:
    # build.buildah() passes overlay.skip_mount_home: the storage directory is not bound onto
    # itself, so no buildah call can leave that mount in a test step's namespace.
    overlay = build.cache_root() / "buildah" / "storage" / "overlay"
    points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    assert str(root).startswith(str(overlay))
    assert str(overlay) not in points


def test_archive_is_named_for_containerd_and_runs_dynvol(oci: dict[str, Any]) -> None:
    assert oci["entry"]["annotations"]["io.containerd.image.name"] == IMAGE
    assert oci["config"]["config"]["Entrypoint"] == ["/opt/dynvol/bin/dynvol"]


def test_config_env_has_lang_and_no_build_settings(oci: dict[str, Any]) -> None:
    env = dict(e.split("=", 1) for e in oci["config"]["config"]["Env"])
    assert env["LANG"] == "C.UTF-8"
    assert env["PATH"].startswith("/opt/dynvol/bin:")
    assert "DEBIAN_FRONTEND" not in env
    assert not [k for k in env if k.startswith("PIP_")]


def test_no_build_secret_reached_a_layer(oci: dict[str, Any], root: Path) -> None:
    # The pip configuration and the CA were build secrets: mounted for one step, never kept.
    for rel in ("run/secrets", "etc/pip.conf", "root/.config/pip", "root/.cache", "src"):
        assert not (root / rel).exists(), rel
    assert not list(root.joinpath("opt/dynvol").rglob("pip.conf"))
    history = json.dumps(oci["config"].get("history", []))
    assert "BEGIN CERTIFICATE" not in history


def test_size_is_bounded(built: Any, root: Path) -> None:
    meta = json.loads((built.archive.parent / "image.json").read_text())
    unpacked = sum(layer["unpacked"] for layer in meta["layers"])
    assert meta["size"] == unpacked
    # Where the megabytes are (docs/images.md; run with -s to see it). apt's lists are left
    # out: the apt test below fills them in the container, not in the image.
    sizes = {}
    for rel in ("", "usr/bin/rclone", "usr/lib/x86_64-linux-gnu", "usr/lib/python3.11",
                "opt/dynvol", "usr/bin", "usr/sbin", "usr/share", "var", "etc"):  # fmt: skip
        done = subprocess.run(
            ["du", "-sb", "--exclude=var/lib/apt/lists", str(root / rel)],
            text=True, capture_output=True, check=True,
        )  # fmt: skip
        sizes[rel] = int(done.stdout.split()[0])
    print(f"\nimage: {unpacked / 1e6:.1f} MB of layers, {meta['stored'] / 1e6:.1f} MB stored")
    for rel, size in sizes.items():
        print(f"  {size / 1e6:7.1f} MB  /{rel}")
    assert unpacked <= SIZE_LIMIT, f"image is {unpacked / 1e6:.1f} MB, over the bound"
    assert sizes[""] <= SIZE_LIMIT, f"its root holds {sizes[''] / 1e6:.1f} MB"


def test_console_scripts_run(root: Path) -> None:
    scripts = PROJECT["scripts"]
    assert "dynvol" in scripts
    for name in scripts:
        out = _ok(in_image(root, f"/opt/dynvol/bin/{name}", "--help"))
        assert "usage:" in out.lower(), f"{name} --help printed {out[:200]!r}"
    out = _ok(in_image(root, "dynvol", "--help"))
    for command in ("node", "controller", "dmp"):
        assert command in out, f"dynvol --help lists no {command!r} command"


def test_kubectl_plugin_runs_if_the_project_ships_one(root: Path) -> None:
    plugin = root / "opt/dynvol/bin/kubectl-dynvol"
    declared = "kubectl-dynvol" in PROJECT["scripts"]
    assert plugin.exists() == declared
    if declared:
        assert "usage:" in _ok(in_image(root, "kubectl-dynvol", "--help")).lower()


def test_provider_entry_points_load(root: Path) -> None:
    program = (
        "import importlib.metadata as m, json\n"
        "eps = m.entry_points(group='dynvol.providers')\n"
        "for ep in eps: ep.load()\n"
        "print(json.dumps(sorted(ep.name for ep in eps)))\n"
    )
    names = json.loads(_ok(in_image(root, "/opt/dynvol/bin/python", "-c", program)))
    declared = PROJECT["entry-points"]["dynvol.providers"]
    assert {"s3", "nfs", "rclone"} <= set(names)
    assert set(declared) <= set(names)


def test_mounters_are_there(root: Path) -> None:
    assert "Amazon Simple Storage Service File System" in _ok(in_image(root, "s3fs", "--version"))
    assert _ok(in_image(root, "rclone", "version")).startswith("rclone v")
    for rel in ("sbin/mount.nfs", "usr/bin/fusermount3", "usr/bin/mount", "usr/bin/umount"):
        path = root / rel
        assert path.is_file(), f"/{rel} is missing"
        assert os.access(path, os.X_OK), f"/{rel} is not executable"
    # mount.nfs loads: its shared libraries (libtirpc, krb5) are all there.
    ldd = in_image(root, "/usr/bin/ldd", "/sbin/mount.nfs")
    assert "not found" not in ldd.stdout
    _ok(in_image(root, "fusermount3", "--version"))


def test_s3fs_runs_on_a_libxml2_without_icu(root: Path) -> None:
    """The Dockerfile's libxml2 stage: Debian's current libxml2 rebuilt without ICU, one
    version above Debian's, and no ICU anywhere in the image."""
    status = _ok(in_image(root, "dpkg-query", "-W", "-f", "${Version}\\t${Depends}", "libxml2"))
    version, _, depends = status.partition("\t")
    assert version.endswith("+dynvol1"), version
    assert "icu" not in depends, depends
    listed = _ok(in_image(root, "dpkg-query", "-W", "-f", "${Package}\\n"))
    assert not [p for p in listed.split() if p.startswith("libicu")], listed
    assert not list((root / "usr/lib/x86_64-linux-gnu").glob("libicu*"))
    ldd = _ok(in_image(root, "/usr/bin/ldd", "/usr/bin/s3fs"))
    assert "libxml2.so.2" in ldd, ldd
    assert "not found" not in ldd, ldd
    assert "icu" not in ldd, ldd
    # And it still reads what ICU converted: a windows-1252 document (an encoding libxml2
    # does not handle itself) goes through iconv. xmllint is not in the image, so the
    # library s3fs loads is called through ctypes.
    script = (
        "import ctypes; x = ctypes.CDLL('libxml2.so.2'); "
        "x.xmlReadMemory.restype = ctypes.c_void_p; "
        'doc = b\'<?xml version="1.0" encoding="windows-1252"?><k>\\x80 caf\\xe9</k>\'; '
        "d = x.xmlReadMemory(doc, len(doc), None, None, 0); "
        "x.xmlDocGetRootElement.restype = ctypes.c_void_p; "
        "x.xmlDocGetRootElement.argtypes = [ctypes.c_void_p]; "
        "x.xmlNodeGetContent.restype = ctypes.c_char_p; "
        "x.xmlNodeGetContent.argtypes = [ctypes.c_void_p]; "
        "print(x.xmlNodeGetContent(x.xmlDocGetRootElement(d)).decode())"
    )
    assert _ok(in_image(root, "/usr/bin/python3", "-c", script)).strip() == "\u20ac caf\u00e9"


def test_operators_can_see_the_mounters_processes(root: Path) -> None:
    """``kubectl exec DMP -- ps`` / ``pgrep`` is how operators (and the e2e tier) find the
    FUSE daemons of a mount pod."""
    for tool in ("ps", "pgrep", "pkill"):
        _ok(in_image(root, tool, "--version"))


def test_no_compilers_build_tools_or_caches(root: Path) -> None:
    for tool in ("gcc", "cc", "c++", "g++", "make", "ld", "as", "pip", "pip3", "python3-config"):
        for d in ("usr/bin", "usr/local/bin", "opt/dynvol/bin"):
            assert not (root / d / tool).exists(), f"/{d}/{tool} is in the image"
    site = root / "opt/dynvol/lib/python3.11/site-packages"
    for dist in ("pip", "setuptools", "wheel", "_distutils_hack"):
        assert not (site / dist).exists(), f"{dist} is in the virtualenv"
    assert not list(site.rglob("*.pyi"))
    assert not (root / "usr/share/python-wheels").exists()
    for rel in ("var/lib/apt/lists", "var/cache/apt"):
        left = [p for p in (root / rel).rglob("*") if p.is_file() and p.name != "lock"]
        assert not left, f"/{rel} holds {left[:3]}"


def test_byte_code_is_precompiled_and_fresh(root: Path) -> None:
    # Precompiled on purpose (a DMP limited to 10m of CPU would otherwise compile what it
    # imports at every start): importing every module of dynvol writes nothing new. Python
    # would write (or rewrite) a .pyc for any module whose byte code is missing or stale;
    # the standard library's come from Debian (those slim.py keeps), the virtualenv's from
    # the build.
    program = "import sys; sys.dont_write_bytecode = False\n" + slim.MEASURE

    def byte_code() -> dict[Path, int]:
        trees = (root / "opt/dynvol", root / "usr/lib/python3.11")
        return {p: p.stat().st_mtime_ns for tree in trees for p in tree.rglob("*.pyc")}

    before = byte_code()
    sources = list((root / "opt/dynvol/lib").rglob("*.py"))
    assert sources, "the virtualenv holds no Python sources"
    missing = [
        py for py in sources
        if not (py.parent / "__pycache__" / f"{py.stem}.cpython-311.pyc").is_file()
    ]  # fmt: skip
    assert not missing, f"{len(missing)} modules without byte code, such as {missing[:3]}"
    loaded = _ok(in_image(root, "/opt/dynvol/bin/python", "-c", program)).split()
    assert {"asyncio", "ssl", "json", "logging"} <= set(loaded)
    assert byte_code() == before
    # and what was loaded is what slim.py keeps the byte code of
    assert [m for m in loaded if not slim.kept(m, slim.STDLIB_KEEP)] == []


def test_the_system_leaves_out_what_no_process_reads(root: Path) -> None:
    # hack/images/slim.py: dpkg's filters are in place for later installs, and what they
    # match is gone from the packages installed, as if they had been installed with them.
    assert (root / "etc/dpkg/dpkg.cfg.d/dynvol-slim").read_text() == slim.FILTERS
    gconv = root / slim.GCONV.lstrip("/")
    assert sorted(p.name for p in gconv.glob("*.so") if not p.name.startswith(("ISO8859-",
        "CP125", "UTF-"))) == ["UNICODE.so"]  # fmt: skip
    assert (gconv / "CP1252.so").is_file()
    assert (gconv / "gconv-modules.cache").is_file()
    stdlib = root / slim.STDLIB.lstrip("/")
    assert not list((stdlib / "pydoc_data").glob("*.py"))
    assert not list(stdlib.joinpath("lib-dynload").glob("_test*"))
    assert (stdlib / "unittest/case.py").is_file()  # sources stay: imports still work
    assert not list((stdlib / "unittest").rglob("*.pyc"))
    assert not (root / "usr/share/zoneinfo").exists()
    assert "tzdata" not in _ok(in_image(root, "dpkg-query", "-W", "-f", "${Package}\\n"))
    # No process needs what is gone: a module outside the kept byte code still imports.
    _ok(in_image(root, "/opt/dynvol/bin/python", "-B", "-c", "import unittest, pydoc, xmlrpc"))
    # Without a time zone database, local time is UTC (the text logs' time stamps).
    assert _ok(in_image(root, "date", "+%Z")).strip() == "UTC"


def test_docs_are_only_copyright_files(root: Path) -> None:
    doc = root / "usr/share/doc"
    extra = [p for p in doc.rglob("*") if p.is_file() and p.name != "copyright"]
    assert not extra, f"/usr/share/doc holds {len(extra)} files such as {extra[:3]}"
    for rel in ("usr/share/man", "usr/share/info"):
        assert not [p for p in (root / rel).rglob("*") if p.is_file()], rel


def test_no_debian_package_is_outdated(root: Path) -> None:
    sources = (root / "etc/apt/sources.list.d/debian.sources").read_text()
    for suite in ("bookworm", "bookworm-updates", "bookworm-security"):
        assert suite in sources.split(), f"the image's apt sources lack {suite}"
    _ok(in_image(root, "apt-get", "update", "-qq", timeout=300))
    listed = _ok(in_image(root, "apt", "list", "--upgradable"))
    upgradable = [line for line in listed.splitlines() if "/" in line]
    assert not upgradable, f"outdated Debian packages in the image: {upgradable}"
