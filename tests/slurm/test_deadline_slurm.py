"""Deadline awareness reads the real job's end time from SLURM (squeue)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from preemptible.core.deadline import JobDeadline, squeue_end_time
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
    slurm_cluster.wait_job_state(job, ["RUNNING"], timeout=120)
    end = squeue_end_time(job)
    assert end is not None
    assert 240 <= end - time.time() <= 305, "a 5-minute limit ends about 5 minutes after the start"
    deadline = JobDeadline(JobEnvironment.from_env({"SLURM_JOB_ID": job}))
    assert deadline.known and not deadline.too_close(60) and deadline.too_close(400)
