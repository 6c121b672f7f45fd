"""What the GPU benchmarks' worker processes share: their event line to the driver, and their ends of
the hand-over (pinned staging buffer, transfer manager, receiver and/or sender over one backend).

Used by ``e2e_worker.py`` (single-GPU end-to-end) and ``pool_worker.py`` (multi-GPU pools).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

TOKEN = b"bench-gpu-workers-token-0123456789abcdef"

_out_lock = threading.Lock()


def emit(**obj: Any) -> None:
    """One ``@@ {json}`` event line on stdout (anything else a library prints is ignored by the driver);
    stamped with the wall clock unless the caller gave ``t``."""
    obj.setdefault("t", time.time())
    with _out_lock:
        sys.stdout.write("@@ " + json.dumps(obj) + "\n")
        sys.stdout.flush()


@dataclass
class HandoverEnds:
    buffer: Any
    manager: Any
    receiver: Any  # HandoverReceiver (started) or None
    sender: Any  # HandoverSender or None


def open_ends(
    plat: Any,
    nbytes: int,
    name: str,
    revision: str,
    *,
    receive: bool,
    send: bool,
    backend: str = "tcp",
    rpc_ports: tuple[int, int] | None = None,
) -> HandoverEnds:
    """A pinned staging buffer of ``nbytes`` registered with a ``backend`` (tcp, or mooncake over its
    TCP transport on ``rpc_ports``), its TransferManager, and a started receiver and/or a sender."""
    from diffdisagg.transport.backends import make_backend
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.handover import (
        HandoverReceiver,
        HandoverSender,
        ReceiverConfig,
        SenderConfig,
        register_buffer,
    )
    from diffdisagg.transport.manager import TransferManager

    buffer = StagingBuffer(nbytes, plat)
    if backend == "mooncake":
        assert rpc_ports is not None, "mooncake needs its RPC port range"
        be = make_backend(
            "mooncake", host="127.0.0.1", protocol="tcp", rpc_port_min=rpc_ports[0], rpc_port_max=rpc_ports[1]
        )
    else:
        be = make_backend("tcp", token=TOKEN, host="127.0.0.1", port=0)
    register_buffer(be, buffer)
    manager = TransferManager(plat, buffer, local_rank=0)
    receiver = (
        HandoverReceiver(buffer, be, ReceiverConfig(TOKEN, revision, name=name), manager).start()
        if receive
        else None
    )
    sender = HandoverSender(be, SenderConfig(TOKEN, revision, name=name)) if send else None
    return HandoverEnds(buffer, manager, receiver, sender)
