"""``dynvol controller``: webhooks, class protection and claim status (leader-elected)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from dynvol.status import add_status_flags, status_server, until_started
from dynvol_core import constants as c

log = logging.getLogger("dynvol.controller")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dynvol controller`` to the CLI."""
    p = subparsers.add_parser(
        "controller",
        help="run the cluster controller and the admission webhooks",
        description=(
            "Serve dynvol's mutating and validating webhooks over TLS, protect "
            "StorageProviderClasses in use, and keep DynamicVolumeClaim status. "
            "Reconcilers run only on the replica holding the Lease."
        ),
    )
    p.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config "
        "or the in-cluster service account)",
    )
    p.add_argument("--webhook-host", default="0.0.0.0", help="address to serve webhooks on")
    p.add_argument("--webhook-port", type=int, default=9443)
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls-cert", help="serving certificate (PEM); with --tls-key")
    p.add_argument("--tls-key", help="serving key (PEM)")
    tls.add_argument(
        "--dev-certs",
        metavar="DIR",
        help="generate a CA and a serving certificate for 127.0.0.1/localhost in DIR "
        "(reused if present) and write DIR/ca-bundle.b64; for local clusters only",
    )
    p.add_argument(
        "--register-webhooks",
        metavar="URL",
        help="create/replace the webhook configurations pointing at URL (e.g. "
        "https://127.0.0.1:9443) with the dev caBundle; for local clusters only",
    )
    p.add_argument(
        "--webhook-cert-management",
        choices=("self", "external"),
        help="self (the default without --tls-cert/--dev-certs): keep a CA and the serving "
        "certificate in the Secret --webhook-secret, patch caBundle into the webhook "
        "configurations and renew before expiry (the leader writes; every replica serves "
        "from the Secret); external: someone else (cert-manager) writes the certificate, "
        "served from --tls-cert/--tls-key",
    )
    p.add_argument(
        "--webhook-secret",
        default="dynvol-webhook-tls",
        help="the Secret (in --lease-namespace) holding the self-managed certificate",
    )
    p.add_argument(
        "--webhook-service",
        default="dynvol-webhook",
        help="the Service the apiserver calls the webhooks through (the certificate's names)",
    )
    p.add_argument(
        "--webhook-configuration",
        default="dynvol",
        help="the Mutating- and ValidatingWebhookConfiguration whose caBundle is kept",
    )
    p.add_argument("--no-webhooks", action="store_true", help="run the reconcilers only")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lease-name", default="dynvol-controller")
    p.add_argument("--lease-namespace", default=c.DEFAULT_SYSTEM_NAMESPACE)
    p.add_argument("--identity", help="Lease holder identity (default: hostname_pid)")
    p.add_argument("--lease-duration", type=float, default=15.0, metavar="SECONDS")
    p.add_argument("--renew-deadline", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--retry-period", type=float, default=2.0, metavar="SECONDS")
    p.add_argument("--workers", type=int, default=4, help="workers per reconciler")
    p.add_argument(
        "--block-provider",
        action="append",
        default=[],
        metavar="NAME",
        help="refuse to load this provider plugin (repeatable)",
    )
    add_status_flags(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.tls_cert and not args.tls_key:
        print("dynvol controller: --tls-cert needs --tls-key", file=sys.stderr)
        return 2
    if args.register_webhooks and not args.dev_certs:
        print("dynvol controller: --register-webhooks needs --dev-certs", file=sys.stderr)
        return 2
    if args.webhook_cert_management is None:
        args.webhook_cert_management = "external" if args.tls_cert or args.dev_certs else "self"
    if args.webhook_cert_management == "self" and (args.tls_cert or args.dev_certs):
        print(
            "dynvol controller: --tls-cert and --dev-certs need --webhook-cert-management=external",
            file=sys.stderr,
        )
        return 2
    if args.webhook_cert_management == "external" and not (
        args.tls_cert or args.dev_certs or args.no_webhooks
    ):
        print(
            "dynvol controller: --webhook-cert-management=external needs --tls-cert/--tls-key",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace) -> int:
    from dynvol_controllers import (
        CertificateSettings,
        ControllerApp,
        ensure_dev_certs,
        register_webhooks,
    )
    from dynvol_kube import Client, Metrics, run_until_signalled
    from dynvol_providers.registry import load_registry

    cert, key = args.tls_cert, args.tls_key
    ca_bundle = None
    if args.dev_certs:
        certs = ensure_dev_certs(args.dev_certs)
        cert, key, ca_bundle = str(certs.cert), str(certs.key), certs.ca_bundle
    serving_cert = None
    if args.webhook_cert_management == "self":
        serving_cert = CertificateSettings(
            namespace=args.lease_namespace,
            secret_name=args.webhook_secret,
            service_name=args.webhook_service,
            configuration_name=args.webhook_configuration,
        )
    if args.no_webhooks:
        cert = key = serving_cert = None
    registry = load_registry(blocked=args.block_provider)
    metrics = Metrics()
    started = until_started(metrics)
    status = status_server(args.metrics_address, metrics)
    client = await Client.from_kubeconfig(
        args.kubeconfig, user_agent="dynvol-controller", metrics=metrics
    )
    options = {"identity": args.identity} if args.identity else {}
    app = ControllerApp(
        client=client,
        tls_cert=cert,
        tls_key=key,
        serving_cert=serving_cert,
        webhook_host=args.webhook_host,
        webhook_port=args.webhook_port,
        leader_elect=args.leader_elect,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        registry=registry,
        workers=args.workers,
        **options,
    )

    async def start() -> None:
        await status.start()
        await app.start()
        if args.register_webhooks and ca_bundle:
            await register_webhooks(client, ca_bundle=ca_bundle, url=args.register_webhooks)
            log.info("registered webhooks at %s", args.register_webhooks)
        started()
        log.info("dynvol controller running (identity %s)", app.identity)

    async def close() -> None:
        try:
            await app.close()
        finally:
            await client.close()
            await status.close()

    # A lost Lease closes the app by itself: the process then exits 1 to restart clean.
    await run_until_signalled(start, close, until=app.wait_closed)
    return 1 if app.manager.lost_leadership else 0
