"""No hang after a crash (issue 15, point 2): a rank killed or frozen without warning makes every other rank leave.

Real 2-process gloo DDP runs; the faults are real signals a rank sends itself at the step asked for
(``PREEMPTIBLE_INJECT``: SIGKILL as the OOM killer would, SIGSTOP as a hung process). The watchdog's
bound is set small (``PREEMPTIBLE_PEER_TIMEOUT=2``: every rank gone within 4/3 of it after the last
heartbeat); without it the survivors would wait in the collective for gloo's 30-minute timeout, far
past each test's bounded wait. The exit code of a survivor is ``CRASH_EXIT_CODE``; a frozen rank is
killed by the survivor that found it (same host), so no stopped process is left behind; one on another host (told
apart by SLURM node name) makes the rank that judged it end the SLURM step, once the others have left (tested here
with three watchdog processes and a stand-in for scancel, on the real cluster in tests/slurm/test_crash_slurm.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_exit_codes import finish, launch_ranks

from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import CRASH_EXIT_CODE
from preemptible.core.schema import Event, read_events
from preemptible.core.watchdog import LossKind, PeerState, step_end_bound

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


# A rank of its own, for the host test below: a real process whose watchdog beats as HOST (in the SLURM step STEP,
# or none); on a verdict it prints it and ends with the verdict's code (os._exit, as a training process does).
_RANK = """
import json, sys, time
from pathlib import Path
from preemptible.core.watchdog import PeerWatchdog
directory, rank, world, host, timeout, step, scancel = sys.argv[1:8]
def on_loss(loss):
    print(json.dumps({"lost": loss.rank, "how": loss.how, "relayed": loss.relayed}), flush=True)
PeerWatchdog(Path(directory), int(rank), int(world), "tok", float(timeout), on_loss, host=host,
             slurm_step=None if step == "-" else step, scancel=scancel).start()
time.sleep(120)
"""


def _fake_scancel(base: Path) -> tuple[Path, Path]:
    """A stand-in for SLURM's scancel (the real one ends the step in tests/slurm/test_crash_slurm.py): it notes its
    arguments and what the other surviving rank (rank 2) had said in its heartbeat file at that moment."""
    record, script = base / "scancel-called.txt", base / "scancel"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {record}.tmp\ncat {base}/watchdog/rank-2.json >> {record}.tmp\n"
                      f"mv {record}.tmp {record}\n")
    script.chmod(0o755)
    return script, record


def test_a_silent_peer_on_another_host_ends_the_slurm_step_after_the_others_left(tmp_path: Path) -> None:
    """Three 3-rank worlds at once, each rank a real process; rank 0 on host ``node-a``, rank 1 on ``node-b``
    SIGSTOPped (frozen).

    * ``other``: rank 2 on ``node-c``. Nobody can kill rank 1: rank 0 waits until rank 2 has left (journaled and
      said ``left``), then ends the step, ``scancel --ctld --signal=KILL 77.0``; rank 2 does not (it only followed rank 0).
    * ``shared``: rank 2 on ``node-b`` with rank 1: rank 2 kills it (it is on its host), so rank 0 ends nothing.
    * ``nostep``: as ``other``, but rank 0 is in no SLURM step: it ends nothing and says who must.
    Each survivor leaves with the crash code, within the bound.
    """
    timeout = 3.0

    def start(base: Path, rank: int, host: str, step: str, scancel: Path) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", _RANK, str(base / "watchdog"), str(rank), "3", host, str(timeout),
                                 step, str(scancel)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    worlds: dict[str, dict] = {}
    for name, rank2_host, step in [("other", "node-c", "77.0"), ("shared", "node-b", "77.0"), ("nostep", "node-c", "-")]:
        base = tmp_path / name
        (base / "watchdog").mkdir(parents=True)
        scancel, record = _fake_scancel(base)
        ranks = {rank: start(base, rank, host, "77.0", scancel) for rank, host in [(1, "node-b"), (2, rank2_host)]}
        worlds[name] = {"base": base, "record": record, "ranks": ranks, "step": step, "scancel": scancel}
    try:
        for world in worlds.values():  # both peers beat before rank 0 starts its clock on them
            for rank in (1, 2):
                path = world["base"] / "watchdog" / f"rank-{rank}.json"
                deadline = time.monotonic() + 60
                while not (path.exists() and json.loads(path.read_text())["beat"] >= 1):
                    assert time.monotonic() < deadline, f"rank {rank} never beat"
                    time.sleep(0.05)
            world["ranks"][1].send_signal(signal.SIGSTOP)
            world["ranks"][0] = start(world["base"], 0, "node-a", world["step"], world["scancel"])
        for name, world in worlds.items():
            (code0, code2), (out0, out2) = finish([world["ranks"][0], world["ranks"][2]], timeout=step_end_bound(timeout) + 60)
            shown = f"{name}:\n--- rank 0 (exit {code0})\n{out0}\n--- rank 2 (exit {code2})\n{out2}"
            assert (code0, code2) == (CRASH_EXIT_CODE, CRASH_EXIT_CODE), shown
            assert json.loads(out0.splitlines()[0]) == {"lost": 1, "how": LossKind.SILENT, "relayed": False}, shown
            assert json.loads(out2.splitlines()[0]) == {"lost": 1, "how": LossKind.SILENT, "relayed": True}, shown
            left0 = json.loads((world["base"] / "watchdog" / "rank-0.json").read_text())["left"]
            if name == "other":
                called, rank2_then = world["record"].read_text().split("\n", 1)
                assert called == "--ctld --signal=KILL 77.0", called
                assert json.loads(rank2_then)["state"] == PeerState.LEFT, "the step was ended before rank 2 had left"
                assert left0 == {"lost_rank": 1, "killed": False, "ending_step": "77.0"}, left0
                assert "is silent on another host: ending SLURM step 77.0" in out0, shown
                assert world["ranks"][1].poll() is None, "rank 1 is on another host: nothing here may kill it"
            else:
                assert not world["record"].exists(), f"{name}: the step was ended, though it need not be\n{shown}"
                assert left0 == {"lost_rank": 1, "killed": False, "ending_step": None}, left0
            if name == "shared":
                assert "was killed by a rank on its host" in out0, shown
                assert finish([world["ranks"][1]], timeout=30)[0] == [KILLED], "rank 2 should have killed rank 1"
            if name == "nostep":
                assert "no SLURM job step, so nothing here can end it" in out0, shown
    finally:
        for world in worlds.values():
            for proc in world["ranks"].values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)


def test_host_identity_tells_slurm_nodes_apart_and_only_a_real_step_is_named() -> None:
    """Two SLURM nodes may share a host name (our test cluster, containers): the node name is part of the identity;
    the batch shell and SLURM's special steps (batch, extern, interactive) are never named as a step to end."""
    def env(**values: str) -> JobEnvironment:
        return JobEnvironment.from_env(values)

    assert env(SLURM_JOB_ID="7", SLURMD_NODENAME="n2").host_identity.endswith("/n2")
    assert env(SLURM_JOB_ID="7", SLURMD_NODENAME="n1").host_identity != env(SLURMD_NODENAME="n2").host_identity
    assert env().host_identity == env().host and "/" not in env().host_identity
    assert env(SLURM_JOB_ID="7", SLURM_STEP_ID="0").slurm_step == "7.0"
    for step in ("", "batch", "extern", str(0xFFFFFFFA), str(0xFFFFFFFE)):
        assert env(SLURM_JOB_ID="7", SLURM_STEP_ID=step).slurm_step is None, step
    assert env(SLURM_STEP_ID="0").slurm_step is None  # no job id: not a SLURM job
