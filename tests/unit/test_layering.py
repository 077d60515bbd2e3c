"""The dependency rule of docs/design.md §4, checked from the source.

import-linter (``make lint``) enforces the forbidden and independence contracts; this test
adds the allow-list half that a forbidden contract cannot express: the core imports only
the standard library and attrs, and no standard module that does I/O or concurrency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Standard modules that would let the core touch the outside world.
_IMPURE = {
    "os",
    "io",
    "subprocess",
    "socket",
    "shutil",
    "threading",
    "multiprocessing",
    "asyncio",
    "signal",
    "select",
    "selectors",
    "ctypes",
    "tempfile",
    "urllib",
    "http",
    "ssl",
    "time",
    "logging",
    "glob",
    "fcntl",
    "random",
    "secrets",
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pathlib":
                # Pure path arithmetic is fine; concrete paths do I/O.
                found += [
                    (node.lineno, f"pathlib.{alias.name}")
                    for alias in node.names
                    if not alias.name.startswith("Pure")
                ]
                continue
            found.append((node.lineno, node.module))
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("dynvol_core"), ids=lambda p: p.name)
def test_core_imports_only_stdlib_and_attrs(path: Path) -> None:
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if name.startswith("pathlib."):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} (use PurePosixPath)")
            continue
        allowed = top in ("attrs", "attr", "dynvol_core", "__future__") or (
            top in sys.stdlib_module_names and top not in _IMPURE
        )
        if not allowed:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "dynvol_core must stay pure:\n" + "\n".join(bad)


def test_core_has_modules() -> None:
    # Guards the parametrised test above against silently checking nothing.
    assert len(_modules("dynvol_core")) >= 5


#: yaml reads kubeconfig files; kubernetes_asyncio loads the kubeconfigs that need a
#: credential plugin, and its aiohttp carries their requests (client.py only, imported there
#: on use). dynvol_kube.http carries every other request.
_KUBE_ALLOWED = {
    "attrs", "attr", "aiohttp", "yaml", "kubernetes_asyncio", "prometheus_client",
    "dynvol_core", "dynvol_kube",
}  # fmt: skip
_PRODUCTION = ("dynvol", "dynvol_core", "dynvol_providers", "dynvol_csi", "dynvol_controllers")


@pytest.mark.parametrize("path", _modules("dynvol_kube"), ids=lambda p: p.name)
def test_kube_imports_only_core_and_the_client_library(path: Path) -> None:
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top == "kubernetes_asyncio" and path.name != "client.py":
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} (only client.py may)")
        elif top not in _KUBE_ALLOWED and top not in sys.stdlib_module_names:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "dynvol_kube builds on the core and its HTTP and YAML libraries:\n" + "\n".join(
        bad
    )


@pytest.mark.parametrize("package", [*_PRODUCTION, "dynvol_dmp"])
def test_only_dynvol_kube_imports_the_kubernetes_client(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules(package)
        # Test support hands tests a raw ApiClient; it is not part of a service.
        if path.relative_to(ROOT).as_posix() != "dynvol/testing/pytest_plugin.py"
        for line, name in _imports(path)
        if name.split(".")[0] == "kubernetes_asyncio"
    ]
    assert not bad, "only dynvol_kube.client imports kubernetes_asyncio:\n" + "\n".join(bad)


def test_kube_has_modules() -> None:
    assert len(_modules("dynvol_kube")) >= 8
