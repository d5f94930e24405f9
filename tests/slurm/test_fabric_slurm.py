"""A Lightning Fabric loop on the real SLURM cluster: ``preemptible sbatch`` of the README's Fabric example,
2 ranks started by ``srun`` (Fabric reads SLURM's variables), preempted by a job on ``high``.

SIGUSR1 reaches every rank, they agree on one step, write the checkpoint, rank 0 asks ``scontrol
requeue``; the requeued attempt resumes on that step, finishes, and every rank's loss at every step
and the final weights are bitwise those of an uninterrupted run (Fabric-launched, on this machine).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from loop_helpers import assert_bitwise_resumed, run_loop
from test_slurm_e2e import sbatch_cli, submit_high

from preemptible.core.rundir import read_progress
from preemptible.core.schema import Event, read_events
from preemptible.tools.simulator import Attempt, RunSummary

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]

STEPS = 40
RANKS = 2


@pytest.mark.timeout(600)
def test_fabric_loop_preempted_by_high_job_resumes_bitwise(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                            slurm_jobs: list[str]) -> None:
    # The reference first, so that it does not share the cores with the job.
    _, reference, _ = run_loop(tmp_path, "reference", "fabric", ranks=RANKS, steps=STEPS)
    run_dir, trace = tmp_path / "run", tmp_path / "preempted.jsonl"
    command = [sys.executable, "-m", "preemptible.examples.fabric_loop", "--run-dir", str(run_dir), "--trace", str(trace),
               "--max-steps", str(STEPS), "--devices", str(RANKS), "--step-sleep", "0.5"]
    job = sbatch_cli(tmp_path, "--job-name", "pt-fabric", "--ntasks-per-node", str(RANKS), "--cpus-per-task", "1",
                     "--partition", "low", "--run-dir", str(run_dir), "--", *command)
    slurm_jobs.append(job)
    log = run_dir / f"slurm-{job}.out"

    def trained_steps() -> int:
        progress = read_progress(run_dir)
        return int(progress["step"]) if progress else -1

    slurm_cluster.wait_for(lambda: trained_steps() >= 3, 180, f"Fabric job {job} to train 3 steps")
    high = submit_high(tmp_path, slurm_jobs)
    info = slurm_cluster.wait_job_state(job, ["COMPLETED"], timeout=360, log=log)
    slurm_cluster.wait_job_state(high, ["COMPLETED"], timeout=120)
    assert info["ExitCode"] == "0:0" and int(info["Restarts"]) == 1, f"{info}\n{log.read_text()[-4000:]}"

    events = list(read_events(run_dir / "events.jsonl"))
    signalled = {(e["rank"], e["signal"]) for e in events if e["event"] == Event.SIGNAL and e["restart_count"] == 0}
    assert signalled == {(0, "SIGUSR1"), (1, "SIGUSR1")}, signalled
    requeues = [e for e in events if e["event"] == Event.REQUEUE]
    assert [(e["backend"], e["outcome"]) for e in requeues] == [("slurm", "requested")], requeues
    stop = next(e["step"] for e in events if e["event"] == Event.STOP_AGREED)
    checkpoint = next(e["path"] for e in events if e["event"] == Event.CHECKPOINT and e["step"] == stop)
    # The journal's view of the two attempts, in the local supervisor's terms, for the shared assertions.
    starts = [e["step"] for e in events if e["event"] == Event.TRAIN_START]
    summary = RunSummary([Attempt(0, command, exit_code=144, stop_step=stop, checkpoint=checkpoint,
                                  resumed_from_step=starts[0]),
                          Attempt(1, command, exit_code=0, resumed_from_step=starts[1])])
    assert_bitwise_resumed(summary, trace, reference, run_dir, ranks=RANKS, steps=STEPS, preemptions=1)
