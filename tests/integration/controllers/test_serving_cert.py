"""The controller keeps its own webhook serving certificate, on the real apiserver.

The Secret, the webhook configurations and the apiserver's calls to the webhook are all
real; the webhook server listens on 127.0.0.1 and the apiserver calls it by URL, so the
certificate carries ``127.0.0.1`` besides the Service's names (``extra_names``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import secrets
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from dynvol.testing import Process, free_port
from dynvol_controllers import CertificateKeeper, CertificateSettings, ControllerApp
from dynvol_controllers.app import register_webhooks
from dynvol_controllers.servingcert import (
    CertificatePolicy,
    Material,
    examine,
    read_secret,
    renew,
    service_names,
)
from dynvol_controllers.webhooks import WebhookServer
from dynvol_core import constants as c
from dynvol_kube import APIError, APINotFound, Client, Metrics
from dynvol_kube.resources import MUTATING_WEBHOOKS, PODS, SECRETS, VALIDATING_WEBHOOKS
from dynvol_providers.registry import load_registry

from .controller_support import eventually, pod_manifest

pytestmark = pytest.mark.integration

ANNOTATED = {
    c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample",
    c.ANNOTATION_MOUNT_PATH_ROOT: "/dynamic",
}
#: Short lifetimes: the serving certificate is renewed after 3 s.
SHORT = CertificatePolicy(
    ca_lifetime=dt.timedelta(minutes=10),
    serving_lifetime=dt.timedelta(seconds=6),
    renew_fraction=0.5,
    backdate=dt.timedelta(0),
    ca_overlap=dt.timedelta(seconds=2),
)


def _settings(namespace: str, **kw: Any) -> CertificateSettings:
    token = secrets.token_hex(3)
    options: dict[str, Any] = {
        "namespace": namespace,
        "secret_name": f"webhook-tls-{token}",
        "service_name": "dynvol-webhook",
        "configuration_name": f"dynvol-cert-{token}",
        "extra_names": ("127.0.0.1",),
        "interval": 0.3,
    }
    options.update(kw)
    return CertificateSettings(**options)


@contextlib.asynccontextmanager
async def _configurations(client: Client, name: str, url: str) -> AsyncIterator[None]:
    """The webhook configurations, pointing at ``url``, without a caBundle."""
    await register_webhooks(client, ca_bundle="", url=url, name=name)
    try:
        yield
    finally:
        for resource in (MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS):
            with contextlib.suppress(APIError):
                await client.delete(resource, name)


@contextlib.asynccontextmanager
async def _keeper(
    client: Client, settings: CertificateSettings, tmp_path: Path, port: int
) -> AsyncIterator[CertificateKeeper]:
    """A keeper and its webhook server on ``port``, without leader election (it writes)."""
    directory = tmp_path / f"keeper-{secrets.token_hex(3)}"
    server = WebhookServer(
        port=port,
        cert_file=str(directory / "tls.crt"),
        key_file=str(directory / "tls.key"),
        handlers={},
    )
    keeper = CertificateKeeper(
        client=client, settings=settings, webhook=server, directory=directory
    )
    await keeper.start()
    try:
        yield keeper
    finally:
        await keeper.close()


@pytest.fixture
async def cleanup_secrets(client: Client, system_namespace: str) -> AsyncIterator[list[str]]:
    """Names of Secrets a test made in the system namespace; deleted after it."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(APINotFound):
            await client.delete(SECRETS, name, namespace=system_namespace)


async def _secret_material(client: Client, settings: CertificateSettings) -> Material:
    secret = await client.get(SECRETS, settings.secret_name, namespace=settings.namespace)
    assert secret["type"] == "kubernetes.io/tls"
    return read_secret(secret["data"])


async def _served(port: int, bundle_pem: bytes, server_name: str) -> x509.Certificate:
    """The certificate the server at 127.0.0.1:``port`` shows a new connection, verified
    against ``bundle_pem`` for ``server_name``."""
    context = ssl.create_default_context(cadata=bundle_pem.decode())
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def _bundles(client: Client, name: str) -> list[str]:
    found = []
    for resource in (MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS):
        config = await client.get(resource, name)
        found += [h["clientConfig"].get("caBundle", "") for h in config["webhooks"]]
    return found


def _until(check: Callable[[], Awaitable[Any]], within: float = 30) -> Awaitable[Any]:
    return eventually(check, within=within, interval=0.2)


