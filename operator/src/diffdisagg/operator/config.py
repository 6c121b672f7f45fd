"""OperatorConfig: the operator's own settings (env/CLI → typed), and how they map onto kopf's settings."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import kopf


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty = all namespaces (cluster-wide)."""
    liveness_host: str = "0.0.0.0"
    """Where kopf's liveness endpoint listens (`/healthz`)."""
    liveness_port: int = 8080
    """Port of the liveness endpoint; 0 disables it."""
    resync_seconds: float = 60.0
    """Period of the drift-correcting timer per DiffusionDisaggDeployment (seconds)."""
    watch_server_timeout: int = 300
    """Server-side watch timeout (whole seconds: the API server rejects `300.0`): watches are
    re-established at least this often, so a silently dead connection cannot leave the operator blind."""
    watch_client_timeout: float = 330.0
    """Client-side watch session timeout (seconds), a bit over the server's."""
    request_timeout: float = 30.0
    """Timeout of one non-watch API request (seconds)."""
    conflict_retries: int = 5
    """How often a write that meets 409 Conflict is retried before the reconcile gives up."""

    def __post_init__(self) -> None:
        if self.resync_seconds <= 0:
            raise ValueError("resync_seconds must be > 0")
        if not 0 <= self.liveness_port < 65536:
            raise ValueError("liveness_port must be 0..65535")

    @property
    def liveness_endpoint(self) -> str | None:
        if not self.liveness_port:
            return None
        return f"http://{self.liveness_host}:{self.liveness_port}/healthz"

    def apply_to(self, settings: kopf.OperatorSettings) -> None:
        # one replica, no peering: peering is not leader election (the chart runs 1 replica, Recreate)
        settings.peering.standalone = True
        settings.peering.mandatory = False
        # keep kopf's bookkeeping out of annotations (size limits, noisy diffs): a small stanza in status
        settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
        settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
            field="status.kopf.last-handled-configuration"
        )
        settings.persistence.finalizer = "diffdisagg.io/kopf-finalizer"  # unused: no deletion handlers
        settings.watching.server_timeout = int(self.watch_server_timeout)
        settings.watching.client_timeout = self.watch_client_timeout
        settings.watching.connect_timeout = 10
        settings.networking.request_timeout = self.request_timeout
        settings.posting.level = logging.INFO
        settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
        if self.namespaces:
            # named namespaces only: no cluster-wide scans of namespaces and CRDs, so the chart's
            # namespaced Role suffices (kopf would otherwise retry forbidden lists for minutes)
            settings.scanning.disabled = True


def from_args(argv: list[str] | None = None) -> tuple[OperatorConfig, bool]:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="diffdisagg-operator", description="Reconcile DiffusionDisaggDeployments."
    )
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="namespace to watch (repeatable); default: $DIFFDISAGG_OPERATOR_NAMESPACES or all",
    )
    p.add_argument(
        "--liveness-port", type=int, default=int(env.get("DIFFDISAGG_OPERATOR_LIVENESS_PORT", "8080"))
    )
    p.add_argument("--liveness-host", default=env.get("DIFFDISAGG_OPERATOR_LIVENESS_HOST", "0.0.0.0"))
    p.add_argument(
        "--resync-seconds", type=float, default=float(env.get("DIFFDISAGG_OPERATOR_RESYNC_SECONDS", "60"))
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    ns = a.namespace or [x for x in env.get("DIFFDISAGG_OPERATOR_NAMESPACES", "").split(",") if x]
    return OperatorConfig(
        namespaces=tuple(ns),
        liveness_host=a.liveness_host,
        liveness_port=a.liveness_port,
        resync_seconds=a.resync_seconds,
    ), bool(a.verbose)
