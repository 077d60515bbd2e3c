"""The node plugin's status endpoint: a real ``dynvol node --csi-only`` with
``--metrics-address``, real publishes and unpublishes through its socket, real binds.

The figures move with each call (count by method and code, durations, published volumes),
a refused call is counted with its gRPC code, and the probes answer from the plugin's own
CSI Probe: once the process stops answering on its socket, liveness fails.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
from grpclib import GRPCError, Status

from dynvol.testing.processes import Process, free_port, wait_until
from dynvol.testing.scraping import get, scrape

from .conftest import CsiClient, NodePluginProcess, new_pod_volume

pytestmark = pytest.mark.integration


@attrs.define
class MeteredPlugin(NodePluginProcess):
    """The plugin process with its status server on a port of 127.0.0.1."""

    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "dynvol", "--log-level", "DEBUG",
            "node", "--csi-only", "--publish-guard", "off",
            "--endpoint", f"unix://{self.socket}", "--node-id", "test-node",
            "--root", str(self.root), "--kubelet-dir", str(self.kubelet_dir),
            "--registration-dir", "",
            "--metrics-address", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        self.proc = Process.start(argv, name="dynvol-node", log=self.log)
        wait_until(self._ready, timeout=20, what="/readyz", alive=self.proc)

    def _ready(self) -> bool:
        try:
            return get(self.url + "/readyz", timeout=2)[0] == 200
        except OSError:
            return False


@pytest.fixture
async def plugin(rshared_dir: Path) -> AsyncIterator[MeteredPlugin]:
    sock_dir = Path(tempfile.mkdtemp(prefix="dvcsim-", dir="/tmp"))
    (rshared_dir / "kubelet" / "pods").mkdir(parents=True)
    metered = MeteredPlugin(
        base=rshared_dir, socket=sock_dir / "csi.sock", log=rshared_dir.parent / "node.log",
        port=free_port(),
    )  # fmt: skip
    try:
        metered.start()
        yield metered
    finally:
        metered.stop()


async def test_figures_move_with_publish_and_unpublish(plugin: MeteredPlugin) -> None:
    status, body = get(plugin.url + "/healthz")
    assert status == 200, body
    assert "[+]csi socket ok" in body
    before = scrape(plugin.url)
    assert before.get("dynvol_csi_published_volumes") == 0

    client = CsiClient(plugin.socket)
    try:
        vol = new_pod_volume(plugin)
        await client.node.node_publish_volume(vol.publish_request())
        published = scrape(plugin.url)
        assert published.get("dynvol_csi_published_volumes") == 1
        assert published.get("dynvol_csi_operations_total", method="NodePublishVolume",
                             code="OK") == 1  # fmt: skip
        assert published.get("dynvol_csi_operation_duration_seconds_count",
                             method="NodePublishVolume") == 1  # fmt: skip

        # A request without a volume ID: refused, and counted with its code.
        bad = vol.publish_request()
        bad.volume_id = ""
        with pytest.raises(GRPCError) as refused:
            await client.node.node_publish_volume(bad)
        assert refused.value.status is Status.INVALID_ARGUMENT
        assert scrape(plugin.url).get("dynvol_csi_operations_total", method="NodePublishVolume",
                                      code="INVALID_ARGUMENT") == 1  # fmt: skip

        await client.node.node_unpublish_volume(vol.unpublish_request())
        after = scrape(plugin.url)
        assert after.get("dynvol_csi_published_volumes") == 0
        assert after.get("dynvol_csi_operations_total", method="NodeUnpublishVolume",
                         code="OK") == 1  # fmt: skip
        # The probes' own Probe calls are counted too, through the same listener.
        assert after.get("dynvol_csi_operations_total", method="Probe", code="OK") >= 1
    finally:
        client.close()


async def test_liveness_fails_when_the_plugin_stops_answering_on_its_socket(
    plugin: MeteredPlugin,
) -> None:
    assert plugin.proc is not None
    assert get(plugin.url + "/healthz")[0] == 200
    # SIGSTOP freezes the whole process, status server included, so that cannot be it;
    # removing the socket file is what a stuck or broken CSI server looks like from outside.
    plugin.socket.unlink()
    status, body = get(plugin.url + "/healthz")
    assert status == 503, body
    assert "[-]csi socket: CSI Probe on" in body
    assert get(plugin.url + "/readyz")[0] == 503