async def test_first_start_creates_the_secret_and_the_apiserver_calls_over_tls(
    kube_client: Any, client: Client, system_namespace: str, cleanup_secrets: list[str]
) -> None:
    metrics = Metrics()
    own = Client.wrap(kube_client, metrics=metrics)
    settings = _settings(system_namespace)
    cleanup_secrets.append(settings.secret_name)
    port = free_port()
    app = ControllerApp(
        client=own,
        serving_cert=settings,
        webhook_port=port,
        lease_name=f"dynvol-test-{secrets.token_hex(3)}",
        lease_namespace=system_namespace,
        lease_duration=3,
        renew_deadline=2,
        retry_period=0.5,
        registry=load_registry(),
    )
    async with _configurations(client, settings.configuration_name, f"https://127.0.0.1:{port}"):
        assert set(await _bundles(client, settings.configuration_name)) == {""}
        await app.start()
        try:
            assert app.keeper is not None
            await asyncio.wait_for(app.keeper.serving.wait(), 30)
            material = await _secret_material(client, settings)
            assert examine(material, settings.names, dt.datetime.now(dt.UTC), settings.policy).ok
            expected = base64.b64encode(material.bundle_pem()).decode()
            assert await _until(
                lambda: _equal(_bundles(client, settings.configuration_name), [expected] * 3)
            )
            # A real admission request: the apiserver calls the mutating webhook (Ignore on
            # failure, so only a successful TLS call injects the volume).
            probe = pod_manifest("probe", labels={}, node=None, annotations=ANNOTATED)

            async def mutated() -> bool:
                created = await client.request(
                    "POST", PODS.path(namespace="default"), params={"dryRun": "All"}, body=probe
                )
                return any(v["name"] == c.VOLUME_NAME for v in created["spec"].get("volumes") or ())

            assert await _until(mutated)
            served = await _served(port, material.bundle_pem(), settings.names[0])
            assert served.serial_number == material.cert.serial_number
            expiry = metrics.registry.get_sample_value(
                "dynvol_webhook_certificate_expiry_timestamp_seconds"
            )
            assert expiry == material.cert.not_valid_after_utc.timestamp()
            for kind in ("ca", "serving"):
                assert (
                    metrics.registry.get_sample_value(
                        "dynvol_webhook_certificate_renewals_total", {"certificate": kind}
                    )
                    == 1
                )
        finally:
            await app.close()


async def _equal(got: Awaitable[Any], expected: Any) -> bool:
    return bool(await got == expected)


