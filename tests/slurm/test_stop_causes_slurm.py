"""Each cause of a stop on the real cluster (issue 19), the rows of the README's table that
tests/slurm/test_slurm_e2e.py does not already stop a job for:

* ``scancel`` ends the job: checkpoint, no requeue, the job ends CANCELLED, the journal and ``status`` say cancelled;
* a preemption *without* ``preempt_send_user_signal``: SIGTERM only, and still checkpoint + requeue;
* ``scancel --signal=USR1``: a user asking for checkpoint-and-requeue.

(A preemption with the user signal, an operator's ``scontrol requeue`` and the time limit are asserted
in test_slurm_e2e.py, on the jobs that already stop for them.)

How a preemption without ``preempt_send_user_signal`` is made on a cluster that sets it: slurmctld
sends a preempted job its ``--signal`` only when the job *has* one (22.05, ``_job_check_grace_internal``:
``preempt_send_user_signal && job_ptr->warn_signal && !WARN_SENT``), else ``SIGCONT`` + ``SIGTERM``,
exactly what a cluster without the parameter sends. So that job is submitted with the rendered script
minus its ``#SBATCH --signal`` line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_slurm_e2e import (
    JOB_TIMEOUT,
    RANKS,
    STEPS,
    Job,
    assert_finished_like_reference,
    assert_stopped_for,
    sbatch_cli,
    submit_high,
)

from preemptible.core.cause import Action
from preemptible.core.exit import CANCELLED_EXIT_CODE
from preemptible.core.schema import Event, StopCauseName
from preemptible.core.store import CheckpointStore

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]


class JobWithoutSignal(Job):
    """A :class:`Job` whose script has no ``--signal``: a preemption then sends SIGTERM alone."""

    def __init__(self, tmp_path: Path, cluster: SlurmCluster, jobs: list[str], name: str, step_sleep: float,
                 slow_attempts: int | None = None, num_workers: int = 0) -> None:
        from helpers import example_command

        self.cluster = cluster
        self.run_dir = tmp_path / "run"
        self.record = tmp_path / "record.jsonl"
        command = example_command(self.record, max_steps=STEPS, devices=RANKS, step_sleep=step_sleep,
                                  slow_attempts=slow_attempts, num_workers=num_workers)
        rendered = subprocess.run([sys.executable, "-m", "preemptible.cli", "sbatch", "--dry-run", "--job-name",
                                   f"pt-{name}", "--ntasks-per-node", str(RANKS), "--cpus-per-task", "1", "--partition",
                                   "low", "--run-dir", str(self.run_dir), "--", *command],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True).stdout
        lines = rendered.splitlines()
        assert sum(line.startswith("#SBATCH --signal=") for line in lines) == 1, rendered
        script = tmp_path / "job.sbatch"
        script.write_text("\n".join(line for line in lines if not line.startswith("#SBATCH --signal=")) + "\n")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        self.id = done.stdout.strip().split(";")[0]
        jobs.append(self.id)
        self.log = self.run_dir / f"slurm-{self.id}.out"


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_scancel_ends_the_job_after_a_checkpoint(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                 slurm_jobs: list[str]) -> None:
    """``scancel JOB``: both ranks checkpoint, nobody requeues, the job ends CANCELLED with Restarts=0."""
    job = Job(tmp_path, slurm_cluster, slurm_jobs, "scancel", 0.5)
    job.wait_state("RUNNING", timeout=120)
    job.wait_training(3)
    subprocess.run(["scancel", job.id], check=True, timeout=30)
    info = job.wait_state("CANCELLED", timeout=120)
    assert info["Restarts"] == "0", info
    stop = assert_stopped_for(job, 0, StopCauseName.CANCELLED, Action.END)
    events = job.events()
    assert sorted((e["rank"], e["code"]) for e in events if e["event"] == Event.EXIT) == [
        (0, CANCELLED_EXIT_CODE), (1, CANCELLED_EXIT_CODE)], job.log_tail()
    assert not [e for e in events if e["event"] in (Event.REQUEUE, Event.FINISH)], events
    latest = CheckpointStore(job.run_dir / "checkpoints").latest_valid(quarantine=False)
    assert latest is not None and latest.record.step == stop, latest
    # the attempt is over for good: one jobcomp record, CANCELLED
    slurm_cluster.wait_for(lambda: slurm_cluster.jobcomp_records(job.id), 60, f"job {job.id}'s jobcomp record")
    assert [r["JobState"] for r in slurm_cluster.jobcomp_records(job.id)] == ["CANCELLED"]
    status = subprocess.run([sys.executable, "-m", "preemptible.cli", "status", "--json", str(job.run_dir)],
                            capture_output=True, text=True, timeout=60)
    summary = json.loads(status.stdout)
    assert summary["state"] == "cancelled" and summary["preemptions"] == 0, summary
    assert [a["stop_cause"] for a in summary["attempts"]] == [StopCauseName.CANCELLED], summary["attempts"]


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_preemption_with_sigterm_only_requeues(tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str],
                                               reference_run) -> None:
    """A job without ``--signal`` is preempted with SIGTERM alone (as without ``preempt_send_user_signal``):
    still RUNNING with a PreemptTime, so it is checkpointed and requeued, and it finishes like the reference.

    Each rank loads its data with 2 DataLoader workers: slurmstepd's SIGTERM reaches them too (every pid
    of the step), and they must live on until their rank has checkpointed (preemptible/core/workers.py)."""
    reference_run(max_steps=STEPS, devices=RANKS, num_workers=2)
    job = JobWithoutSignal(tmp_path, slurm_cluster, slurm_jobs, "presigterm", 0.5, slow_attempts=1, num_workers=2)
    job.wait_state("RUNNING", timeout=120)
    job.wait_training(3)
    submit_high(tmp_path, slurm_jobs)
    job.wait_restarts(1)
    assert_finished_like_reference(job, reference_run, num_workers=2)
    assert "exited unexpectedly" not in job.log_text(), job.log_tail()
    signals = {(e["rank"], e["signal"]) for e in job.events() if e["event"] == Event.SIGNAL and e["restart_count"] == 0}
    assert signals == {(0, "SIGTERM"), (1, "SIGTERM")}, signals
    assert_stopped_for(job, 0, StopCauseName.PREEMPTED, Action.REQUEUE)


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_scancel_signal_usr1_checkpoints_and_requeues(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                      slurm_jobs: list[str], reference_run) -> None:
    """``scancel --signal=USR1 JOB`` (the user asks for checkpoint-and-requeue): requeued once, then COMPLETED."""
    reference_run(max_steps=STEPS, devices=RANKS)
    job = Job(tmp_path, slurm_cluster, slurm_jobs, "usr1", 0.5, slow_attempts=1)
    job.wait_state("RUNNING", timeout=120)
    job.wait_training(3)
    subprocess.run(["scancel", "--signal=USR1", job.id], check=True, timeout=30)
    job.wait_restarts(1)
    assert_finished_like_reference(job, reference_run)
    assert_stopped_for(job, 0, StopCauseName.REQUESTED, Action.REQUEUE)


def test_is_cancelled_entry_point_on_the_cluster(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                 slurm_jobs: list[str]) -> None:
    """``python -m preemptible.scheduler.stopcause is-cancelled`` asked from inside a running job: "no" (exit 1)."""
    out = tmp_path / "answer.txt"
    job_id = sbatch_cli(tmp_path, "--job-name", "pt-iscancelled", "--time", "5", "--run-dir", str(tmp_path / "run"),
                        "--", "bash", "-c",
                        f"{sys.executable} -m preemptible.scheduler.stopcause is-cancelled > {out}; echo $? >> {out}")
    slurm_jobs.append(job_id)
    slurm_cluster.wait_job_state(job_id, ["COMPLETED"], timeout=120, log=tmp_path / "run" / f"slurm-{job_id}.out")
    answer = out.read_text().splitlines()
    assert "State=RUNNING RestartCnt=0" in answer[0] and answer[-1] == "1", answer
