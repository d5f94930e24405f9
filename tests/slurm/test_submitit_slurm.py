"""submitit's AutoExecutor on the real cluster: a 2-task job preempted by a job on ``high`` resumes
on the step it stopped at and returns the training function's result (issue: submitit); one that is
cancelled with ``job.cancel()`` ends CANCELLED after its checkpoint (issue 19)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import submitit
from helpers import assert_same_as_reference
from test_slurm_e2e import submit_high

from preemptible.core.cause import Action
from preemptible.core.exit import CANCELLED_EXIT_CODE
from preemptible.core.rundir import read_progress
from preemptible.core.schema import Event, StopCauseName, read_events
from preemptible.core.store import CheckpointStore
from preemptible.examples.train import train_from_options
from preemptible.scheduler.submitit import PreemptibleTask

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]

STEPS = 40


@pytest.mark.timeout(600)
def test_autoexecutor_job_preempted_resumes_and_returns_result(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                               slurm_jobs: list[str], reference_run) -> None:
    reference_run(max_steps=STEPS, devices=2)  # first, so that it does not share the 2 cores with the job
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    executor = submitit.AutoExecutor(folder=tmp_path / "logs")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="low", tasks_per_node=2, cpus_per_task=1, timeout_min=30,
                               name="pt-submitit")
    task = PreemptibleTask(train_from_options, run_dir=run_dir, max_steps=STEPS, devices=2, record=str(record),
                           step_sleep=0.5, slow_until_resumed=True)
    job = executor.submit(task)
    slurm_jobs.append(job.job_id)

    def trained_steps() -> int:
        progress = read_progress(run_dir)
        return int(progress["step"]) if progress else -1

    slurm_cluster.wait_for(lambda: trained_steps() >= 3, 180, f"submitit job {job.job_id} to train 3 steps")
    submit_high(tmp_path, slurm_jobs)
    # one result per task, through the requeue; bounded (slurm_jobs cancels the job if this fails)
    slurm_cluster.wait_for(lambda: job.done(), 360, f"submitit job {job.job_id} to finish after its requeue")
    results = job.results()
    assert [r["global_step"] for r in results] == [STEPS, STEPS]
    info = slurm_cluster.job_info(job.job_id)
    assert info is not None and int(info["Restarts"]) == 1, info

    events = list(read_events(run_dir / "events.jsonl"))
    stops = [e["step"] for e in events if e["event"] == Event.STOP_AGREED]
    starts = [e["step"] for e in events if e["event"] == Event.TRAIN_START]
    assert len(stops) == 1 and starts == [0, stops[0]], (stops, starts)
    requeues = [e for e in events if e["event"] == Event.REQUEUE]
    assert len(requeues) == 1 and requeues[0]["backend"] == "submitit", requeues
    signalled = {(e["rank"], e["signal"]) for e in events if e["event"] == Event.SIGNAL}
    assert signalled == {(0, "SIGUSR2"), (1, "SIGUSR2")}, "submitit's --signal reaches every task at preemption"
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=2))


@pytest.mark.timeout(600)
def test_autoexecutor_job_cancel_ends_it_after_a_checkpoint(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                            slurm_jobs: list[str]) -> None:
    """submitit's ``job.cancel()`` (``scancel``): both tasks checkpoint, nothing requeues, the job ends CANCELLED."""
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    executor = submitit.AutoExecutor(folder=tmp_path / "logs")
    executor.update_parameters(slurm_partition="low", tasks_per_node=2, cpus_per_task=1, timeout_min=30,
                               name="pt-submitit-cancel")
    job = executor.submit(PreemptibleTask(train_from_options, run_dir=run_dir, max_steps=STEPS, devices=2,
                                          record=str(record), step_sleep=0.5))
    slurm_jobs.append(job.job_id)
    slurm_cluster.wait_for(lambda: (read_progress(run_dir) or {}).get("step", -1) >= 3, 180,
                           f"submitit job {job.job_id} to train 3 steps")
    job.cancel()
    info = slurm_cluster.wait_job_state(job.job_id, ["CANCELLED"], timeout=120)
    assert info["Restarts"] == "0", info

    events = list(read_events(run_dir / "events.jsonl"))
    verdicts = [(e["cause"], e["action"]) for e in events if e["event"] == Event.STOP_CAUSE]
    assert verdicts == [(StopCauseName.CANCELLED, Action.END)], events
    stop = next(e["step"] for e in events if e["event"] == Event.STOP_AGREED)
    assert sorted((e["rank"], e["code"]) for e in events if e["event"] == Event.EXIT) == [
        (0, CANCELLED_EXIT_CODE), (1, CANCELLED_EXIT_CODE)], events
    assert not [e for e in events if e["event"] in (Event.REQUEUE, Event.FINISH)], events
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(quarantine=False)
    assert latest is not None and latest.record.step == stop, latest
