"""Checking, at the start of every attempt, that all ranks see the same run directory.

Why: on a multi-node job a run directory on a node-local path (``/tmp``, a local SSD) looks fine on
each node, but rank 0 writes the checkpoints on its own node only: after a requeue onto other nodes
the run starts over, or ranks resume from different states. Found here before any training, with
the fix in the message, instead of after hours.

How: global rank 0 writes a fresh token into ``<run_dir>/shared-check.json`` and broadcasts it; each
rank reads the file through its own view of the run directory; the ranks gather who saw the token.
Local ranks on one node always share their view; the check matters across nodes. The same token
then names this attempt's heartbeats (:mod:`preemptible.core.watchdog`).
"""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

from preemptible.core.agreement import StopAgreement
from preemptible.core.fsutil import atomic_write_json
from preemptible.core.rundir import RunDirError

CHECK_FILE = "shared-check.json"


def check_run_dir_shared(run_path: Path, agreement: StopAgreement, rank: int) -> str:
    """Every rank, at the same point (collectives): raise :class:`RunDirError` on every rank unless all see rank 0's token.

    Returns the attempt's token.
    """
    token = uuid.uuid4().hex if rank == 0 else None
    if rank == 0:
        atomic_write_json(run_path / CHECK_FILE, {"token": token, "host": socket.gethostname()})
    token = agreement.broadcast(token)
    try:
        seen = json.loads((run_path / CHECK_FILE).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        seen = None
    views = agreement.gather((rank, socket.gethostname(), str(run_path.resolve()), seen == token))
    blind = [view for view in views if not view[3]]
    if blind:
        where = ", ".join(f"rank {r} on {host} ({path})" for r, host, path, _ in blind)
        raise RunDirError(
            f"preemptible: the run directory is not shared by all ranks: {where} cannot see what global rank 0 "
            f"wrote into {run_path / CHECK_FILE}. Checkpoints written by rank 0 would be missing elsewhere after a "
            "requeue. Fix: put the run directory on a filesystem every node mounts at the same path (e.g. under "
            "$HOME or a shared scratch, not /tmp or a node-local disk), via run_dir= or PREEMPTIBLE_RUN_DIR.")
    assert isinstance(token, str)
    return token
