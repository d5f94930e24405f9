"""``srun torchrun ...`` on the real cluster (issue 13, torchrun): one task per node, torchrun's elastic
agent starts the two ranks. A job on ``high`` preempts it; both ranks get the stop request, checkpoint
at one step, rank 0 requeues, and the requeued job resumes bitwise like an uninterrupted run.

Measured on this cluster (proctrack/linuxproc): slurmstepd signals every process of the step, so the
ranks receive SIGUSR1 straight from it, and the agent, given ``--signals-to-handle ...,SIGUSR1,SIGUSR2``,
passes it on as well (each rank records it twice). Without that option the agent dies of SIGUSR1 at
once (``srun: task 0: User defined signal 1``) and the orphaned ranks no longer receive the step's later
signals: the callback warns at start (tests/test_torchrun.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import example_command
from test_slurm_e2e import RANKS, STEPS, Job, assert_finished_like_reference, sbatch_cli, submit_high

from preemptible.core.elastic import AGENT_SIGNALS_FIX
from preemptible.core.schema import Event

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]


class TorchrunJob(Job):
    """The example training under ``srun torchrun --standalone --nproc-per-node 2`` (``preemptible sbatch``'s
    single-task template, one task of two CPUs)."""

    def __init__(self, tmp_path: Path, cluster: SlurmCluster, jobs: list[str]) -> None:  # noqa: D107
        self.cluster = cluster
        self.run_dir = tmp_path / "run"
        self.record = tmp_path / "record.jsonl"
        training = example_command(self.record, max_steps=STEPS, devices=RANKS, step_sleep=0.5, slow_attempts=1)
        assert training[1:3] == ["-m", "preemptible.examples.train"], training
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
                   f"--signals-to-handle={AGENT_SIGNALS_FIX}", "--shutdown-timeout=60", *training[1:]]
        self.id = sbatch_cli(tmp_path, "--job-name", "pt-torchrun", "--cpus-per-task",
                             str(RANKS), "--partition", "low", "--run-dir", str(self.run_dir), "--", *command)
        jobs.append(self.id)
        self.log = self.run_dir / f"slurm-{self.id}.out"


@pytest.mark.timeout(600)
def test_srun_torchrun_job_preempted_by_high_resumes_bitwise(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                              slurm_jobs: list[str], reference_run) -> None:
    reference_run(max_steps=STEPS, devices=RANKS)  # before the job, so that they do not share the cores
    job = TorchrunJob(tmp_path, slurm_cluster, slurm_jobs)
    job.wait_state("RUNNING", timeout=120)
    job.wait_training(3)
    submit_high(tmp_path, slurm_jobs)
    assert_finished_like_reference(job, reference_run)
    events = job.events()
    got = {(e["rank"], e["signal"]) for e in events if e["event"] == Event.SIGNAL and e["restart_count"] == 0}
    assert got == {(0, "SIGUSR1"), (1, "SIGUSR1")}, f"every torchrun worker gets the stop request: {got}"
    starts = [e for e in events if e["event"] == Event.START]
    assert starts and all(e.get("world_size") == RANKS for e in starts), starts
    assert "elastic agent does not handle" not in job.log_text(), job.log_tail()
