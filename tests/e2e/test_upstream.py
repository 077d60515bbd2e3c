"""Kubernetes' own storage e2e suite (``e2e.test`` of the pinned release) against dynvol.

``e2e.test`` is built from ``k8s.io/kubernetes/test/e2e`` at the pinned Kubernetes
(``make tools-e2e``) and runs its external-driver storage suite (``External Storage``)
for dynvol's CSI driver, described by ``tests/upstream/dynvol-driver.yaml``, on the real
three-node cluster of ``dynvol.testing.cluster`` with dynvol installed from the base
manifests, a StorageProviderClass for MinIO and the suite's busybox image built locally
(``hack/images/build.py`` ``e2e-busybox``) and imported into every node.

Two runs of ``e2e.test``:

- ``test_external_storage``: every ``External Storage`` spec of the driver except those in
  :data:`REFUSED` (``--ginkgo.skip``); it must exit 0 with no failed spec, every spec that
  is left must have run or been skipped by the suite itself, and each skip reason is printed.
- ``test_refused_specs``: the :data:`REFUSED` specs on their own. Their pods carry a
  hand-written dynvol volume, which dynvol's ``dynvol-pods`` admission policy refuses by
  design (docs/design.md §6); the test asserts that each of them fails, and fails with that
  refusal and no other error, so that the reason they are skipped above stays checked.

JUnit reports, logs and ``summary.json`` go to ``$DYNVOL_UPSTREAM_RESULTS`` (default
``_out/upstream`` in the checkout). Run it with ``make test-upstream`` (which sets
``DYNVOL_UPSTREAM_E2E=1`` and takes the machine's cluster lock); the plain e2e tier skips
this file. docs/upstream-e2e.md has the whole story and the last result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from dynvol.testing import MinioServer
from dynvol.testing.cluster import deploying
from dynvol.testing.cluster.addressing import HOST_ADDRESS
from tests.e2e.nodes import NODES, Cluster, deployed_cluster

pytestmark = pytest.mark.e2e

GROUP = "dynamicvolume.csi.cloudnative101.net"
DRIVER = GROUP
TOP = Path(__file__).resolve().parents[2]
DRIVER_FILE = TOP / "tests" / "upstream" / "dynvol-driver.yaml"
E2E_TEST = TOP / ".tools" / "bin" / "e2e.test"
IMAGES = ("pause", "busybox", "dynvol", "e2e-busybox")
#: The name under which hack/images/build.py builds the suite's busybox (its ``list``).
E2E_BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
#: Every External Storage spec of dynvol's driver (--ginkgo.focus is a regular expression).
FOCUS = rf"External.Storage \[Driver: {re.escape(DRIVER)}\]"
CREDENTIALS_NAMESPACE = "upstream-e2e-credentials"
SECRET = "upstream-e2e-s3"

#: Specs of the ephemeral suite that run against dynvol but cannot pass, and why.
#:
#: The suite builds its pod with ``StartInPodWithInlineVolume``: a ``csi:`` volume of
#: dynvol's driver written into the pod spec by hand, named ``my-volume-0``, and no opt-in
#: annotations. dynvol's ValidatingAdmissionPolicy ``dynvol-pods``
#: (manifests/base/admission-policies.yaml, docs/design.md §6) admits dynvol's volume only
#: as its webhook injects it: one volume, named ``dynamic-volume-root-path``, readOnly, with
#: the volumeAttributes of the pod's own opt-in annotations. So the apiserver refuses the
#: suite's pod before it reaches a node. That refusal is a security invariant (a tenant
#: must not hand the root node plugin a volume of its own making), not a bug;
#: ``test_refused_specs`` checks that it is the reason the spec fails.
#:
#: The other specs of the pattern are skipped by the suite itself: the driver declares its
#: volume read-only (the root of dynvol's volume is), and the read/write, two-pods and
#: multiple-volumes specs need a read/write one; expansion is for generic ephemeral
#: volumes only.
REFUSED = {
    "should create read-only inline ephemeral volume": (
        "its pod's hand-written volume my-volume-0 is refused by dynvol's admission policy "
        "dynvol-pods (only the webhook's dynamic-volume-root-path is admitted)"
    ),
}
#: What the apiserver answers for such a pod (the policy's first validation).
REFUSAL = re.compile(
    r"ValidatingAdmissionPolicy 'dynvol-pods' with binding 'dynvol-pods' denied request: "
    r"volume my-volume-0(, my-volume-1)? is dynvol's volume"
)
#: The specs the suite skips because the driver's volume is read-only; declared read/write
#: (which it is not), they run and are refused like the one in REFUSED.
NEED_READ_WRITE = (
    "should create read/write inline ephemeral volume",
    "should support two pods which have the same volume definition",
    "should support multiple inline ephemeral volumes",
)
#: Skipped by the suite for every CSI inline volume (it is for generic ephemeral ones).
SUITE_EXPANSION = "should support expansion of pvcs created for ephemeral pvcs"


def _results_dir() -> Path:
    return Path(os.environ.get("DYNVOL_UPSTREAM_RESULTS") or TOP / "_out" / "upstream")


def _import_suite_image(c: Cluster) -> None:
    """A cluster someone else brought up may lack the suite's image."""
    for node in NODES:
        subprocess.run(
            [
                str(TOP / ".venv" / "bin" / "python"),
                str(TOP / "hack" / "images" / "build.py"),
                "import",
                "--address",
                str(c.layout.node(node).containerd_sock),
                "e2e-busybox",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("DYNVOL_UPSTREAM_E2E") != "1":
        pytest.skip("the upstream suite takes minutes on three nodes: run 'make test-upstream'")
    missing = None if E2E_TEST.exists() else f"{E2E_TEST} is missing (make tools-e2e)"
    with deployed_cluster(reason=missing, images=IMAGES, reused=_import_suite_image) as c:
        yield c


@pytest.fixture(scope="module")
def storage_class(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[str]:
    """MinIO on the node network and the StorageProviderClass the driver file names."""
    definition = yaml.safe_load(DRIVER_FILE.read_text())
    names = {v["Attributes"]["storageProviderClass"] for v in definition["InlineVolumes"]}
    assert len(names) == 1, names
    (class_name,) = names
    server = MinioServer(dir=tmp_path_factory.mktemp("minio-upstream"), host=str(HOST_ADDRESS))
    server.start()
    try:
        cluster.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CREDENTIALS_NAMESPACE}},
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET, "namespace": CREDENTIALS_NAMESPACE},
                "type": "Opaque",
                "stringData": {
                    "access-key-id": server.access_key,
                    "secret-access-key": server.secret_key,
                },
            },
            {
                "apiVersion": f"{GROUP}/v1alpha1",
                "kind": "StorageProviderClass",
                "metadata": {"name": class_name},
                "spec": {
                    "provider": "s3",
                    "parameters": {
                        f"{GROUP}/storage-provider-secret-name": SECRET,
                        f"{GROUP}/storage-provider-secret-namespace": CREDENTIALS_NAMESPACE,
                        f"{GROUP}/mount-cpu-request": "10m",
                        f"{GROUP}/mount-memory-request": "50Mi",
                        f"{GROUP}/mount-cpu-limit": "500m",
                        f"{GROUP}/mount-memory-limit": "256Mi",
                    },
                    "connection": {"allowPrivateNetworks": True},
                },
            },
        )
        yield class_name
    finally:
        cluster.kubectl(
            "delete", "storageproviderclass", class_name, "--ignore-not-found",
            "--wait=true", "--timeout=60s", check=False, timeout=90,
        )  # fmt: skip
        cluster.kubectl(
            "delete", "namespace", CREDENTIALS_NAMESPACE, "--ignore-not-found",
            "--wait=true", "--timeout=120s", check=False, timeout=150,
        )  # fmt: skip
        server.stop()


