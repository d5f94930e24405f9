"""``import lightning`` on the real SLURM cluster: the example job with the ``lightning`` package only and
``trainer.fit`` without ``ckpt_path`` (issue: every door).

Preempted by a job on ``high`` (SIGUSR1 to every rank), requeued by preemptible (Lightning's own SLURM
auto-requeue, which lives in ``lightning.fabric``'s ``SLURMEnvironment`` for this package, switched off),
the requeued attempt resumes by itself on the step the first one stopped at, bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_slurm_e2e import JOB_TIMEOUT, RANKS, STEPS, Job, assert_finished_like_reference, submit_high

from preemptible.core.schema import COMMIT_SUFFIX, Event

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_lightning_package_job_preempted_by_high_resumes_by_itself(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                                   slurm_jobs: list[str], reference_run) -> None:
    reference_run(max_steps=STEPS, devices=RANKS)  # before the job, so they do not share the cores
    job = Job(tmp_path, slurm_cluster, slurm_jobs, "lightning", 0.5, slow_attempts=1, namespace="lightning",
              no_ckpt_path=True)
    job.wait_state("RUNNING", timeout=120)
    job.wait_training(3)
    submit_high(tmp_path, slurm_jobs)
    assert_finished_like_reference(job, reference_run)
    events = job.events()
    assert {(e["rank"], e["signal"]) for e in events if e["event"] == Event.SIGNAL} == {(0, "SIGUSR1"), (1, "SIGUSR1")}
    resumes = [e for e in events if e["event"] == Event.RESUME]
    assert resumes and all(e["checkpoint"] for e in resumes), f"the requeued attempt did not resume by itself{job.log_tail()}"
    assert len([e for e in events if e["event"] == Event.REQUEUE]) == 1, "one requeue, by preemptible"
    assert not list(tmp_path.rglob("hpc_ckpt_*")), "Lightning's own SLURM auto-requeue checkpointed too"
    for record in (job.run_dir / "checkpoints").glob(f"*{COMMIT_SUFFIX}"):
        versions = json.loads(record.read_text())["versions"]
        assert "lightning" in versions and "pytorch-lightning" not in versions, versions
