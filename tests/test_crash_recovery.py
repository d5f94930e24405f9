"""Crashes without warning under ``preemptible run``: relaunched from the newest periodic checkpoint, bitwise
from there, bounded (crash loop, ``max_crash_requeues``); a bug in the training code is not retried.

The rule (preemptible/core/crashes.py): an attempt that ends with neither 0 nor 144 is a crash unless a
rank journaled an error of the training code before exiting. Real processes, real SIGKILL (the example
sends it to itself at an exact step), real Lightning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_after_crash, example_command

from preemptible.core.crashes import decide, failure_kind
from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import CrashDecision, Event, FailureKind, RunRecordKey, RunStatus, read_events

PYTHON = sys.executable


def preemptible_run(run_dir: Path, command: list[str], *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # progress.json at every step, so that the crash messages name the exact step
    env = {**os.environ, "PREEMPTIBLE_PROGRESS_INTERVAL": "0"}
    return subprocess.run([PYTHON, "-m", "preemptible.cli", "run", "--run-dir", str(run_dir), "--timeout", "240",
                           *extra, "--", *command], capture_output=True, text=True, timeout=timeout, env=env)


def crashes(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == Event.CRASH]


def test_failure_kind_tells_a_dead_peer_from_a_bug() -> None:
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:20404: "
                        "Connection reset by peer.")
    assert failure_kind(gloo) == FailureKind.PEER
    assert failure_kind(ValueError("bad shape")) == FailureKind.USER
    assert failure_kind(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == FailureKind.USER


@pytest.mark.timeout(400)
def test_sigkill_is_relaunched_from_the_periodic_checkpoint_bitwise(tmp_path: Path, reference_run) -> None:
    """SIGKILL at step 6 with a checkpoint at step 4: relaunched, resumed at 4, finished like an uninterrupted run."""
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    command = example_command(record, max_steps=12, every_n_steps=4, sync_periodic=True, signal_at=["6"],
                              signal_name="KILL")
    done = preemptible_run(run_dir, command)
    assert done.returncode == 0, done.stderr[-3000:]
    [crash] = crashes(run_dir)
    assert (crash["decision"], crash["exit_code"], crash["checkpoint_step"]) == (CrashDecision.REQUEUE, 137, 4), crash
    assert crash["step"] >= 4, crash
    starts = [(e["restart_count"], e["step"]) for e in read_events(run_dir) if e["event"] == Event.TRAIN_START]
    assert starts == [(0, 0), (1, 4)], starts
    assert_same_after_crash(record, reference_run(max_steps=12), resumed_at={1: 4})
    record_json = json.loads((run_dir / "run.json").read_text())
    assert record_json[RunRecordKey.CRASH_REQUEUES] == 1 and record_json[RunRecordKey.STATUS] == RunStatus.FINISHED
    assert record_json.get(RunRecordKey.REQUEUES, 0) == 0, "a crash requeue is not a preemption requeue"


@pytest.mark.timeout(400)
def test_crash_loop_stops_with_the_message(tmp_path: Path) -> None:
    """SIGKILL at step 2 in two attempts, before the first checkpoint (every 4 steps): the second crash without
    progress stops the run, in the output, the journal, run.json and ``preemptible status``."""
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    command = example_command(record, max_steps=12, every_n_steps=4, sync_periodic=True, signal_at=["2", "2", "2"],
                              signal_name="KILL")
    done = preemptible_run(run_dir, command)
    assert done.returncode == 137, (done.returncode, done.stderr[-3000:])
    decisions = [e["decision"] for e in crashes(run_dir)]
    assert decisions == [CrashDecision.REQUEUE, CrashDecision.CRASH_LOOP], decisions
    assert "crash loop at step 2" in " ".join(done.stderr.split()), done.stderr[-3000:]
    record_json = json.loads((run_dir / "run.json").read_text())
    assert record_json[RunRecordKey.STATUS] == RunStatus.CRASH_LOOP
    assert record_json[RunRecordKey.LAST_FAILURE].startswith("crash loop at step 2:"), record_json
    status = subprocess.run([PYTHON, "-m", "preemptible.cli", "status", str(run_dir)], capture_output=True, text=True,
                            timeout=60)
    assert "crash loop at step 2" in " ".join(status.stdout.split()), status.stdout


@pytest.mark.timeout(400)
def test_a_bug_in_training_code_fails_at_once(tmp_path: Path) -> None:
    """An exception in the training code is journaled by the process that raised it: no relaunch."""
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    done = preemptible_run(run_dir, example_command(record, max_steps=12, every_n_steps=2, fail_at_step=3))
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    events = list(read_events(run_dir))
    assert [e["restart_count"] for e in events if e["event"] == Event.START] == [0], "relaunched a deterministic bug"
    [failure] = [e for e in events if e["event"] == Event.FAILURE]
    assert failure["kind"] == FailureKind.USER and "a bug in the training code at step 3" in failure["error"], failure
    assert [e["decision"] for e in crashes(run_dir)] == [CrashDecision.FAILED]
    assert json.loads((run_dir / "run.json").read_text())[RunRecordKey.STATUS] == RunStatus.FAILED


def test_crash_requeue_limit_and_decisions_on_a_journal(tmp_path: Path) -> None:
    """The decision on hand-written journals: the limit, a death before the session started, a cancel, exit 0."""
    from preemptible.core.rundir import RunDirectory

    env = JobEnvironment.from_env({"PREEMPTIBLE_ATTEMPT": "0"})
    run = RunDirectory(tmp_path / "run", env=env)
    run.journal.append(Event.START, checkpoint=None, world_size=2, attempt=0, backend="local")
    run.journal.append(Event.CHECKPOINT, path="x", step=4, reason="periodic")
    run.update_record(**{RunRecordKey.MAX_CRASH_REQUEUES: 1, RunRecordKey.CRASH_REQUEUES: 1})
    verdict = decide(run.path, 137, env=env)
    assert (verdict.decision, verdict.requeue) == (CrashDecision.CRASH_LIMIT, False)
    assert "crash requeue limit reached (1 of max_crash_requeues=1)" in verdict.message
    assert decide(run.path, 137, env=env, cancelled=True).decision == CrashDecision.CANCELLED
    assert decide(run.path, 0, env=env).requeue is False
    fresh = JobEnvironment.from_env({"PREEMPTIBLE_ATTEMPT": "5"})
    early = decide(run.path, 1, env=fresh)
    assert early.decision == CrashDecision.FAILED and "before training was set up" in early.message


@pytest.mark.ddp
@pytest.mark.timeout(400)
def test_ddp_rank_killed_is_relaunched_bitwise(tmp_path: Path, reference_run) -> None:
    """2 ranks under Lightning's own launcher, rank 1 SIGKILLed at step 6: rank 0's collective fails (journaled as
    a dead peer, not a bug), the attempt is relaunched from the newest periodic checkpoint and ends bitwise."""
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    command = example_command(record, max_steps=12, devices=2, every_n_steps=4, sync_periodic=True, signal_at=["6"],
                              signal_rank=1, signal_name="KILL")
    done = preemptible_run(run_dir, command)
    assert done.returncode == 0, done.stderr[-3000:]
    [crash] = crashes(run_dir)
    assert crash["decision"] == CrashDecision.REQUEUE and crash["checkpoint_step"] in (4, 5, 6), crash
    peers = [e for e in read_events(run_dir) if e["event"] == Event.FAILURE]
    assert all(e["kind"] == FailureKind.PEER for e in peers), peers
    assert_same_after_crash(record, reference_run(max_steps=12, devices=2), resumed_at={1: crash["checkpoint_step"]})


def test_batch_shell_rules_cancel_and_missing_scontrol() -> None:
    """scancel is told from a requeue by squeue's state; without scontrol the ranks delegate under our templates."""
    from preemptible.core.cause import SlurmJobState, already_requeued, job_being_cancelled
    from preemptible.core.requeue import RequeueError, SlurmRequeue

    def state(line: str) -> SlurmJobState:  # an squeue answer: State|RestartCnt|PreemptTime|Reason|TimeLeft|
        return SlurmJobState.parse(line)

    assert job_being_cancelled(state("CANCELLED|0|None|None|1:00|"), 0)
    assert job_being_cancelled(state("COMPLETING|1|None|None|1:00|"), 1)
    assert not job_being_cancelled(state("COMPLETING|1|None|TimeLimit|0:00|"), 1)
    assert not job_being_cancelled(state("COMPLETING|2|None|None|1:00|"), 1), "a requeue raised the restart count"
    assert not job_being_cancelled(state("RUNNING|0|None|None|1:00|"), 0)
    assert not job_being_cancelled(None, 0)
    assert already_requeued(state("PENDING|1|None|BeginTime|1:00|"), 0)
    assert not already_requeued(state("RUNNING|0|None|None|1:00|"), 0)

    env = {"SLURM_JOB_ID": "77"}
    missing = SlurmRequeue(scontrol="no-such-scontrol-here")
    outcome = missing.request(JobEnvironment.from_env({**env, "PREEMPTIBLE_SHELL_REQUEUES": "1"}))
    assert outcome.delegated and not outcome.requested, outcome
    with pytest.raises(RequeueError, match="is not on PATH"):
        missing.request(JobEnvironment.from_env(env))
