"""The mount pod agent starts light: ``dynvol dmp``'s modules, its provider plugins, a
status server and requests through the client's own transport import no HTTP library,
no Kubernetes client and nothing of the other services (a fresh interpreter, as a DMP
starts). Each of these costs every opted-in pod memory and start-up time (issue 14:
aiohttp alone was about 11 MiB and 0.2 s of CPU per agent)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: Top-level packages the agent must not load.
HEAVY = (
    "aiohttp", "yarl", "multidict", "kubernetes_asyncio", "grpclib", "betterproto",
    "cryptography", "boto3", "botocore", "dynvol_controllers", "dynvol_csi",
)  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    import dynvol.commands.dmp
    import dynvol_dmp.agent
    from dynvol_kube import Client, Metrics, StatusServer
    from dynvol_kube.kubeconfig import Endpoint
    from dynvol_providers import load_registry

    load_registry()

    async def main():
        metrics = Metrics()
        async with StatusServer(metrics.registry, metrics.health) as server:
            endpoint = Endpoint(server=server.url)
            async with await Client.from_endpoint(endpoint, metrics=metrics) as client:
                assert await client.request("GET", "/healthz") == "ok\\n"
                assert "dynvol_apiserver_requests_total" in await client.request("GET", "/metrics")

    asyncio.run(main())
    heavy = set(sys.argv[1].split(","))
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
    """
)


def _loaded(script: str, packages: tuple[str, ...] | list[str]) -> str:
    """Run ``script`` in a fresh interpreter; what it prints: the ``packages`` it loaded."""
    result = subprocess.run(
        [sys.executable, "-c", script, ",".join(packages)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_agent_imports_no_http_library_and_no_other_service() -> None:
    assert _loaded(SCRIPT, HEAVY) == "[]"


#: What the webhook server used to bring (aiohttp and its dependencies but multidict, which
#: the node plugin's grpclib uses too; issue 15).
AIOHTTP = (
    "aiohttp", "yarl", "propcache", "frozenlist", "aiosignal", "aiohappyeyeballs", "idna",
    "kubernetes_asyncio",
)  # fmt: skip

SERVICES_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, ssl, sys, tempfile

    import dynvol.commands.controller, dynvol.commands.node, dynvol.wiring
    import dynvol_controllers.app, dynvol_csi.server
    from dynvol_controllers import WebhookServer, ensure_dev_certs
    from dynvol_controllers.admission import AdmissionDecision
    from dynvol_kube import http

    async def main(directory):
        certs = ensure_dev_certs(directory)

        async def allow(request):
            return AdmissionDecision.allow()

        server = WebhookServer(
            port=0, cert_file=str(certs.cert), key_file=str(certs.key),
            handlers={"/validate": allow},
        )
        await server.start()
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        pool = http.Pool(server.url, ssl_context=context)
        try:
            review = {"request": {"uid": "u1"}}
            for _ in range(2):
                answer = await pool.request(
                    "POST", "/validate", headers={"Content-Type": "application/json"},
                    body=json.dumps(review).encode(), within=10,
                )
                assert json.loads(answer.body)["response"] == {"uid": "u1", "allowed": True}
        finally:
            await pool.close()
            await server.close()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(main(directory))
    heavy = set(sys.argv[1].split(","))
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
    """
)


def test_the_controller_and_the_node_plugin_import_no_aiohttp() -> None:
    """``dynvol controller``'s and ``dynvol node``'s modules, and two reviews through the
    webhook server over TLS, in a fresh interpreter: no aiohttp (issue 15)."""
    assert _loaded(SERVICES_SCRIPT, AIOHTTP) == "[]"