# --------------------------------------------------------------------------- running e2e.test


@attrs.frozen
class Spec:
    name: str
    status: str  # passed, failed, skipped (by the suite, at run time), pending ...
    message: str
    seconds: float


@attrs.frozen
class Run:
    returncode: int
    specs: list[Spec]
    seconds: float
    report_dir: Path
    #: This driver's specs that the invocation left out (--ginkgo.skip).
    filtered: list[str]

    def by_status(self, status: str) -> list[Spec]:
        return [s for s in self.specs if s.status == status]

    def summary(self) -> dict[str, Any]:
        return {
            "exit": self.returncode,
            "seconds": round(self.seconds, 1),
            "ran": len(self.specs) - len(self.by_status("skipped")),
            "passed": len(self.by_status("passed")),
            "failed": len(self.by_status("failed")),
            "skipped": len(self.by_status("skipped")),
            "left_out": [_short(n) for n in self.filtered],
            "specs": [attrs.asdict(s) for s in self.specs],
        }


def _short(name: str) -> str:
    """The spec's own text, without the suite's ``External Storage [Driver ...] ...`` prefix."""
    text = re.sub(r"\s*\[Driver: [^]]*\]\s*$", "", name)
    return text.rsplit("] ephemeral ", 1)[-1] if "] ephemeral " in text else text


