"""The Hydra app through hydra-submitit-launcher on the real cluster (issue 13, Hydra; issue 15, crashes).

A 2-task DDP job submitted by ``python -m preemptible.examples.hydra_app.train -m
hydra/launcher=preemptible_slurm ...`` with periodic checkpoints first crashes: rank 1 is SIGKILLed at
step 6 (``PREEMPTIBLE_INJECT``), and since submitit's sbatch script runs nothing after ``srun``, the
surviving rank requeues the job itself (the session's :class:`~preemptible.core.supervisor.RankCrashSupervisor`;
no ``PreemptibleTask`` here). The requeued attempt resumes from the periodic checkpoint and is then
preempted by a job on ``high``: SLURM sends SIGUSR2 (submitit's ``--signal``) to both tasks, the callback
checkpoints at an agreed step and requeues; the third attempt continues in the same Hydra output
directory (``<sweep dir>/<submitit job id>``), bitwise like an uninterrupted run, with one W&B run id,
and the launching Hydra process gets the job's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from helpers import assert_same_after_crash
from test_slurm_e2e import submit_high

from preemptible.core.rundir import read_progress
from preemptible.core.schema import RECORD_FILE, CrashDecision, Event, RunRecordKey, read_events

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]

STEPS = 40


@pytest.mark.timeout(600)
def test_hydra_submitit_job_preempted_by_high_resumes_in_the_same_run_dir(
        tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str], reference_run) -> None:
    reference_run(max_steps=STEPS, devices=2)  # first, so that it does not share the cores with the job
    sweep, record = tmp_path / "multirun", tmp_path / "record.jsonl"
    command = [sys.executable, "-m", "preemptible.examples.hydra_app.train", "-m",
               "hydra/launcher=preemptible_slurm", "hydra.launcher.partition=low", "hydra.launcher.tasks_per_node=2",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30", "hydra.launcher.name=pt-hydra",
               f"hydra.sweep.dir={sweep}", "trainer.devices=2", "trainer.strategy=ddp", f"trainer.max_steps={STEPS}",
               "logger=wandb", "model.step_sleep=0.5", "slow_attempts=2", "+callbacks.preemption.every_n_steps=3",
               "+callbacks.record._target_=preemptible.tools.tracing.StepRecorder", f"+callbacks.record.path={record}"]
    # Rank 1 dies without warning at step 6 of the first attempt (as an OOM kill would).
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PREEMPTIBLE_INJECT": "kill:6:1"}
    with open(tmp_path / "launcher.log", "w") as out:
        launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def run_dirs() -> list[Path]:
            return sorted(p.parent for p in sweep.glob("*/progress.json"))

        def trained_steps() -> int:
            dirs = run_dirs()
            progress = read_progress(dirs[0]) if dirs else None
            return int(progress["step"]) if progress else -1

        slurm_cluster.wait_for(lambda: trained_steps() >= 3, 240, "the Hydra job to train 3 steps")
        run_dir = run_dirs()[0]
        job_id = run_dir.name  # the submitit job id (ARRAYID_TASKID): the sweep subdir
        slurm_jobs.append(job_id)

        def restarts() -> int:
            info = slurm_cluster.job_info(job_id)
            return int(info["Restarts"]) if info else -1

        slurm_cluster.wait_for(lambda: restarts() == 1 and trained_steps() >= 9, 300,
                               "the job to requeue itself after the crash and train on")
        submit_high(tmp_path, slurm_jobs)
        code = launcher.wait(timeout=400)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = (tmp_path / "launcher.log").read_text()[-3000:]
    assert code == 0, output

    info = slurm_cluster.job_info(job_id)
    assert info is not None and int(info["Restarts"]) == 2, info
    assert run_dirs() == [run_dir], f"one run directory for both attempts: {run_dirs()}"
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert Path(hydra_cfg["runtime"]["output_dir"]) == run_dir and hydra_cfg["job"]["id"] == job_id, hydra_cfg["job"]

    events = list(read_events(run_dir / "events.jsonl"))
    [crash] = [e for e in events if e["event"] == Event.CRASH]
    assert crash["decision"] == CrashDecision.REQUEUE and crash["restart_count"] == 0, crash
    lost = [e["rank"] for e in events if e["event"] == Event.PEER_LOST]
    assert lost == [0], f"rank 0, the survivor, should have left on the lost peer and decided: {lost}"
    stops = [e["step"] for e in events if e["event"] == Event.STOP_AGREED]
    starts = [e["step"] for e in events if e["event"] == Event.TRAIN_START]
    assert len(stops) == 1 and starts == [0, crash["checkpoint_step"], stops[0]], (crash, stops, starts)
    requeues = [e for e in events if e["event"] == Event.REQUEUE]
    assert len(requeues) == 1 and requeues[0]["backend"] == "submitit", requeues
    signalled = {(e["rank"], e["signal"]) for e in events if e["event"] == Event.SIGNAL}
    assert signalled == {(0, "SIGUSR2"), (1, "SIGUSR2")}, "the launcher's USR2 reaches every task at preemption"
    assert_same_after_crash(record, reference_run(max_steps=STEPS, devices=2),
                            resumed_at={1: crash["checkpoint_step"], 2: stops[0]})

    loggers = json.loads((run_dir / RECORD_FILE).read_text())[RunRecordKey.LOGGERS]
    wandb_id = loggers["0:WandbLogger"]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(r.name.endswith(wandb_id) for r in runs), (wandb_id, runs)
