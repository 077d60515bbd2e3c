"""The status endpoint of every process: ``--metrics-address`` and the server behind it.

Each of ``dynvol node``, ``dynvol controller`` and ``dynvol dmp`` makes one
:class:`dynvol_kube.Metrics` (its own registry and health checks), hands it to its client
and services, and serves it with :func:`status_server` on ``--metrics-address``:
``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness). The default listens on
loopback on a free port; the manifests choose a fixed port on all addresses for the
kubelet's probes and for Prometheus. The runtime is imported only when a server is
made, so that a command's flags parse where its service's dependencies are not installed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynvol_kube import Metrics, StatusServer

__all__ = ["DEFAULT_METRICS_ADDRESS", "add_status_flags", "status_server", "until_started"]

DEFAULT_METRICS_ADDRESS = "127.0.0.1:0"


def _address(text: str) -> str:
    from dynvol_kube.health import parse_address

    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_status_flags(parser: argparse.ArgumentParser) -> None:
    """Add the ``metrics and health`` flags to a subcommand's parser."""
    group = parser.add_argument_group("metrics and health")
    group.add_argument(
        "--metrics-address",
        type=_address,
        default=DEFAULT_METRICS_ADDRESS,
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz here (default "
        f"{DEFAULT_METRICS_ADDRESS}: loopback, a free port, logged at start)",
    )


def status_server(address: str, metrics: Metrics) -> StatusServer:
    """The status server of ``metrics`` on ``address`` (``HOST:PORT``)."""
    from dynvol_kube import StatusServer, parse_address

    host, port = parse_address(address)
    return StatusServer(metrics.registry, metrics.health, host=host, port=port)


def until_started(metrics: Metrics) -> Callable[[], None]:
    """Fail readiness until the returned function is called (start-up is complete)."""
    started = False

    async def check() -> str | None:
        return None if started else "still starting"

    def done() -> None:
        nonlocal started
        started = True

    metrics.health.add_readiness("started", check)
    return done