async def test_tampered_ca_bundle_is_restored(
    client: Client, system_namespace: str, tmp_path: Path, cleanup_secrets: list[str]
) -> None:
    settings = _settings(system_namespace)
    cleanup_secrets.append(settings.secret_name)
    port = free_port()
    name = settings.configuration_name
    async with (
        _configurations(client, name, f"https://127.0.0.1:{port}"),
        _keeper(client, settings, tmp_path, port) as keeper,
    ):
        await asyncio.wait_for(keeper.serving.wait(), 30)
        expected = base64.b64encode((await _secret_material(client, settings)).bundle_pem())
        assert await _until(lambda: _equal(_bundles(client, name), [expected.decode()] * 3))
        foreign = renew(None, None, ("elsewhere.invalid",), dt.datetime.now(dt.UTC), SHORT)
        tampered = base64.b64encode(foreign.bundle_pem()).decode()
        await client.patch(
            VALIDATING_WEBHOOKS, name,
            [{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": tampered}],
            content_type="application/json-patch+json",
        )  # fmt: skip
        await client.patch(
            MUTATING_WEBHOOKS, name,
            [{"op": "remove", "path": "/webhooks/1/clientConfig/caBundle"}],
            content_type="application/json-patch+json",
        )  # fmt: skip
        assert await _bundles(client, name) != [expected.decode()] * 3
        assert await _until(lambda: _equal(_bundles(client, name), [expected.decode()] * 3))


def _mismatched(names: tuple[str, ...]) -> Material:
    now = dt.datetime.now(dt.UTC)
    good = renew(None, None, names, now, CertificatePolicy())
    other = renew(None, None, names, now, CertificatePolicy())
    return Material(
        cert=good.cert, key=other.key, ca_cert=good.ca_cert, ca_key=good.ca_key,
        bundle=good.bundle,
    )  # fmt: skip


@pytest.mark.parametrize("fault", ["wrong-name", "expired", "key-mismatch", "garbage"])
async def test_unusable_secret_is_replaced(
    client: Client,
    system_namespace: str,
    tmp_path: Path,
    cleanup_secrets: list[str],
    fault: str,
) -> None:
    settings = _settings(system_namespace)
    cleanup_secrets.append(settings.secret_name)
    now = dt.datetime.now(dt.UTC)
    data: dict[str, str]
    if fault == "wrong-name":
        data = renew(None, None, service_names("other", "elsewhere"), now, SHORT).secret_data()
    elif fault == "expired":
        long_ago = now - dt.timedelta(seconds=30)
        data = renew(None, None, settings.names, long_ago, SHORT).secret_data()
    elif fault == "key-mismatch":
        data = _mismatched(settings.names).secret_data()
    else:
        data = {"tls.crt": base64.b64encode(b"not a certificate").decode(), "tls.key": ""}
    created = await client.create(
        SECRETS,
        {
            "metadata": {"name": settings.secret_name, "namespace": system_namespace},
            "type": "kubernetes.io/tls",
            "data": data,
        },
        namespace=system_namespace,
    )
    port = free_port()
    async with (
        _configurations(client, settings.configuration_name, f"https://127.0.0.1:{port}"),
        _keeper(client, settings, tmp_path, port) as keeper,
    ):
        await asyncio.wait_for(keeper.serving.wait(), 30)
        secret = await client.get(SECRETS, settings.secret_name, namespace=system_namespace)
        # Updated in place, not deleted and made again.
        assert secret["metadata"]["uid"] == created["metadata"]["uid"]
        assert secret["data"]["tls.crt"] != data["tls.crt"]
        material = read_secret(secret["data"])
        assert examine(material, settings.names, dt.datetime.now(dt.UTC), settings.policy).ok
        served = await _served(port, material.bundle_pem(), settings.names[0])
        assert served.serial_number == material.cert.serial_number


async def test_renewal_is_served_on_new_connections_without_restart(
    client: Client, system_namespace: str, tmp_path: Path, cleanup_secrets: list[str]
) -> None:
    settings = _settings(system_namespace, policy=SHORT)
    cleanup_secrets.append(settings.secret_name)
    port = free_port()
    async with (
        _configurations(client, settings.configuration_name, f"https://127.0.0.1:{port}"),
        _keeper(client, settings, tmp_path, port) as keeper,
    ):
        await asyncio.wait_for(keeper.serving.wait(), 30)
        first = await _secret_material(client, settings)
        before = await _served(port, first.bundle_pem(), settings.names[0])
        assert before.serial_number == first.cert.serial_number
        reloads = keeper.webhook.certificate.reloads

        async def renewed() -> Material | None:
            now = await _secret_material(client, settings)
            return now if now.cert.serial_number != first.cert.serial_number else None

        second = await _until(renewed, within=20)
        assert second.ca_cert == first.ca_cert  # only the serving certificate was due

        async def served_new() -> bool:
            cert = await _served(port, second.bundle_pem(), settings.names[0])
            return cert.serial_number == second.cert.serial_number

        assert await _until(served_new, within=10)
        assert keeper.webhook.certificate.reloads > reloads


async def test_ca_rotation_trusts_the_new_ca_before_serving_from_it(
    client: Client, system_namespace: str, tmp_path: Path, cleanup_secrets: list[str]
) -> None:
    settings = _settings(system_namespace, policy=SHORT)
    cleanup_secrets.append(settings.secret_name)
    # A CA 8 of its 10 minutes old: due for rotation at once.
    old = renew(
        None, None, settings.names, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=8), SHORT
    )
    await client.create(
        SECRETS,
        {
            "metadata": {"name": settings.secret_name, "namespace": system_namespace},
            "type": "kubernetes.io/tls",
            "data": old.secret_data(),
        },
        namespace=system_namespace,
    )
    port = free_port()
    name = settings.configuration_name
    async with (
        _configurations(client, name, f"https://127.0.0.1:{port}"),
        _keeper(client, settings, tmp_path, port) as keeper,
    ):
        await asyncio.wait_for(keeper.serving.wait(), 30)
        rotated = await _secret_material(client, settings)
        assert rotated.ca_cert != old.ca_cert
        assert rotated.bundle == (rotated.ca_cert, old.ca_cert)
        both = base64.b64encode(rotated.bundle_pem()).decode()
        assert await _bundles(client, name) == [both] * 3

        async def pruned() -> Material | None:
            now = await _secret_material(client, settings)
            return now if len(now.bundle) == 1 else None

        # After the overlap the old CA leaves the Secret and the webhook configurations.
        final = await _until(pruned, within=20)
        assert final.bundle[0] == rotated.ca_cert
        only_new = base64.b64encode(final.bundle_pem()).decode()
        assert await _until(lambda: _equal(_bundles(client, name), [only_new] * 3))


async def test_two_managers_racing_converge_on_one_secret(
    client: Client, system_namespace: str, tmp_path: Path, cleanup_secrets: list[str]
) -> None:
    settings = _settings(system_namespace)
    cleanup_secrets.append(settings.secret_name)
    ports = free_port(), free_port()
    async with (
        _configurations(client, settings.configuration_name, f"https://127.0.0.1:{ports[0]}"),
        _keeper(client, settings, tmp_path, ports[0]) as first,
        _keeper(client, settings, tmp_path, ports[1]) as second,
    ):
        await asyncio.wait_for(asyncio.gather(first.serving.wait(), second.serving.wait()), 30)

        async def converged() -> bool:
            material = await _secret_material(client, settings)
            serials = [
                (await _served(p, material.bundle_pem(), settings.names[0])).serial_number
                for p in ports
            ]
            bundle = base64.b64encode(material.bundle_pem()).decode()
            return (
                serials == [material.cert.serial_number] * 2
                and await _bundles(client, settings.configuration_name) == [bundle] * 3
            )

        assert await _until(converged)
        # Settled: a few more passes write nothing.
        version = (await client.get(SECRETS, settings.secret_name, namespace=system_namespace))[
            "metadata"
        ]["resourceVersion"]
        await asyncio.sleep(1.5)
        again = await client.get(SECRETS, settings.secret_name, namespace=system_namespace)
        assert again["metadata"]["resourceVersion"] == version


async def test_taking_over_from_cert_manager_trusts_both_cas_until_the_overlap(
    client: Client, system_namespace: str, tmp_path: Path, cleanup_secrets: list[str]
) -> None:
    settings = _settings(system_namespace, policy=SHORT)
    cleanup_secrets.append(settings.secret_name)
    theirs = renew(None, None, settings.names, dt.datetime.now(dt.UTC), CertificatePolicy())
    data = theirs.secret_data()
    del data["ca.key"]  # cert-manager writes ca.crt, tls.crt and tls.key
    await client.create(
        SECRETS,
        {
            "metadata": {"name": settings.secret_name, "namespace": system_namespace},
            "type": "kubernetes.io/tls",
            "data": data,
        },
        namespace=system_namespace,
    )
    port = free_port()
    name = settings.configuration_name
    async with (
        _configurations(client, name, f"https://127.0.0.1:{port}"),
        _keeper(client, settings, tmp_path, port) as keeper,
    ):
        await asyncio.wait_for(keeper.serving.wait(), 30)
        ours = await _secret_material(client, settings)
        assert ours.ca_cert != theirs.ca_cert
        assert ours.bundle == (ours.ca_cert, theirs.ca_cert)
        assert await _bundles(client, name) == [base64.b64encode(ours.bundle_pem()).decode()] * 3
        served = await _served(port, ours.bundle_pem(), settings.names[0])
        assert served.serial_number == ours.cert.serial_number

        async def only_ours() -> bool:
            now = await _secret_material(client, settings)
            return now.bundle == (ours.ca_cert,)

        assert await _until(only_ours, within=20)


async def test_the_controller_process_keeps_its_certificate_by_default(
    client: Client,
    system_namespace: str,
    control_plane: Any,
    tmp_path: Path,
    cleanup_secrets: list[str],
) -> None:
    """``dynvol controller`` with no certificate flags: self-managed, ready once served."""
    settings = _settings(system_namespace)
    cleanup_secrets.append(settings.secret_name)
    port, status_port = free_port(), free_port()
    name = settings.configuration_name
    argv = [
        sys.executable, "-m", "dynvol.cli", "controller",
        "--kubeconfig", str(control_plane.kubeconfig),
        "--webhook-host", "127.0.0.1", "--webhook-port", str(port),
        "--webhook-secret", settings.secret_name, "--webhook-configuration", name,
        "--lease-name", f"dynvol-test-{secrets.token_hex(3)}",
        "--lease-namespace", system_namespace,
        "--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "0.5",
        "--metrics-address", f"127.0.0.1:{status_port}",
    ]  # fmt: skip
    async with _configurations(client, name, f"https://127.0.0.1:{port}"):
        process = Process.start(argv, name="dynvol-controller", log=tmp_path / "controller.log")
        try:

            async def ready() -> bool:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{status_port}/readyz") as response,
                ):
                    # This controller's own answer (the check it registers), and it runs.
                    mine = "[+]webhook serving certificate ok" in await response.text()
                    return response.status == 200 and mine and process.poll() is None

            assert await _until(_quietly(ready), within=60), process.log_tail()
            material = await _secret_material(client, settings)
            assert examine(
                material, settings.names[:2], dt.datetime.now(dt.UTC), settings.policy
            ).ok
            bundle = base64.b64encode(material.bundle_pem()).decode()
            assert await _until(lambda: _equal(_bundles(client, name), [bundle] * 3))
            served = await _served(port, material.bundle_pem(), "dynvol-webhook.dynvol-system.svc")
            assert served.serial_number == material.cert.serial_number
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{status_port}/metrics") as response,
            ):
                text = await response.text()
            assert "dynvol_webhook_certificate_expiry_timestamp_seconds " in text
            assert process.stop(signum=signal.SIGTERM) == 0, process.log_tail()
        finally:
            process.stop()


def _quietly(check: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        try:
            return await check()
        except aiohttp.ClientError:
            return False

    return run
