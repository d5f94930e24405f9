"""The crash-without-warning campaign of ``make faults`` (issue 15): a rank of a 2-rank DDP run SIGKILLed or frozen.

Each trial: the example training under Lightning's own launcher (rank 1 is rank 0's child), a real
fault at a random step (``PREEMPTIBLE_INJECT``: SIGKILL as the OOM killer, SIGSTOP as a hung rank) on
rank 0 or rank 1, the peer watchdog's bound set to ``PEER_TIMEOUT`` s. Counted: a hang (a rank process
of the job still there ``LIMIT`` s after the fault, far below gloo's 30-minute timeout), the job's exit
code (145, the crash code, when rank 0 survives; death by SIGKILL when rank 0 is the one killed, which a
supervisor reads as a crash too), and the seconds from the fault to the last rank's end.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

from preemptible.core.exit import CRASH_EXIT_CODE
from preemptible.core.schema import Event, read_events
from preemptible.tools.faults.harness import Tally

PEER_TIMEOUT = 2.0
LIMIT = 180.0


def peer_crash_trials(workdir: Path, trials: int, seed: int = 15) -> Tally:
    tally = Tally(f"rank 0 or 1 of a 2-rank DDP run SIGKILLed or frozen (SIGSTOP) at a random step; "
                  f"peer_timeout {PEER_TIMEOUT:.0f} s")
    rng = random.Random(seed)
    started = time.monotonic()
    for i in range(trials):
        action, rank, step = ("kill", "freeze")[i % 2], (1, 0)[(i // 2) % 2], rng.randint(3, 12)
        if action == "freeze" and rank == 0:
            rank = 1  # a frozen parent stops Lightning's launcher itself; the child kills it (tests/test_watchdog.py)
        run_dir = workdir / f"trial-{i}"
        env = {**os.environ, "PREEMPTIBLE_INJECT": f"{action}:{step}:{rank}", "PREEMPTIBLE_PEER_TIMEOUT": str(PEER_TIMEOUT),
               "OMP_NUM_THREADS": "1"}
        with open(workdir / f"trial-{i}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "preemptible.examples.train", "--run-dir", str(run_dir),
                                     "--max-steps", "100000", "--devices", "2", "--step-sleep", "0.01"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=LIMIT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                tally.trials += 1
                tally.hang += 1
                continue
        # The job has ended when its last rank has: a child rank orphaned by a killed parent leaves by its own watchdog.
        left = [p for p in psutil.process_iter() if _in_session(p, proc.pid)]
        _, alive = psutil.wait_procs(left, timeout=LIMIT)
        ended = time.time()
        tally.trials += 1
        if alive:
            tally.hang += 1
            for p in alive:
                p.kill()
        events = list(read_events(run_dir))
        injected = [e for e in events if e["event"] == Event.FAULT_INJECTED]
        tally.injected += bool(injected)
        expected = CRASH_EXIT_CODE if rank == 1 else -9
        tally.moments[f"{action} rank {rank}: exit {code}"] += 1
        if code != expected:
            tally.problem(f"trial {i} ({action} rank {rank} at step {step}): exit {code}, expected {expected}")
        if injected:
            tally.stats["seconds"] += int(1000 * (ended - float(injected[0]["time"])))
            tally.stats["max_ms"] = max(tally.stats["max_ms"], int(1000 * (ended - float(injected[0]["time"]))))
    tally.seconds = time.monotonic() - started
    if tally.injected:
        tally.notes.append(f"fault → job ended: mean {tally.stats['seconds'] / tally.injected / 1000:.1f} s, "
                           f"max {tally.stats['max_ms'] / 1000:.1f} s (bound: 4/3 × {PEER_TIMEOUT:.0f} s after the last "
                           "heartbeat, plus the exit)")
    return tally


def _in_session(p: psutil.Process, sid: int) -> bool:
    try:
        return os.getsid(p.pid) == sid
    except OSError:
        return False


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    with tempfile.TemporaryDirectory(prefix="preemptible-peers-") as d:
        t = peer_crash_trials(Path(d), n)
    print(json.dumps({"fault": t.fault, "trials": t.trials, "injected": t.injected, "hang": t.hang,
                      "moments": dict(t.moments), "problems": t.problems, "notes": t.notes,
                      "seconds": round(t.seconds)}, indent=1))
