"""Which processes of an ``srun torchrun`` step receive a job signal, and from whom (README: torchrun inside SLURM).

Run as torchrun's training script; each rank blocks SIGUSR1, SIGUSR2 and SIGTERM and logs every one it
receives, with the sender's pid and command line (``sigtimedwait``'s ``si_pid``), to a JSON-lines file::

    srun torchrun --standalone --nproc-per-node 2 benchmarks/torchrun_signal_probe.py probe.jsonl 25
    # from another shell: scancel --signal=USR1 JOBID.0, later scancel --signal=TERM JOBID.0

A sender named ``slurmstepd: [JOB.STEP]`` means SLURM reached the rank directly; the agent's command
line means torchrun passed the signal on; ``ppid`` 1 in the last line means the agent died first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import psutil

WATCHED = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}


def command_of(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:100]
    except psutil.Error as exc:
        return f"? ({exc})"


def main(out: str, seconds: float) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)

    def log(**fields: Any) -> None:
        with open(out, "a") as f:
            f.write(json.dumps({"rank": os.environ.get("RANK"), "pid": os.getpid(), "ppid": os.getppid(),
                                "time": time.time(), **fields}) + "\n")

    log(event="ready", agent=command_of(os.getppid()),
        env={k: v for k, v in os.environ.items() if k.startswith("TORCHELASTIC")})
    end = time.time() + seconds
    while time.time() < end:
        info = signal.sigtimedwait(WATCHED, 0.5)
        if info is not None:
            log(event="signal", signal=signal.Signals(info.si_signo).name, sender_pid=info.si_pid,
                sender=command_of(info.si_pid))
    log(event="done")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 60.0)
