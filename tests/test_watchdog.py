"""No hang after a crash (issue 15, point 2): a rank killed or frozen without warning makes every other rank leave.

Real 2-process gloo DDP runs; the faults are real signals a rank sends itself at the step asked for
(``PREEMPTIBLE_INJECT``: SIGKILL as the OOM killer would, SIGSTOP as a hung process). The watchdog's
bound is set small (``PREEMPTIBLE_PEER_TIMEOUT=2``: every rank gone within 4/3 of it after the last
heartbeat); without it the survivors would wait in the collective for gloo's 30-minute timeout, far
past each test's bounded wait. The exit code of a survivor is ``CRASH_EXIT_CODE``; a frozen rank is
killed by the survivor that found it (same host), so no stopped process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_exit_codes import finish, launch_ranks

from preemptible.core.exit import CRASH_EXIT_CODE
from preemptible.core.schema import Event, read_events

FAST = {"PREEMPTIBLE_PEER_TIMEOUT": "2", "OMP_NUM_THREADS": "1"}
KILLED = -signal.SIGKILL


def _peer_lost(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == Event.PEER_LOST]


@pytest.mark.ddp
def test_a_killed_or_frozen_rank_makes_the_other_leave_with_the_crash_code(tmp_path: Path) -> None:
    """Rank 1 SIGKILLed, rank 1 SIGSTOPped, rank 0 SIGSTOPped, rank 0 SIGKILLed: four 2-rank runs at once."""
    cases = {"kill1": ("kill:3:1", [CRASH_EXIT_CODE, KILLED], 1, "died"),
             "freeze1": ("freeze:3:1", [CRASH_EXIT_CODE, KILLED], 1, "silent"),
             "freeze0": ("freeze:3:0", [KILLED, CRASH_EXIT_CODE], 0, "silent"),
             "kill0": ("kill:3:0", [KILLED, CRASH_EXIT_CODE], 0, "died")}
    launched = {name: launch_ranks(tmp_path / name, "finish", steps=100_000, sleep=0.01,
                                   env={**FAST, "PREEMPTIBLE_INJECT": inject})
                for name, (inject, *_rest) in cases.items()}
    for name, procs in launched.items():
        _, want_codes, lost_rank, how = cases[name]
        codes, outputs = finish(procs, timeout=120)  # the collective timeout would be 30 minutes
        shown = f"{name}: " + "\n".join(f"--- rank {r} (exit {c})\n{o[-1500:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
        assert codes == want_codes, shown
        lost = _peer_lost(tmp_path / name)
        survivor = 1 - lost_rank
        got = [(e["rank"], e["lost_rank"], e["how"], e["code"]) for e in lost]
        assert got == [(survivor, lost_rank, how, CRASH_EXIT_CODE)], shown
        assert lost[0]["step"] >= 2, "the survivor trained until the fault"
        injected = [e for e in read_events(tmp_path / name) if e["event"] == Event.FAULT_INJECTED]
        assert [(e["rank"], e["step"]) for e in injected] == [(lost_rank, 3)], "the fault landed at the step asked for"


@pytest.mark.ddp
def test_under_lightnings_launcher_a_lost_child_ends_the_whole_run(tmp_path: Path) -> None:
    """The example under Lightning's own DDP launcher (rank 1 is rank 0's child): rank 1 SIGKILLed, then SIGSTOPped.

    The parent leaves with the crash code (not killed by Lightning's child observer), and no rank
    process remains: the frozen child is killed and reaped.
    """
    procs = {}
    for name, inject in [("kill", "kill:4:1"), ("freeze", "freeze:4:1")]:
        env = {**os.environ, **FAST, "PREEMPTIBLE_INJECT": inject}
        procs[name] = subprocess.Popen([sys.executable, "-m", "preemptible.examples.train", "--run-dir", str(tmp_path / name),
                                        "--max-steps", "100000", "--devices", "2", "--step-sleep", "0.01"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        (code,), (out,) = finish([proc], timeout=180)
        assert code == CRASH_EXIT_CODE, f"{name}: exit {code}\n{out[-3000:]}"
        lost = _peer_lost(tmp_path / name)
        assert [(e["rank"], e["lost_rank"]) for e in lost] == [(0, 1)], out[-3000:]
        child = json.loads((tmp_path / name / "watchdog" / "rank-1.json").read_text())
        assert not psutil.pid_exists(child["pid"]) or psutil.Process(child["pid"]).create_time() != child["create_time"], \
            f"{name}: rank 1 (pid {child['pid']}) is still there"
