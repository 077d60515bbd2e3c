#!/usr/bin/env python3
"""Leave out of the image's system what none of its processes reads; run in the Dockerfile.

    python3 slim.py apply        as root, in the Dockerfile's `system` stage (after every
                                 package is installed): write FILTERS to dpkg's
                                 configuration, remove the installed files they leave out,
                                 and the byte code of standard library modules that no
                                 dynvol process imports
    python3 slim.py filters      print the dpkg filters
    python3 slim.py measure      print the standard library's top-level modules that
                                 importing all of dynvol loads (run it with dynvol's
                                 Python: what STDLIB_KEEP must cover)

What goes and why is in docs/images.md ("What the system leaves out"). Two kinds of files:

- Files of Debian packages: the glibc character set converters nothing in the image loads,
  the standard library's documentation data and test support, shell completions. They go
  the way Debian's slim image leaves out manuals: as dpkg ``path-exclude`` filters, written
  to ``/etc/dpkg/dpkg.cfg.d/`` so that a package installed or upgraded later (here or in an
  image built ``FROM`` this one) leaves them out too, and the files of packages already
  installed that the filters match are removed, as if those packages had been installed
  with them. An image that needs them back deletes FILTERS_FILE and reinstalls the package.
- Byte code that Debian's python3 compiled on install for the whole standard library, kept
  only for the top-level modules and packages in STDLIB_KEEP: those the three services
  import (``tests/unit/test_image_slim.py`` checks that the list covers them, and
  ``tests/integration/test_image.py`` that importing them in the image writes no byte
  code). The sources stay: a module outside the list still imports, compiled when it is.

Standard library only: it runs with Debian's python3, outside dynvol's virtualenv.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

FILTERS_FILE = Path("/etc/dpkg/dpkg.cfg.d/dynvol-slim")
GCONV = "/usr/lib/x86_64-linux-gnu/gconv"
STDLIB = "/usr/lib/python3.11"

#: dpkg filters, in dpkg's own syntax and order: for each path the last pattern that
#: matches decides, and ``*`` matches ``/`` too (fnmatch(3) without FNM_PATHNAME).
FILTERS = f"""\
# dynvol (hack/images/slim.py, docs/images.md): files no process in this image reads.
# glibc's character set converters, but for the configuration and the Western single-byte
# and Unicode ones: S3 answers in UTF-8, which libxml2 (s3fs) decodes itself, as it does
# UTF-16 and ISO-8859-1; Python has codecs of its own.
path-exclude {GCONV}/*
path-include {GCONV}/gconv-modules*
path-include {GCONV}/ISO8859-*.so
path-include {GCONV}/CP125?.so
path-include {GCONV}/UTF-*.so
path-include {GCONV}/UNICODE.so
# The standard library's help() topics, and its regression test support and test modules.
path-exclude {STDLIB}/pydoc_data/*
path-exclude {STDLIB}/test/*
path-exclude {STDLIB}/lib-dynload/_test*
path-exclude {STDLIB}/lib-dynload/_xxtestfuzz*
path-exclude {STDLIB}/lib-dynload/xxlimited*
# Completions for interactive shells.
path-exclude /usr/share/bash-completion/*
"""

#: The standard library's top-level modules and packages whose byte code stays: what the
#: three services import (MEASURE: every module of dynvol's packages, and what name lookups,
#: TLS, child processes and tracebacks load at run time), the interpreter's start, and all
#: codecs (``encodings``, looked up by name at run time).
STDLIB_KEEP = frozenset(
    """
    __future__ _collections_abc _compression _sitebuiltins _sysconfigdata_* _weakrefset abc
    argparse ast asyncio base64 bisect bz2 calendar codecs collections concurrent contextlib
    contextvars copy copyreg csv ctypes dataclasses datetime decimal dis email encodings
    enum fnmatch functools genericpath gettext glob gzip hashlib heapq hmac html http
    importlib inspect io ipaddress json keyword linecache locale logging lzma mimetypes
    ntpath numbers opcode operator os pathlib pkgutil platform posixpath pprint queue quopri
    random re reprlib runpy secrets selectors shlex shutil signal site sitecustomize socket
    socketserver ssl stat string stringprep struct subprocess sysconfig tempfile textwrap
    threading timeit token tokenize traceback types typing urllib uuid warnings weakref
    wsgiref zipfile zipimport
    """.split()  # noqa: SIM905 (a hundred names read better as words than as a column)
)


#: A program that imports every module of dynvol's packages (not their ``__main__``, nor the
#: test kits ``dynvol.testing`` and ``dynvol_providers.testing``, which need pytest) and
#: prints, one per line, the standard library's top-level modules whose sources were then
#: loaded: what STDLIB_KEEP must cover. ``python3 slim.py measure`` runs it; the tests run
#: it in the development virtualenv and in the image.
MEASURE = """
import importlib, pkgutil, sys, sysconfig
# What the services do at run time that loads more of the standard library: name lookups
# (a str host goes through the idna codec), TLS, child processes, the default executor,
# tracebacks in logs.
import asyncio, logging, socket, ssl, traceback
socket.getaddrinfo("127.0.0.1", 80)
ssl.create_default_context()
async def _touch():
    child = await asyncio.create_subprocess_exec("true")
    await child.wait()
    await asyncio.get_running_loop().getaddrinfo("127.0.0.1", 80)
    await asyncio.get_running_loop().run_in_executor(None, sum, [1])
asyncio.run(_touch())
try:
    raise ValueError("measured")
except ValueError:
    traceback.format_exc()
for top in ("dynvol", "dynvol_core", "dynvol_kube", "dynvol_csi", "dynvol_controllers",
            "dynvol_dmp", "dynvol_providers"):
    package = importlib.import_module(top)
    for found in pkgutil.walk_packages(package.__path__, top + "."):
        if {"__main__", "testing"} & set(found.name.split(".")):
            continue
        importlib.import_module(found.name)
stdlib = sysconfig.get_paths()["stdlib"].rstrip("/") + "/"
loaded = set()
for module in list(sys.modules.values()):
    origin = getattr(module, "__file__", None) or ""
    relative = origin[len(stdlib):]
    if origin.startswith(stdlib) and origin.endswith(".py") and "-packages/" not in relative:
        loaded.add(relative.split("/")[0].removesuffix(".py"))
print("\\n".join(sorted(loaded)))
"""


def parse_filters(text: str) -> list[tuple[bool, str]]:
    """``(included, pattern)`` for each ``path-exclude``/``path-include`` line, in order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, pattern = line.partition(" ")
        if word not in ("path-exclude", "path-include") or not pattern.strip():
            raise ValueError(f"not a dpkg path filter: {raw!r}")
        rules.append((word == "path-include", pattern.strip()))
    return rules


def left_out(path: str, rules: Iterable[tuple[bool, str]]) -> bool:
    """Whether dpkg leaves ``path`` out under ``rules``: the last match decides."""
    out = False
    for included, pattern in rules:
        if fnmatch.fnmatchcase(path, pattern):
            out = not included
    return out


def emptied_trees(rules: Iterable[tuple[bool, str]]) -> list[str]:
    """The directories whose whole contents a filter leaves out (``path-exclude DIR/*``)."""
    return [
        pattern.removesuffix("/*")
        for included, pattern in rules
        if not included and pattern.endswith("/*") and not set("*?[") & set(pattern[:-2])
    ]


def packaged_paths(info: Path) -> Iterator[str]:
    """Every path the installed packages' file lists name (``/var/lib/dpkg/info/*.list``)."""
    for listing in sorted(info.glob("*.list")):
        for line in listing.read_text(errors="surrogateescape").splitlines():
            if line.startswith("/"):
                yield line


def stdlib_module(relative: str) -> str | None:
    """The top-level module a byte code file under the standard library belongs to
    (``asyncio/__pycache__/events.cpython-311.pyc`` -> ``asyncio``), or ``None`` for one
    of site-packages or dist-packages."""
    parts = relative.split("/")
    if parts[0] in ("site-packages", "dist-packages"):
        return None
    if parts[0] == "__pycache__":
        return parts[-1].split(".", 1)[0]
    return parts[0]


def kept(module: str, keep: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``keep`` (names, or patterns such as ``_sysconfigdata_*``
    for the build-specific name of the interpreter's configuration module)."""
    return any(fnmatch.fnmatchcase(module, name) for name in keep)


def byte_code_to_drop(stdlib: Path, keep: Iterable[str]) -> list[Path]:
    """The standard library's ``.pyc`` files of top-level modules outside ``keep``."""
    drop = []
    for path in sorted(stdlib.rglob("*.pyc")):
        module = stdlib_module(path.relative_to(stdlib).as_posix())
        if module is not None and not kept(module, keep):
            drop.append(path)
    return drop


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def apply(root: Path = Path("/")) -> tuple[int, int]:
    """Write the filters and remove what they and STDLIB_KEEP leave out, under ``root``.
    Returns (files removed, bytes removed)."""
    rules = parse_filters(FILTERS)
    target = root / FILTERS_FILE.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(FILTERS)
    removed = size = 0
    for path in packaged_paths(root / "var/lib/dpkg/info"):
        if not left_out(path, rules):
            continue
        file = root / path.lstrip("/")
        if file.is_symlink() or file.is_file():
            size += _size(file)
            file.unlink()
            removed += 1
    for pyc in byte_code_to_drop(root / STDLIB.lstrip("/"), STDLIB_KEEP):
        size += _size(pyc)
        pyc.unlink()
        removed += 1
    # Directories left empty below a tree a filter empties (a package's completion or test
    # directories); the tree's own top stays, as dpkg made it.
    for top in emptied_trees(rules):
        base = root / top.lstrip("/")
        for dirpath, _, _ in sorted(os.walk(base), reverse=True):
            if dirpath != str(base) and not os.listdir(dirpath):
                os.rmdir(dirpath)
    return removed, size


def main(argv: list[str]) -> int:
    if argv == ["filters"]:
        sys.stdout.write(FILTERS)
        return 0
    if argv == ["measure"]:
        exec(compile(MEASURE, "<slim measure>", "exec"), {"__name__": "__measure__"})
        return 0
    if argv == ["apply"]:
        removed, size = apply()
        print(f"slim: removed {removed} files, {size / 1e6:.1f} MB")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
