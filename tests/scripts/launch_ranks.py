"""Start N ranks of a command the way ``srun`` does, and exit with the highest exit code of them.

``python launch_ranks.py N COMMAND...``: each rank gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and a
free ``MASTER_ADDR``/``MASTER_PORT`` (what ``init_process_group("gloo")`` reads). Unlike ``torchrun``,
whose agent turns any failing worker into exit code 1, the requeue code 144 reaches the supervisor.
This process only waits: a preemption signal sent to the whole process tree is left to the ranks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def main() -> int:
    ranks, command = int(sys.argv[1]), sys.argv[2:]
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)  # a handler, not SIG_IGN: the ranks must not inherit "ignore"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command, env=env))
    codes = []
    for proc in procs:
        while True:
            try:
                codes.append(proc.wait())
                break
            except InterruptedError:
                continue
    return max(codes, key=lambda c: (c != 0, abs(c)))


if __name__ == "__main__":
    sys.exit(main())
