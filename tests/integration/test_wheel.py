"""dynvol as an outside consumer gets it: the wheel, installed into a fresh virtualenv.

The wheel is built from this checkout with the pinned build backend already in ``.venv``
(no index, no build isolation) and installed with ``PIP_CONSTRAINT=hack/constraints.txt``
into a virtualenv in a temporary directory; its python then runs the consumer suite
(``tests/library/consumer``, copied next to it, outside the checkout) in two stages:

1. the base install (``pip install dynvol`` plus pytest and the example provider): no
   service dependency is importable, the seed objects parse and validate, the
   ``control_plane`` fixture comes up with dynvol's CRDs from the installed package and the
   consumer's own CRD, a claim is created through it, and the example provider passes the
   conformance kit (its own test file);
2. ``dynvol[testing]``: the ``kube_client`` and ``namespace`` fixtures create a claim through
   kubernetes-asyncio.

The control plane runs this checkout's binaries, handed over through ``KUBEBUILDER_ASSETS``
(the envtest way). Two more tests run the installed ``dynvol dev control-plane up`` the way
the issue's user did: with no binaries anywhere it names the ways to get them, and with the
cache of ``dynvol dev tools install`` filled it needs nothing else (that part is skipped
when the cache is empty: filling it is a Go build of minutes, done once per machine).
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynvol.testing import tools
from dynvol.testing.controlplane import ControlPlane, default_bin_dir, kubernetes_bin_dir

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]
CONSUMER = TOP / "tests" / "library" / "consumer"
EXAMPLE = TOP / "examples" / "dynvol-provider-example"
#: Variables of this run that would point the consumer back into the checkout.
_DROP = (
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "KUBEBUILDER_ASSETS",
    "DYNVOL_TOOLS_BIN",
    "DYNVOL_TOOLS_CACHE",
    "DYNVOL_KUBERNETES_VERSION",
)


def _need(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI must run against real components)")
    pytest.skip(why)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env["PIP_CONSTRAINT"] = str(TOP / "hack" / "constraints.txt")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["DYNVOL_CHECKOUT"] = str(TOP)
    env.update(extra)
    return env


def _run(
    argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (
        f"{' '.join(done.args)} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}"
        f"\n--- stderr\n{done.stderr[-6000:]}"
    )
    return done.stdout


def _copy_project(src: Path, dst: Path, keep: list[str]) -> Path:
    """The files a build reads, copied, so that the build leaves nothing in the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    dst.mkdir(parents=True)
    for name in keep:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, dst / name, ignore=ignore)
        else:
            shutil.copy2(path, dst / name)
    return dst


def _wheel(src: Path, out: Path) -> Path:
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--no-index", "-w", str(out), str(src)],
            cwd=out.parent, env=_env(),
        )
    )  # fmt: skip
    (wheel,) = out.glob(f"{src.name.replace('-', '_')}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wheel")
    assert not path.resolve().is_relative_to(TOP), "the consumer must live outside the checkout"
    return path


@pytest.fixture(scope="module")
def wheels(work: Path) -> dict[str, Path]:
    """dynvol's wheel and the example provider's, each built from a copy of its sources."""
    started = time.monotonic()
    packages = sorted(p.name for p in TOP.glob("dynvol*") if p.is_dir() and "." not in p.name)
    src = _copy_project(TOP, work / "src" / "dynvol", ["pyproject.toml", "README.md", *packages])
    example = _copy_project(
        EXAMPLE, work / "src" / "dynvol-provider-example", ["pyproject.toml", "README.md", "src"]
    )
    out = work / "dist"
    out.mkdir()
    built = {"dynvol": _wheel(src, out), "example": _wheel(example, out)}
    print(f"wheels built in {time.monotonic() - started:.1f}s: {sorted(built.values())}")
    return built


def _venv(work: Path, name: str, *requirements: str) -> Path:
    started = time.monotonic()
    venv = work / name
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    _ok(_run([str(base_python), "-m", "venv", str(venv)], cwd=work, env=_env()))
    python = venv / "bin" / "python"
    _ok(_run([str(python), "-m", "pip", "install", "-q", *requirements], cwd=work, env=_env()))
    print(f"{name}: installed {requirements} in {time.monotonic() - started:.1f}s")
    return python


