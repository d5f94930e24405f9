"""Deadline awareness reads the real job's end time from SLURM (squeue)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from preemptible.core.deadline import JobDeadline, parse_slurm_time, squeue_end_time
from preemptible.core.environment import JobEnvironment

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm]


@pytest.mark.timeout(300)
def test_end_time_of_a_running_job_comes_from_squeue(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                     slurm_jobs: list[str]) -> None:
    done = subprocess.run(["sbatch", "--parsable", "--partition=high", "--ntasks=1", "--time=5", "--job-name=pt-deadline",
                           f"--output={tmp_path}/%j.out", "--wrap=sleep 120"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    slurm_jobs.append(job)
    info = slurm_cluster.wait_job_state(job, ["RUNNING"], timeout=120)
    end = squeue_end_time(job)
    assert end is not None
    # Against the job's own start time, not the clock: however long the polling took, the end is exact.
    started = parse_slurm_time(info["StartTime"])
    assert started is not None, info
    assert end - started == 300, f"a 5-minute limit ends 5 minutes after the start ({info['StartTime']}): {end - started} s"
    assert end > time.time(), "the job is still running: its end lies ahead"
    deadline = JobDeadline(JobEnvironment.from_env({"SLURM_JOB_ID": job}))
    assert deadline.known and not deadline.too_close(60) and deadline.too_close(400)
