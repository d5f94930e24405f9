"""submitit integration on a real submitit LocalExecutor (issue: submitit).

The training function is preemptible's example (``train_from_options``), wrapped in
``PreemptibleTask``. Signals are real: submitit's own timeout signal (SIGUSR2 at
``timeout - signal_delay_s``), or a signal sent to the task process(es) by pid.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import submitit
from helpers import assert_same_as_reference

from preemptible.core.journal import read_events
from preemptible.core.rundir import read_progress
from preemptible.core.schema import CrashDecision, Event, RunRecordKey, RunStatus
from preemptible.core.supervisor import SUPERVISOR_DIR
from preemptible.examples.train import train_from_options
from preemptible.scheduler.submitit import PreemptibleTask

STEPS = 30


def _task(tmp_path: Path, devices: int, steps: int = STEPS, **extra) -> tuple[PreemptibleTask, Path]:
    record = tmp_path / "record.jsonl"
    options = dict(max_steps=steps, devices=devices, record=str(record), step_sleep=0.25, slow_until_resumed=True, **extra)
    return PreemptibleTask(train_from_options, run_dir=tmp_path / "run", **options), record


#: Seconds a job may take to deliver its results (through its relaunches) before the test fails.
JOB_TIMEOUT = 300


@pytest.fixture
def submit(tmp_path: Path) -> Iterator[Any]:
    """``submit(task, **parameters)``: a LocalExecutor job whose processes are killed after the test.

    Whatever ends the test (a failed assertion, a bounded wait running out, pytest-timeout), no
    controller, task or DataLoader worker outlives it.
    """
    jobs: list[submitit.local.local.LocalJob] = []

    def submit_(task: PreemptibleTask, **parameters: Any) -> submitit.local.local.LocalJob:
        executor = submitit.LocalExecutor(folder=tmp_path / "logs")
        executor.update_parameters(**parameters)
        job = executor.submit(task)
        jobs.append(job)
        return job

    yield submit_
    for job in jobs:
        _kill(job)


def _kill(job: submitit.local.local.LocalJob) -> None:
    process = job._process
    if process is None:
        return
    try:
        controller = psutil.Process(process.pid)
        tree = [controller, *controller.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    if process.poll() is None:
        process.wait(timeout=10)


def _results(job: submitit.local.local.LocalJob, timeout: float = JOB_TIMEOUT) -> list[Any]:
    """``job.results()`` with a bound: the job must be done within ``timeout`` seconds."""
    _wait_done(job, timeout)
    return job.results()


def _wait_done(job: submitit.local.local.LocalJob, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            log = Path(job.paths.stderr)
            tail = log.read_text()[-2000:] if log.exists() else "(no stderr log)"
            raise AssertionError(f"submitit job {job.job_id} not done within {timeout:.0f} s; its stderr ends:\n{tail}")
        time.sleep(0.2)


def _wait_for_event(run_dir: Path, event: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == event]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} event in the run's journal within {timeout:.0f} s")


def _tasks_of(job: submitit.local.local.LocalJob) -> list[psutil.Process]:
    controller = psutil.Process(job._process.pid)
    return list(controller.children(recursive=False))


def _wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = read_progress(run_dir)
        if progress and progress.get("step", -1) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"training never reached step {step} within {timeout} s")


def _check_resumed(run_dir: Path, devices: int) -> list[dict]:
    events = list(read_events(run_dir / "events.jsonl"))
    stops = [e["step"] for e in events if e["event"] == Event.STOP_AGREED]
    resumes = [e["step"] for e in events if e["event"] == Event.TRAIN_START][1:]
    assert stops and resumes == stops, f"resumed at {resumes}, stopped at {stops}"
    requeues = [e for e in events if e["event"] == Event.REQUEUE]
    assert len(requeues) == len(stops), "exactly one requeue per preemption (rank 0 only)"
    exits = [e for e in events if e["event"] == Event.EXIT]
    assert len(exits) == devices * len(stops), "every rank stopped"
    return events


@pytest.mark.parametrize("devices", [pytest.param(1, id="1task"), pytest.param(2, id="2tasks", marks=pytest.mark.ddp)])
def test_signal_to_task_pid(tmp_path: Path, devices: int, reference_run, submit) -> None:
    task, record = _task(tmp_path, devices)
    job = submit(task, timeout_min=10, tasks_per_node=devices)
    _wait_for_step(tmp_path / "run", 8)
    tasks = _tasks_of(job)
    assert len(tasks) == devices
    tasks[-1].send_signal(signal.SIGUSR2)  # submitit's preemption signal, to one task only
    results = _results(job)  # one result per task
    assert len(results) == devices and {r["global_step"] for r in results} == {STEPS}
    events = _check_resumed(tmp_path / "run", devices)
    assert not any(e["event"] == Event.SIGNAL and e["rank"] != devices - 1 for e in events), "only the signalled rank saw it"
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=devices))


def test_simulated_timeout_is_checkpointed_and_relaunched(tmp_path: Path, reference_run, submit) -> None:
    steps = 120
    # submitit's LocalExecutor sends SIGUSR2 at timeout - signal_delay_s (signal_at s after its start) and
    # relaunches a task that exits with 144. The first attempt sleeps 0.25 s a step (30 s of training),
    # so the signal lands during training whatever the start-up took, as long as training started before
    # it: the test waits for that state (the journal's train_start) instead of assuming a start-up time,
    # and says so when the machine was too slow for the timer. The relaunch runs at full speed.
    signal_at = 30
    task, record = _task(tmp_path, 1, steps=steps)
    submitted = time.time()  # the controller's clock starts after this: its signal comes later than submitted + signal_at
    job = submit(task, timeout_min=1, signal_delay_s=60 - signal_at)
    train_start = _wait_for_event(tmp_path / "run", Event.TRAIN_START, timeout=signal_at + 30)
    assert train_start["time"] < submitted + signal_at, (
        f"training started {train_start['time'] - submitted:.1f} s after the submission, after submitit's timeout "
        f"signal ({signal_at} s): the machine is too slow for this test's timer")
    result = _results(job)[0]
    assert result["global_step"] == steps
    events = _check_resumed(tmp_path / "run", 1)
    signals = [e for e in events if e["event"] == Event.SIGNAL]
    assert [e["signal"] for e in signals] == ["SIGUSR2"]
    first_start = next(e for e in events if e["event"] == Event.TRAIN_START)
    first_stop = next(e for e in events if e["event"] == Event.STOP_AGREED)
    received = signals[0].get("received_at") or signals[0]["time"]
    assert first_start["time"] < received and 0 < first_stop["step"] < steps, "the signal landed during training"
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert "Bypassing" not in log, "submitit's SIGTERM bypass handler never fired during fit"
    assert_same_as_reference(record, reference_run(max_steps=steps, devices=1))


def test_fabric_loop_in_a_preemptible_task(tmp_path: Path, submit) -> None:
    """``PreemptibleTask`` runs a Lightning Fabric loop unchanged: SIGUSR2 (submitit's) to the task, checkpoint at an
    agreed step, exit 144, LocalExecutor's relaunch, resume on that step, every loss and the final weights bitwise."""
    from loop_helpers import run_loop

    from preemptible.core.schema import read_trace
    from preemptible.examples import fabric_loop

    _, reference, _ = run_loop(tmp_path, "reference", "fabric", steps=STEPS)
    trace = tmp_path / "fabric.jsonl"
    task = PreemptibleTask(fabric_loop.main, ["--trace", str(trace), "--max-steps", str(STEPS), "--step-sleep", "0.1"],
                           run_dir=tmp_path / "run")
    job = submit(task, timeout_min=10, tasks_per_node=1)
    _wait_for_step(tmp_path / "run", 8)
    _tasks_of(job)[0].send_signal(signal.SIGUSR2)
    assert _results(job) == [0]
    events = _check_resumed(tmp_path / "run", 1)
    assert [e["backend"] for e in events if e["event"] == Event.REQUEUE] == ["submitit"]
    want, got = read_trace(reference), read_trace(trace)
    assert not got.duplicates and got.losses == want.losses and got.final == want.final and set(got.final) == {0}
    assert sorted(key[4] for key in got.entries) == list(range(1, STEPS + 1))
    # (submitit's local relaunch sets no restart count: the task numbers the attempts from the claims the ended
    # attempts leave in the run directory, core/supervisor.py)


@pytest.mark.ddp
def test_crash_relaunched_by_the_task_then_stopped_at_the_crash_limit(tmp_path: Path, submit,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """2 tasks on LocalExecutor, periodic checkpoints every 4 steps, rank 1 SIGKILLed at step 6 and, in the
    relaunched attempt, at step 10, with ``max_crash_requeues=1``. Attempt 0: the survivor's watchdog asks the
    task (the in-process supervisor), which claims the attempt, decides "requeue" and leaves with 144:
    LocalExecutor relaunches both tasks, numbered attempt 1, which resume from the periodic checkpoint. Attempt 1:
    the crash limit is reached: nobody leaves with 144, LocalExecutor stops, and the job has no result."""
    monkeypatch.setenv("PREEMPTIBLE_MAX_CRASH_REQUEUES", "1")
    monkeypatch.setenv("PREEMPTIBLE_PEER_TIMEOUT", "20")  # a lost peer on this host is seen at the next beat anyway
    run_dir = tmp_path / "run"
    task, _ = _task(tmp_path, 2, every_n_steps=4, sync_periodic=True, signal_at=["6", "10"], signal_rank=1,
                    signal_name="KILL")
    job = submit(task, timeout_min=10, tasks_per_node=2)
    _wait_done(job)
    assert not [k for k in range(2) if job.task(k).paths.result_pickle.exists()], \
        "a task delivered a result: the run should have stopped at the crash limit"
    events = list(read_events(run_dir / "events.jsonl"))
    crashes = [e for e in events if e["event"] == Event.CRASH]
    assert [(e["decision"], e["restart_count"]) for e in crashes] == [(CrashDecision.REQUEUE, 0),
                                                                      (CrashDecision.CRASH_LIMIT, 1)], events
    resumed = next(e["step"] for e in events if e["event"] == Event.TRAIN_START and e["restart_count"] == 1)
    assert resumed == crashes[0]["checkpoint_step"] and resumed >= 4, (resumed, crashes)
    claims = sorted(p.name for p in (run_dir / SUPERVISOR_DIR).iterdir())
    assert len(claims) == 2 and claims[0].endswith("-0") and claims[1].endswith("-1"), claims
    log = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*_log.out")))
    assert "crash requeue limit reached (1 of max_crash_requeues=1)" in " ".join(log.split()), log[-3000:]
    assert json.loads((run_dir / "run.json").read_text())[RunRecordKey.STATUS] == RunStatus.CRASH_LIMIT