@pytest.fixture(scope="module")
def assets(work: Path) -> Path:
    """etcd, kube-apiserver and kubectl of the release under test, in one directory, the
    layout setup-envtest makes."""
    bin_dir, kube_dir = default_bin_dir(), kubernetes_bin_dir()
    path = work / "assets"
    path.mkdir()
    for name, where in (("etcd", bin_dir), ("kube-apiserver", kube_dir), ("kubectl", kube_dir)):
        binary = where / name
        _need(os.access(binary, os.X_OK), f"{binary} is missing: run 'make tools'")
        (path / name).symlink_to(binary.resolve())
    return path


@pytest.fixture(scope="module")
def consumer(work: Path) -> Path:
    """The consumer suite and the example provider's own tests, outside the checkout."""
    run = work / "consumer"
    shutil.copytree(CONSUMER, run, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(EXAMPLE / "tests" / "test_conformance.py", run / "test_conformance.py")
    return run


def _pytest(python: Path, consumer: Path, assets: Path, *files: str) -> str:
    started = time.monotonic()
    done = _run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=consumer,
        env=_env(KUBEBUILDER_ASSETS=str(assets)),
    )
    out = _ok(done)
    print(out[-3000:])
    print(f"consumer suite {files} ran in {time.monotonic() - started:.1f}s")
    return out


def _counts(out: str) -> dict[str, int]:
    summary = out.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


