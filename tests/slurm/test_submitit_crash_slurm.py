"""Crashes without warning under submitit on the real two-node cluster (issue 15, point 3).

submitit's sbatch script has no step after ``srun``, so the ranks decide themselves
(:mod:`preemptible.core.supervisor`, the task's hook in :mod:`preemptible.scheduler.submitit`):

* a 2-node ``AutoExecutor`` job (one task per node), rank 1 SIGKILLed at step 6 after the periodic checkpoint
  of step 4: the survivor's watchdog asks the task, which requeues the job by itself (``scontrol requeue``);
  it resumes from the periodic checkpoint, ends COMPLETED, ``job.results()`` returns, bitwise as uninterrupted;
* the same job with rank 1 SIGKILLed at step 2 in every attempt, before any checkpoint: the second crash
  without progress stops the run ("crash loop at step 2") in the log, the journal, run.json and
  ``preemptible status``; the job is not requeued again, ends FAILED, and no task delivers a result.

Every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import submitit
from helpers import assert_same_after_crash

from preemptible.core.schema import CrashDecision, Event, RunRecordKey, RunStatus, read_events
from preemptible.examples.train import train_from_options
from preemptible.scheduler.submitit import PreemptibleTask

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]

STEPS = 40
JOB_TIMEOUT = 300


def _submit(tmp_path: Path, jobs: list[str], name: str, **train: Any) -> tuple[submitit.Job[Any], Path, Path]:
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    executor = submitit.AutoExecutor(folder=tmp_path / "logs")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="low", nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=30,
                               name=name)
    task = PreemptibleTask(train_from_options, run_dir=run_dir, max_steps=STEPS, devices=1, num_nodes=2,
                           record=str(record), every_n_steps=4, sync_periodic=True, signal_rank=1,
                           signal_name="KILL", **train)
    job = executor.submit(task)
    jobs.append(job.job_id)
    return job, run_dir, record


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*.out")))


@pytest.mark.timeout(3 * JOB_TIMEOUT)
def test_submitit_crash_requeued_by_itself_resumes_bitwise_then_crash_loop_stops(
        tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str], reference_run,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # One intra-op thread per rank, as in the reference (sbatch hands this environment to the job).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The killed rank runs on the other node, so its loss is seen by its silence (as on a real cluster): a
    # short peer timeout keeps the test fast.
    monkeypatch.setenv("PREEMPTIBLE_PEER_TIMEOUT", "10")
    reference = reference_run(max_steps=STEPS, devices=2)  # first: it must not share the 2 cores with the job

    crash_dir = tmp_path / "crash"
    job, run_dir, record = _submit(crash_dir, slurm_jobs, "pt-submitit-crash", signal_at=["6"], step_sleep=0.5,
                                   slow_attempts=1)
    info = slurm_cluster.wait_job_state(job.job_id, ["COMPLETED"], 2 * JOB_TIMEOUT,
                                        log=crash_dir / "logs" / f"{job.job_id}_0_log.out")
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", (info, _logs(crash_dir)[-4000:])
    assert [r["global_step"] for r in job.results()] == [STEPS, STEPS]
    events = list(read_events(run_dir))
    [crash] = [e for e in events if e["event"] == Event.CRASH]
    assert crash["decision"] == CrashDecision.REQUEUE and crash["restart_count"] == 0, crash
    assert crash["checkpoint_step"] in (4, 5, 6), crash  # a periodic save lands one or two steps after it is due
    lost = [e for e in events if e["event"] == Event.PEER_LOST and e["restart_count"] == 0]
    assert [e["rank"] for e in lost] == [0], f"rank 0 (the survivor) should have left on the lost peer: {events}"
    resumed = next(e["step"] for e in events if e["event"] == Event.TRAIN_START and e["restart_count"] == 1)
    assert resumed == crash["checkpoint_step"], (resumed, crash)
    assert "scontrol requeue" in _logs(crash_dir), _logs(crash_dir)[-4000:]
    assert_same_after_crash(record, reference, resumed_at={1: resumed})
    run_record = json.loads((run_dir / "run.json").read_text())
    assert run_record[RunRecordKey.CRASH_REQUEUES] == 1 and run_record[RunRecordKey.STATUS] == RunStatus.FINISHED

    loop_dir = tmp_path / "loop"
    loop, run_dir, _ = _submit(loop_dir, slurm_jobs, "pt-submitit-loop", signal_at=["2", "2", "2"])
    info = slurm_cluster.wait_job_state(loop.job_id, ["FAILED"], 2 * JOB_TIMEOUT,
                                        log=loop_dir / "logs" / f"{loop.job_id}_0_log.out")
    assert info["Restarts"] == "1", (info, _logs(loop_dir)[-4000:])
    decisions = [e["decision"] for e in read_events(run_dir) if e["event"] == Event.CRASH]
    assert decisions == [CrashDecision.REQUEUE, CrashDecision.CRASH_LOOP], decisions
    assert "crash loop at step 2" in " ".join(_logs(loop_dir).split()), _logs(loop_dir)[-4000:]
    assert json.loads((run_dir / "run.json").read_text())[RunRecordKey.STATUS] == RunStatus.CRASH_LOOP
    status = subprocess.run([sys.executable, "-m", "preemptible.cli", "status", str(run_dir)], capture_output=True,
                            text=True, timeout=60)
    assert "crash loop at step 2" in " ".join(status.stdout.split()), status.stdout
    # No result: the ranks left with the crash code. (Not ``loop.result()``: without SLURM accounting submitit
    # cannot see that a FAILED job is done and waits for ever.)
    assert not [k for k in range(2) if loop.task(k).paths.result_pickle.exists()], "a task delivered a result"
