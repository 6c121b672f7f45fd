"""Entry point: `python -m diffdisagg.operator [-n NAMESPACE]... [--liveness-port N]`.

Builds the OperatorConfig, registers the handlers into a fresh kopf registry and runs kopf standalone
(no peering: one replica, see config.apply_to) with the liveness endpoint at /healthz.
"""

from __future__ import annotations

import logging
import sys

import kopf

from diffdisagg.operator import handlers
from diffdisagg.operator.config import from_args
from diffdisagg.operator.reconcile import OperatorContext


def main(argv: list[str] | None = None) -> int:
    config, verbose = from_args(argv)
    kopf.configure(verbose=verbose)
    for noisy in ("httpx", "httpx2"):  # lightkube's HTTP client logs every request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=config.liveness_endpoint,
        memo=kopf.Memo(ctx=OperatorContext(config=config)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