def test_the_wheel_carries_the_crds_and_the_go_modules(wheels: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheels["dynvol"]) as whl:
        names = set(whl.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(whl.read(meta_name).decode())
    for crd in (
        "storageproviderclasses",
        "dynamicvolumeclaims",
        "dynamicvolumemounts",
        "dynamicvolumeclaimslices",
    ):
        assert f"dynvol/crds/{crd}.yaml" in names
    for module in tools.MODULES:
        assert {
            f"dynvol/testing/gotools/{module}/go.mod",
            f"dynvol/testing/gotools/{module}/go.sum",
        } <= names
    assert "dynvol/testing/gotools/etcd/tools.go" in names
    assert not any(n.startswith(("tests/", "manifests/", "hack/", "examples/")) for n in names)
    requires = meta.get_all("Requires-Dist") or []
    base = sorted(r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r)
    assert base == ["attrs", "pluggy"], requires
    assert {"node", "controller", "dmp", "services", "testing", "kubeconfig-plugins"} <= set(
        meta.get_all("Provides-Extra") or []
    )


def test_the_base_install_serves_a_library_user(
    work: Path, wheels: dict[str, Path], assets: Path, consumer: Path
) -> None:
    python = _venv(work, "venv-base", str(wheels["dynvol"]), str(wheels["example"]), "pytest")
    out = _pytest(python, consumer, assets, "check_base.py", "test_conformance.py")
    counts = _counts(out)
    assert counts.get("failed", 0) == 0
    assert counts.get("error", 0) == counts.get("errors", 0) == 0
    # 13 base checks and the example provider's 8 conformance tests.
    assert counts.get("passed", 0) >= 21, out[-2000:]
    if os.geteuid() == 0:
        assert counts.get("skipped", 0) == 0, out[-2000:]


def test_the_testing_extra_adds_the_client_fixtures(
    work: Path, wheels: dict[str, Path], assets: Path, consumer: Path
) -> None:
    python = _venv(work, "venv-testing", f"{wheels['dynvol']}[testing]")
    out = _pytest(python, consumer, assets, "check_fixtures.py")
    assert _counts(out) == {"passed": 3}, out[-2000:]


@pytest.fixture(scope="module")
def base_python(work: Path, wheels: dict[str, Path]) -> Path:
    python = work / "venv-base" / "bin" / "python"
    if not python.exists():
        python = _venv(work, "venv-base", str(wheels["dynvol"]), str(wheels["example"]), "pytest")
    return python


def test_with_no_binaries_anywhere_the_error_names_the_ways(work: Path, base_python: Path) -> None:
    empty = work / "empty-cache"
    empty.mkdir()
    directory = work / "cp-none"
    dynvol = str(base_python.with_name("dynvol"))
    env = _env(XDG_CACHE_HOME=str(empty))
    try:
        done = _run([dynvol, "dev", "control-plane", "up", "--dir", str(directory)],
                    cwd=work, env=env, timeout=120)  # fmt: skip
    finally:
        _run([dynvol, "dev", "control-plane", "down", "--dir", str(directory)],
             cwd=work, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    for way in ("KUBEBUILDER_ASSETS", "DYNVOL_TOOLS_BIN", "dynvol dev tools install"):
        assert way in done.stderr, done.stderr
    assert str(empty / "dynvol" / "tools") in done.stderr
    assert "make tools" in done.stderr  # and, in a checkout, the usual way


@pytest.fixture
def installed_tools() -> Path:
    bin_dir = tools.installed_bin_dir()
    present = all(os.access(bin_dir / n, os.X_OK) for n in ("etcd", "kube-apiserver", "kubectl"))
    if not present:
        pytest.skip(f"{bin_dir} is empty: 'dynvol dev tools install' fills it (a Go build)")
    return bin_dir


@pytest.fixture
def control_plane_dir(work: Path, base_python: Path) -> Iterator[Path]:
    directory = work / "cp-cache"
    yield directory
    dynvol = str(base_python.with_name("dynvol"))
    _run([dynvol, "dev", "control-plane", "down", "--dir", str(directory)],
         cwd=work, env=_env(), timeout=120)  # fmt: skip


def test_up_outside_the_checkout_with_the_install_cache(
    work: Path, base_python: Path, installed_tools: Path, control_plane_dir: Path
) -> None:
    """The issue's user: an installed dynvol, no Makefile, no variables set."""
    dynvol = str(base_python.with_name("dynvol"))
    started = time.monotonic()
    out = _ok(_run([dynvol, "dev", "tools", "install"], cwd=work, env=_env(), timeout=120))
    assert "already built: etcd, kube-apiserver, kubectl" in out, out
    assert time.monotonic() - started < 30, "a filled cache is not built again"
    assert _ok(_run([dynvol, "dev", "tools", "path"], cwd=work, env=_env())).strip() == str(
        installed_tools
    )
    out = _ok(
        _run(
            [dynvol, "dev", "control-plane", "up", "--dir", str(control_plane_dir)],
            cwd=work,
            env=_env(),
            timeout=180,
        )
    )
    assert "control plane up" in out
    crds = _ok(
        _run(
            [
                str(installed_tools / "kubectl"),
                "--kubeconfig",
                str(control_plane_dir / "kubeconfig"),
                "get",
                "crd",
                "-o",
                "name",
            ],
            cwd=work,
            env=_env(),
            timeout=60,
        )
    )
    assert "dynamicvolumeclaims.dynamicvolume.csi.cloudnative101.net" in crds


#: Run in the ``dynvol[dmp]`` venv: a request with the control plane's static kubeconfig,
#: then the error for a kubeconfig whose credentials come from a plugin.
_SERVICE_CLIENT = r"""
import asyncio, importlib.util, json, sys
from dynvol_kube import Client, KubeconfigError, Resource

static, plugin = sys.argv[1], sys.argv[2]
assert importlib.util.find_spec("kubernetes_asyncio") is None, "kubernetes_asyncio is installed"

async def main():
    async with await Client.from_kubeconfig(static) as client:
        listed = await client.list(Resource("", "v1", "namespaces", "Namespace", namespaced=False))
    print("listed", listed["kind"])
    try:
        await Client.from_kubeconfig(plugin)
    except KubeconfigError as exc:
        print("refused:", exc)

asyncio.run(main())
"""


def test_a_service_extra_talks_to_the_apiserver_without_kubernetes_asyncio(
    work: Path, wheels: dict[str, Path], control_plane: ControlPlane
) -> None:
    """What the image installs: no generated client; a credential plugin says what to add."""
    python = _venv(work, "venv-dmp", f"{wheels['dynvol']}[dmp]")
    config = json.loads(control_plane.kubeconfig.read_text())
    config["users"][0]["user"] = {"exec": {"command": "/bin/false", "apiVersion": "v1"}}
    plugin = work / "plugin.kubeconfig"
    plugin.write_text(json.dumps(config))
    out = _ok(
        _run(
            [str(python), "-c", _SERVICE_CLIENT, str(control_plane.kubeconfig), str(plugin)],
            cwd=work, env=_env(), timeout=120,
        )
    )  # fmt: skip
    assert "listed NamespaceList" in out, out
    assert "needs a credential plugin" in out, out
    assert "pip install 'dynvol[kubeconfig-plugins]'" in out, out
