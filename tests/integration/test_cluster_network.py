"""The node network (dynvol.testing.cluster.network) leaves the mount table as it found it.

The first ``ip netns add`` on a machine binds ``/run/netns`` onto itself. A fresh machine
has no such mount, so a cluster brought up and down there must unmount it again, or the
session's leak check finds it. Each case runs in its own mount and network namespaces
(``unshare -m -n``), where ``/run/netns`` is first unmounted, so neither the machine's
network nor a running test cluster is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip",
)

# Runs inside the new namespaces; prints what it saw as JSON.
_SCRIPT = """
import json, subprocess, sys
from pathlib import Path
from dynvol.testing.cluster import network
from dynvol.testing.cluster.addressing import plan_nodes
from dynvol.testing.mounts import mounts_under

premounted, marker = sys.argv[1] == "premounted", Path(sys.argv[2])
for _ in range(5):
    if not mounts_under(network.NETNS_DIR):
        break
    subprocess.run(["umount", "-l", str(network.NETNS_DIR)], check=False)
network.NETNS_DIR.mkdir(parents=True, exist_ok=True)
if premounted:
    d = str(network.NETNS_DIR)
    subprocess.run(["mount", "--bind", d, d], check=True)
    subprocess.run(["mount", "--make-shared", d], check=True)
nodes = plan_nodes(1)
seen = {"before": network._netns_dir_mounted()}
network.create(nodes, marker=marker)
seen["up"] = network._netns_dir_mounted()
seen["marker_up"] = marker.exists()
seen["netns_up"] = (network.NETNS_DIR / nodes[0].netns).exists()
seen["left"] = network.remove(nodes, marker=marker)
seen["down"] = network._netns_dir_mounted()
seen["marker_down"] = marker.exists()
print(json.dumps(seen))
"""


_UNSHARE = ("unshare", "--mount", "--net", "--propagation", "private")


def _run(mode: str, marker: Path) -> dict[str, object]:
    done = subprocess.run(
        [*_UNSHARE, sys.executable, "-c", _SCRIPT, mode, str(marker)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_cluster_unmounts_the_netns_directory_it_made_a_mount(tmp_path: Path) -> None:
    seen = _run("fresh", tmp_path / "marker")
    assert seen == {
        "before": False,
        "up": True,
        "marker_up": True,
        "netns_up": True,
        "left": [],
        "down": False,
        "marker_down": False,
    }


def test_a_netns_directory_mounted_before_the_cluster_stays_mounted(tmp_path: Path) -> None:
    seen = _run("premounted", tmp_path / "marker")
    assert seen == {
        "before": True,
        "up": True,
        "marker_up": False,
        "netns_up": True,
        "left": [],
        "down": True,
        "marker_down": False,
    }