def _skip_regex(texts: Any) -> str:
    return "|".join(re.escape(t) for t in sorted(texts))


def run_e2e(
    cluster: Cluster, name: str, *, focus: str, skip: str | None, driver: Path = DRIVER_FILE
) -> Run:
    """Run ``e2e.test`` on the cluster; parse the JUnit report of this run's specs."""
    report_dir = _results_dir() / name
    report_dir.mkdir(parents=True, exist_ok=True)
    for old in report_dir.glob("junit*.xml"):
        old.unlink()
    argv = [
        str(E2E_TEST),
        f"--kubeconfig={cluster.kubeconfig}",
        f"--storage.testdriver={driver}",
        f"--repo-root={TOP}",
        # No cloud: the suite's generic code paths; the cluster is plain nodes.
        "--provider=skeleton",
        "--node-os-distro=debian",
        # Every node must be Ready (the default, stated).
        "--allowed-not-ready-nodes=0",
        f"--report-dir={report_dir}",
        f"--ginkgo.focus={focus}",
        "--ginkgo.timeout=20m",
        "--ginkgo.no-color",
        "--ginkgo.v",
    ]
    if skip:
        argv.append(f"--ginkgo.skip={skip}")
    print("$", " ".join(argv))
    began = time.monotonic()
    with open(report_dir / "e2e.log", "w") as log:
        proc = subprocess.run(
            argv, stdout=log, stderr=subprocess.STDOUT, timeout=25 * 60, cwd=report_dir
        )
    seconds = time.monotonic() - began
    reports = sorted(report_dir.glob("junit*.xml"))
    assert reports, f"e2e.test (exit {proc.returncode}) wrote no JUnit report; see {log.name}"
    specs: list[Spec] = []
    filtered: list[str] = []
    for report in reports:
        for case in ET.parse(report).iter("testcase"):
            case_name = case.get("name", "")
            if "External Storage" not in case_name or DRIVER not in case_name:
                continue  # the suite's setup and teardown nodes
            status = case.get("status", "")
            detail = case.find("failure")
            if detail is None:
                detail = case.find("error")
            if detail is None:
                detail = case.find("skipped")
            message = "" if detail is None else (detail.get("message") or detail.text or "")
            if status == "skipped" and message.strip() == "skipped":
                # Ginkgo reports specs left out by --ginkgo.focus/--ginkgo.skip as
                # "skipped" with no reason; a skip at run time says "skipped - <reason>".
                filtered.append(case_name)
                continue
            specs.append(Spec(case_name, status, message.strip(), float(case.get("time", 0))))
    result = Run(proc.returncode, specs, seconds, report_dir, filtered)
    (report_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    _print_summary(name, result)
    return result


def _print_summary(name: str, run: Run) -> None:
    s = run.summary()
    print(
        f"\n== upstream {name}: e2e.test exit {run.returncode} in {run.seconds:.0f}s; "
        f"{s['ran']} ran, {s['passed']} passed, {s['failed']} failed, "
        f"{s['skipped']} skipped by the suite (report: {run.report_dir})"
    )
    for spec in run.specs:
        print(f"   {spec.status:8} {spec.seconds:6.1f}s  {_short(spec.name)}")
        if spec.status != "passed" and spec.message:
            print(f"            {spec.message.splitlines()[0][:300]}")
    for text in run.filtered:
        short = _short(text)
        why = REFUSED.get(short, "") if run.report_dir.name == "external-storage" else ""
        print(f"   left out           {short}: {why or 'not focused in this run'}")


# --------------------------------------------------------------------------- tests


def test_external_storage(cluster: Cluster, storage_class: str) -> None:
    """Every External Storage spec of dynvol's driver but REFUSED: none may fail."""
    result = run_e2e(
        cluster,
        "external-storage",
        focus=FOCUS,
        # Refused by dynvol's admission policy by design (see REFUSED; checked below).
        skip=_skip_regex(REFUSED),
    )
    names = {_short(s.name) for s in result.specs}
    assert not names & set(REFUSED), "a REFUSED spec ran although it was skipped"
    assert {_short(n) for n in result.filtered} == set(REFUSED), result.filtered
    assert result.specs, "e2e.test ran no spec of dynvol's driver (check the driver file)"
    failed = [f"{_short(s.name)}: {s.message}" for s in result.by_status("failed")]
    assert not failed, failed
    assert result.returncode == 0, f"e2e.test exited {result.returncode}; see {result.report_dir}"
    unexpected = [s for s in result.specs if s.status not in ("passed", "skipped")]
    assert not unexpected, unexpected
    # A spec the suite skips says why; the summary prints it. These are the ones it skips
    # for this driver (docs/upstream-e2e.md); a new release that adds or drops one fails
    # here, so that the documented result is kept true.
    assert all(s.message for s in result.by_status("skipped")), result.by_status("skipped")
    skipped = {_short(s.name) for s in result.by_status("skipped")}
    assert skipped == {*NEED_READ_WRITE, SUITE_EXPANSION}, sorted(skipped)


def test_refused_specs(cluster: Cluster, storage_class: str) -> None:
    """The REFUSED specs each fail, and only because dynvol's admission refuses the pod."""
    result = run_e2e(
        cluster,
        "refused",
        focus=f"{FOCUS}.*({_skip_regex(REFUSED)})",
        skip=None,
    )
    by_name = {_short(s.name): s for s in result.specs}
    assert set(by_name) == set(REFUSED), sorted(by_name)
    assert result.returncode != 0
    for text, spec in by_name.items():
        assert spec.status == "failed", (
            f"{text!r} is {spec.status} now: dynvol no longer refuses it, so run it in "
            "test_external_storage (remove it from REFUSED)"
        )
        assert REFUSAL.search(spec.message), f"{text!r} failed for another reason: {spec.message}"
    # Nothing reached a node: no DMP and no DynamicVolumeMount was made for the suite.
    dmps = cluster.items(
        "pods", "-n", deploying.SYSTEM_NAMESPACE, "-l",
        f"app.kubernetes.io/component=dynamic-mount-pod,{GROUP}/storage-provider-class="
        f"{storage_class}",
    )  # fmt: skip
    assert dmps == [], [d["metadata"]["name"] for d in dmps]


def test_read_write_specs_are_refused_too(
    cluster: Cluster, storage_class: str, tmp_path: Path
) -> None:
    """Declared read/write, the specs the suite skips above run, and are refused the same way.

    The shipped driver file is right to say ReadOnly (dynvol's root is read-only and the
    policy insists on readOnly: true); this proves that the read-only declaration is not
    what keeps these specs from passing.
    """
    definition = yaml.safe_load(DRIVER_FILE.read_text())
    for volume in definition["InlineVolumes"]:
        volume["ReadOnly"] = False
    variant = tmp_path / "dynvol-driver-read-write.yaml"
    variant.write_text(yaml.safe_dump(definition))
    result = run_e2e(
        cluster,
        "refused-read-write",
        focus=f"{FOCUS}.*({_skip_regex(NEED_READ_WRITE)})",
        skip=None,
        driver=variant,
    )
    by_name = {_short(s.name): s for s in result.specs}
    assert set(by_name) == set(NEED_READ_WRITE), sorted(by_name)
    for text, spec in by_name.items():
        assert spec.status == "failed", f"{text!r} is {spec.status}: {spec.message}"
        assert REFUSAL.search(spec.message), f"{text!r} failed for another reason: {spec.message}"


def test_suite_busybox_is_the_local_image() -> None:
    """The image name build.py gives e2e-busybox is the one this e2e.test asks for."""
    if os.environ.get("DYNVOL_UPSTREAM_E2E") != "1":
        pytest.skip("run 'make test-upstream'")
    if not E2E_TEST.exists():
        pytest.skip(f"{E2E_TEST} is missing (make tools-e2e)")
    listed = subprocess.run(
        [str(E2E_TEST), "--list-images"], check=True, text=True, capture_output=True
    ).stdout.split()
    names = subprocess.run(
        [str(TOP / ".venv" / "bin" / "python"), str(TOP / "hack/images/build.py"), "list"],
        check=True,
        text=True,
        capture_output=True,
    ).stdout
    built = dict(line.split("\t") for line in names.splitlines())
    assert built["e2e-busybox"] == E2E_BUSYBOX
    # GetDefaultTestImage on Linux is the suite's busybox; there is one busybox of this tag.
    assert E2E_BUSYBOX in listed, [i for i in listed if "busybox" in i]
