"""hack/images/slim.py: what the image's system leaves out, and that it leaves out nothing a
service imports. The image itself is checked by tests/integration/test_image.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

TOP = Path(__file__).resolve().parents[2]


slim = load_script("dynvol_image_slim", TOP / "hack/images/slim.py")
GCONV = slim.GCONV
STDLIB = slim.STDLIB


@pytest.mark.parametrize(
    ("path", "out"),
    [
        (f"{GCONV}/IBM1047.so", True),
        (f"{GCONV}/libJIS.so", True),
        (f"{GCONV}/CP1252.so", False),
        (f"{GCONV}/ISO8859-15.so", False),
        (f"{GCONV}/UTF-16.so", False),
        (f"{GCONV}/gconv-modules", False),
        (f"{GCONV}/gconv-modules.cache", False),
        (f"{GCONV}/gconv-modules.d/gconv-modules-extra.conf", False),
        (f"{STDLIB}/pydoc_data/topics.py", True),
        (f"{STDLIB}/test/support/__init__.py", True),
        (f"{STDLIB}/lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so", True),
        (f"{STDLIB}/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so", False),
        (f"{STDLIB}/unittest/case.py", False),
        (f"{STDLIB}/json/__init__.py", False),
        ("/usr/share/bash-completion/completions/mount", True),
        ("/usr/bin/rclone", False),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", False),
    ],
)
def test_the_filters_leave_out_exactly_these(path: str, out: bool) -> None:
    assert slim.left_out(path, slim.parse_filters(slim.FILTERS)) is out


def test_the_last_matching_filter_decides_as_in_dpkg() -> None:
    rules = slim.parse_filters("path-exclude /a/*\npath-include /a/b*\npath-exclude /a/b/c\n")
    assert slim.left_out("/a/x", rules)
    assert not slim.left_out("/a/b/d", rules)
    assert slim.left_out("/a/b/c", rules)
    assert not slim.left_out("/z", rules)


def test_a_line_that_is_no_filter_is_refused() -> None:
    with pytest.raises(ValueError, match="not a dpkg path filter"):
        slim.parse_filters("path-exclude /a/*\npath-exclud /b\n")
    with pytest.raises(ValueError, match="not a dpkg path filter"):
        slim.parse_filters("path-include\n")


@pytest.mark.parametrize(
    ("relative", "module"),
    [
        ("__pycache__/os.cpython-311.pyc", "os"),
        ("asyncio/__pycache__/events.cpython-311.pyc", "asyncio"),
        ("email/mime/__pycache__/text.cpython-311.pyc", "email"),
        ("__pycache__/_sysconfigdata__x86_64-linux-gnu.cpython-311.pyc",
         "_sysconfigdata__x86_64-linux-gnu"),
        ("dist-packages/foo/__pycache__/x.cpython-311.pyc", None),
        ("site-packages/foo/__pycache__/x.cpython-311.pyc", None),
    ],
)  # fmt: skip
def test_byte_code_belongs_to_its_top_level_module(relative: str, module: str | None) -> None:
    assert slim.stdlib_module(relative) == module


def test_the_kept_byte_code_covers_every_module_the_services_import() -> None:
    # The same program the image test runs inside the image, here with the development
    # virtualenv's Python: every standard library module with sources that importing all
    # of dynvol loads must keep its byte code.
    done = subprocess.run(
        [sys.executable, str(TOP / "hack/images/slim.py"), "measure"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert {"asyncio", "ssl", "json", "logging"} <= set(loaded)
    missing = [m for m in loaded if not slim.kept(m, slim.STDLIB_KEEP)]
    assert not missing, f"add to STDLIB_KEEP in hack/images/slim.py: {missing}"


def _put(root: Path, path: str, data: bytes = b"x") -> Path:
    file = root / path.lstrip("/")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(data)
    return file


def test_apply_removes_what_the_filters_and_the_byte_code_list_leave_out(tmp_path: Path) -> None:
    owned = {
        f"{GCONV}/IBM1047.so": True,
        f"{GCONV}/CP1252.so": False,
        f"{GCONV}/gconv-modules": False,
        f"{STDLIB}/pydoc_data/topics.py": True,
        f"{STDLIB}/json/__init__.py": False,
        "/usr/share/bash-completion/completions/mount": True,
        "/usr/bin/true": False,
    }
    for path in owned:
        _put(tmp_path, path, b"12345")
    # A file the filters match that no package owns is not dpkg's to leave out.
    _put(tmp_path, f"{GCONV}/local.so")
    dirs = sorted({str(Path(p).parent) for p in owned})
    listing = "\n".join(["/.", *dirs, *owned]) + "\n"
    _put(tmp_path, "/var/lib/dpkg/info/pkg.list", listing.encode())
    pyc = {
        f"{STDLIB}/__pycache__/os.cpython-311.pyc": False,
        f"{STDLIB}/__pycache__/pydoc.cpython-311.pyc": True,
        f"{STDLIB}/json/__pycache__/__init__.cpython-311.pyc": False,
        f"{STDLIB}/unittest/__pycache__/case.cpython-311.pyc": True,
        f"{STDLIB}/__pycache__/_sysconfigdata__x86_64-linux-gnu.cpython-311.pyc": False,
        f"{STDLIB}/dist-packages/x/__pycache__/y.cpython-311.pyc": False,
    }
    for path in pyc:
        _put(tmp_path, path, b"1234567")

    removed, size = slim.apply(tmp_path)

    gone = [p for p, out in {**owned, **pyc}.items() if out]
    assert removed == len(gone)
    assert size == 3 * 5 + 2 * 7
    for path, out in {**owned, **pyc}.items():
        assert (tmp_path / path.lstrip("/")).exists() is not out, path
    assert (tmp_path / GCONV.lstrip("/") / "local.so").exists()
    # Emptied directories go; the tree's top stays, as dpkg made it.
    assert not (tmp_path / "usr/share/bash-completion/completions").exists()
    assert list((tmp_path / "usr/share/bash-completion").iterdir()) == []
    assert list((tmp_path / STDLIB.lstrip("/") / "pydoc_data").iterdir()) == []
    written = (tmp_path / "etc/dpkg/dpkg.cfg.d/dynvol-slim").read_text()
    assert written == slim.FILTERS
