"""submitit integration on a real submitit LocalExecutor (issue: submitit).

The training function is preemptible's example (``train_from_options``), wrapped in
``PreemptibleTask``. Signals are real: submitit's own timeout signal (SIGUSR2 at
``timeout - signal_delay_s``), or a signal sent to the task process(es) by pid.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import submitit
from helpers import assert_same_as_reference

from preemptible.core.journal import read_events
from preemptible.core.rundir import read_progress
from preemptible.scheduler.submitit import PreemptibleTask
from preemptible.examples.train import train_from_options

STEPS = 30


def _task(tmp_path: Path, devices: int, steps: int = STEPS, **extra) -> tuple[PreemptibleTask, Path]:
    record = tmp_path / "record.jsonl"
    options = dict(max_steps=steps, devices=devices, record=str(record), step_sleep=0.25, slow_until_resumed=True, **extra)
    return PreemptibleTask(train_from_options, run_dir=tmp_path / "run", **options), record


def _tasks_of(job: submitit.local.local.LocalJob) -> list[psutil.Process]:
    controller = psutil.Process(job._process.pid)
    return [p for p in controller.children(recursive=False)]


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
    stops = [e["step"] for e in events if e["event"] == "stop_agreed"]
    resumes = [e["step"] for e in events if e["event"] == "train_start"][1:]
    assert stops and resumes == stops, f"resumed at {resumes}, stopped at {stops}"
    requeues = [e for e in events if e["event"] == "requeue"]
    assert len(requeues) == len(stops), "exactly one requeue per preemption (rank 0 only)"
    exits = [e for e in events if e["event"] == "exit"]
    assert len(exits) == devices * len(stops), "every rank stopped"
    return events


@pytest.mark.parametrize("devices", [pytest.param(1, id="1task"), pytest.param(2, id="2tasks", marks=pytest.mark.ddp)])
def test_signal_to_task_pid(tmp_path: Path, devices: int, reference_run) -> None:
    task, record = _task(tmp_path, devices)
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=10, tasks_per_node=devices)
    job = executor.submit(task)
    _wait_for_step(tmp_path / "run", 8)
    tasks = _tasks_of(job)
    assert len(tasks) == devices
    tasks[-1].send_signal(signal.SIGUSR2)  # submitit's preemption signal, to one task only
    results = job.results()  # one result per task
    assert len(results) == devices and {r["global_step"] for r in results} == {STEPS}
    events = _check_resumed(tmp_path / "run", devices)
    assert not any(e["event"] == "signal" and e["rank"] != devices - 1 for e in events), "only the signalled rank saw it"
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=devices))


def test_simulated_timeout_is_checkpointed_and_relaunched(tmp_path: Path, reference_run) -> None:
    steps = 120  # 30 s at 0.25 s a step: still training when the signal comes 15 s after the start
    task, record = _task(tmp_path, 1, steps=steps)
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    # submitit's LocalExecutor sends SIGUSR2 at timeout - signal_delay_s (here 15 s after start) and
    # relaunches a task that exits with 144; the relaunch runs at full speed and finishes well in time.
    executor.update_parameters(timeout_min=1, signal_delay_s=45)
    job = executor.submit(task)
    result = job.result()
    assert result["global_step"] == steps
    events = _check_resumed(tmp_path / "run", 1)
    assert [e["signal"] for e in events if e["event"] == "signal"] == ["SIGUSR2"]
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert "Bypassing" not in log, "submitit's SIGTERM bypass handler never fired during fit"
    assert_same_as_reference(record, reference_run(max_steps=steps, devices=1))
