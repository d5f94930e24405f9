"""Telling the causes of a stop apart (issue 19): the rules on the controller's answers, and Ctrl-C to ``preemptible run``.

The rules are checked on ``squeue`` lines as the controller prints them (measured on slurm 22.05); the
real-cluster tests (tests/slurm/test_stop_causes_slurm.py) show each of them on a real job. The local
test runs the real ``preemptible run`` around a real 2-rank DDP training and sends the supervisor SIGINT,
as a terminal's Ctrl-C does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PYTHON

from preemptible.core.cause import (
    Action,
    SlurmJobState,
    classify_local,
    classify_slurm,
    decide,
    parse_slurm_duration,
)
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import CANCELLED_EXIT_CODE
from preemptible.core.rundir import read_progress
from preemptible.core.schema import Event, StopCauseName, read_events
from preemptible.core.store import CheckpointStore

CLI = [sys.executable, "-m", "preemptible.cli"]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text``, as lists of stripped cells."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.lstrip().startswith("│")]


def state(line: str) -> SlurmJobState:
    return SlurmJobState.parse(line)


@pytest.mark.parametrize(("line", "base", "cause", "action"), [
    # scancel: COMPLETING at once, the restart count unchanged (CANCELLED shows only once the processes are gone)
    ("COMPLETING|0|N/A|None|5:00|", 0, StopCauseName.CANCELLED, Action.END),
    ("CANCELLED|2|N/A|None|5:00|", 2, StopCauseName.CANCELLED, Action.END),
    # preemption: the --signal (preempt_send_user_signal) or the first SIGTERM (without it): still RUNNING, PreemptTime set
    ("RUNNING|0|2026-12-01T12:00:00|None|UNLIMITED|", 0, StopCauseName.PREEMPTED, Action.REQUEUE),
    # the end of a preemption's grace time: SLURM requeued it already
    ("COMPLETING|1|2026-12-01T12:00:00|None|UNLIMITED|", 0, StopCauseName.PREEMPTED, Action.ALREADY_REQUEUED),
    # an operator's scontrol requeue
    ("PENDING|1|N/A|BeginTime|UNLIMITED|", 0, StopCauseName.REQUEUED_BY_OPERATOR, Action.ALREADY_REQUEUED),
    ("COMPLETING|3|N/A|None|9:00|", 2, StopCauseName.REQUEUED_BY_OPERATOR, Action.ALREADY_REQUEUED),
    # the time-limit warning (--signal=USR1@60 comes 60-120 s before the end), and the limit itself
    ("RUNNING|0|N/A|None|1:31|", 0, StopCauseName.TIME_LIMIT, Action.REQUEUE),
    ("COMPLETING|0|N/A|TimeLimit|0:00|", 0, StopCauseName.TIME_LIMIT, Action.REQUEUE),
    # scancel --signal=USR1: the job runs on, far from its limit
    ("RUNNING|0|N/A|None|1-02:00:00|", 0, StopCauseName.REQUESTED, Action.REQUEUE),
    ("RUNNING|0|N/A|None|UNLIMITED|", 0, StopCauseName.REQUESTED, Action.REQUEUE),
    ("SUSPENDED|0|N/A|None|UNLIMITED|", 0, StopCauseName.UNKNOWN, Action.REQUEUE),
])
def test_slurm_rules(line: str, base: int, cause: str, action: str) -> None:
    verdict = classify_slurm(state(line), base, signal_lead=60)
    assert (verdict.cause, verdict.action) == (cause, action), verdict
    assert verdict.requeue == (action != Action.END)


def test_no_answer_requeues_and_says_why() -> None:
    verdict = classify_slurm(None, 0, error="squeue did not answer within 5 s")
    assert (verdict.cause, verdict.action) == (StopCauseName.UNKNOWN, Action.REQUEUE)
    assert "did not answer within 5 s" in verdict.detail


def test_squeue_lines_and_durations() -> None:
    s = state("COMPLETING          |0|N/A|None|5:00|")
    assert (s.state, s.restart_count, s.preempt_time, s.time_left_seconds) == ("COMPLETING", 0, None, 300.0)
    assert parse_slurm_duration("1-02:03:04") == 93784.0 and parse_slurm_duration("UNLIMITED") is None
    with pytest.raises(ValueError, match="unexpected squeue answer"):
        SlurmJobState.parse("slurm_load_jobs error: Invalid job id specified")


def test_decide_by_the_stop_reason_and_the_environment() -> None:
    local = JobEnvironment.from_env({})
    assert (decide(local, "SIGINT").cause, decide(local, "SIGINT").action) == (StopCauseName.CANCELLED, Action.END)
    assert (decide(local, "deadline").cause, decide(local, "deadline").action) == (StopCauseName.TIME_LIMIT,
                                                                                   Action.REQUEUE)
    assert decide(local, "SIGUSR1").cause == StopCauseName.REQUESTED
    # a job the controller does not know (or no controller, or no squeue): requeue, the safe side, saying why
    unknown = decide(JobEnvironment.from_env({"SLURM_JOB_ID": "999999999"}), "SIGTERM", timeout=5)
    assert (unknown.cause, unknown.action) == (StopCauseName.UNKNOWN, Action.REQUEUE), unknown
    assert "did not answer" in unknown.detail


def test_local_stop_request(tmp_path: Path) -> None:
    note = tmp_path / "stop-request.json"
    assert classify_local(str(note)).action == Action.REQUEUE  # no note: a stop signal to relaunch after
    note.write_text(json.dumps({"cause": "cancelled", "signal": "SIGINT"}))
    verdict = classify_local(str(note))
    assert (verdict.cause, verdict.action) == (StopCauseName.CANCELLED, Action.END) and "SIGINT" in verdict.detail
    # the entry point for code outside the training process (a batch shell, a supervisor)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    asked = [sys.executable, "-m", "preemptible.scheduler.stopcause", "is-cancelled"]
    yes = subprocess.run(asked, env={**env, "PREEMPTIBLE_STOP_REQUEST": str(note)}, capture_output=True, text=True,
                         timeout=60)
    no = subprocess.run(asked, env=env, capture_output=True, text=True, timeout=60)
    assert (yes.returncode, no.returncode) == (0, 1), (yes, no)
    assert yes.stdout.startswith("cancelled:") and no.stdout.startswith("requested:")


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ctrl_c_to_preemptible_run_checkpoints_and_does_not_relaunch(tmp_path: Path) -> None:
    """SIGINT to ``preemptible run`` (a terminal's Ctrl-C): both ranks checkpoint, exit 143, no second attempt;
    ``status`` says cancelled; running the same command again resumes from the checkpoint and finishes."""
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    train = [PYTHON, "-m", "preemptible.examples.train", "--max-steps", "30", "--devices", "2", "--record", str(record)]
    env = {k: v for k, v in os.environ.items() if k not in ("PREEMPTIBLE_RUN_DIR", "SLURM_JOB_ID")}
    env["COLUMNS"] = "200"
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([*CLI, "run", "--run-dir", str(run_dir), "--", *train, "--step-sleep", "0.3"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while (read_progress(run_dir) or {}).get("step", -1) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert code == CANCELLED_EXIT_CODE, out[-4000:]
    assert "got SIGINT: asking the run to checkpoint and stop" in out and "stopped by SIGINT: not relaunching" in out
    assert "attempt 1" not in out, out[-4000:]
    assert [row[-1] for row in table_rows(out)] == [StopCauseName.CANCELLED], out[-3000:]  # the summary's cause

    events = list(read_events(run_dir))
    stops = [e["step"] for e in events if e["event"] == Event.STOP_AGREED]
    assert len(stops) == 1 and 3 <= stops[0] < 30, stops
    causes = [(e["cause"], e["action"]) for e in events if e["event"] == Event.STOP_CAUSE]
    assert causes == [(StopCauseName.CANCELLED, Action.END)], causes
    assert sorted((e["rank"], e["code"]) for e in events if e["event"] == Event.EXIT) == [
        (0, CANCELLED_EXIT_CODE), (1, CANCELLED_EXIT_CODE)]
    assert not [e for e in events if e["event"] == Event.REQUEUE], "a cancelled run asks for no requeue"
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(quarantine=False)
    assert latest is not None and latest.record.step == stops[0], latest

    status = subprocess.run([*CLI, "status", "--json", str(run_dir)], env=env, capture_output=True, text=True,
                            timeout=60)
    info = json.loads(status.stdout)
    assert info["state"] == "cancelled" and info["requeues"] in (0, None), info
    assert info["attempts"][0]["stop_cause"] == StopCauseName.CANCELLED and info["preemptions"] == 0, info

    # a deliberate restart resumes from the kept checkpoint
    again = subprocess.run([*CLI, "run", "--run-dir", str(run_dir), "--", *train], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    events = list(read_events(run_dir))
    assert [e["step"] for e in events if e["event"] == Event.TRAIN_START] == [0, stops[0]]
    assert [e["step"] for e in events if e["event"] == Event.FINISH] == [30]
