"""End to end on a real SLURM cluster: a 2-rank gloo DDP job submitted with ``preemptible sbatch``.

Each scenario stops the job the way a cluster does, lets SLURM requeue it, and checks that the
resumed attempt started on the very step the first one checkpointed at, that the run finished,
and that every loss and the final weights are bitwise those of an uninterrupted run. Scenarios that
fit one job share it, one per attempt (a job's start, imports and requeue take tens of seconds):
a preemption by a ``high`` job, then an operator's ``scontrol requeue``.

The cluster (docker/slurm/cluster.sh start --nodes 2) has two nodes of two cores, partitions
``low`` (GraceTime=20) and ``high`` over both, KillWait=10. The ``high`` job of :func:`submit_high`
takes every node whole, so it preempts whatever runs on ``low``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest
from helpers import assert_same_as_reference, example_command

from preemptible.core.cause import Action
from preemptible.core.schema import Event, Place, RequeueOutcomeName, StopCauseName, TraceKind, read_events

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]

STEPS = 40
RANKS = 2
# Seconds for a whole job to go from submission through a requeue to the end; far above the
# ~1-2 minutes the scenarios take, to fail rather than hang.
JOB_TIMEOUT = 300


class Job:
    """One submitted training job and the files it writes."""

    def __init__(self, tmp_path: Path, cluster: SlurmCluster, jobs: list[str], name: str, step_sleep: float,
                 *sbatch_options: str, slow_attempts: int | None = None, **options: Any) -> None:
        self.cluster = cluster
        self.run_dir = tmp_path / "run"
        self.record = tmp_path / "record.jsonl"
        # ``slow_attempts``: the steps take ``step_sleep`` only in the first attempts, those a scenario stops.
        command = example_command(self.record, max_steps=STEPS, devices=RANKS, step_sleep=step_sleep,
                                  slow_attempts=slow_attempts, **options)
        self.id = sbatch_cli(tmp_path, "--job-name", f"pt-{name}", "--ntasks-per-node", str(RANKS),
                             "--cpus-per-task", "1", "--partition", "low", "--run-dir", str(self.run_dir),
                             *sbatch_options, "--", *command)
        jobs.append(self.id)
        self.log = self.run_dir / f"slurm-{self.id}.out"

    def info(self) -> dict[str, str]:
        info = self.cluster.job_info(self.id)
        assert info is not None, f"SLURM forgot job {self.id}{self.log_tail()}"
        return info

    def restarts(self) -> int:
        return int(self.info().get("Restarts", "0"))

    def wait_state(self, *states: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        return self.cluster.wait_job_state(self.id, states, timeout, log=self.log)

    def wait_restarts(self, count: int, timeout: float = 120) -> None:
        self.cluster.wait_for(lambda: self.restarts() >= count, timeout,
                              f"job {self.id} to be requeued {count} time(s)")

    def wait_training(self, step: int, timeout: float = 120) -> None:
        """Until rank 0 has trained ``step`` steps in the current attempt (imports and DDP set-up take seconds)."""
        self.cluster.wait_for(lambda: self.latest_step() >= step, timeout, f"job {self.id} to reach step {step}")

    def latest_step(self, attempt: int | None = None) -> int:
        """The newest step rank 0 trained (in attempt ``attempt`` only, if given)."""
        steps = [e["step"] for e in self.records() if e["kind"] == TraceKind.TRAIN and e["rank"] == 0
                 and (attempt is None or e["attempt"] == attempt)]
        return max(steps, default=-1)

    def wait_training_in(self, attempt: int, step: int, timeout: float = 120) -> None:
        """Until rank 0 has trained ``step`` in attempt ``attempt`` (its SLURM restart count)."""
        self.cluster.wait_for(lambda: self.latest_step(attempt) >= step, timeout,
                              f"job {self.id} to reach step {step} in attempt {attempt}")

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        # The last line may be half written while the job runs.
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.endswith("}")]

    def events(self) -> list[dict[str, Any]]:
        return list(read_events(self.run_dir / "events.jsonl"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self) -> str:
        return f"\n--- {self.log} ---\n{self.log_text()[-4000:]}"


def sbatch_cli(cwd: Path, *args: str) -> str:
    """``preemptible sbatch ARGS`` as a user runs it; returns the job id it prints."""
    done = subprocess.run([sys.executable, "-m", "preemptible.cli", "sbatch", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"preemptible sbatch failed ({done.returncode}): {done.stderr}"
    job_id = done.stdout.strip()
    assert job_id.isdigit(), f"preemptible sbatch printed {done.stdout!r}"
    return job_id


def submit_high(tmp_path: Path, jobs: list[str], seconds: int = 3) -> str:
    """A short job on ``high`` that needs every node whole: SLURM preempts the ``low`` jobs to make room.

    Whole nodes (``--exclusive``, all of them), so that on the two-node cluster it cannot start on
    an idle node next to the job it is meant to preempt.
    """
    nodes = subprocess.run(["sinfo", "-h", "-p", "high", "-o", "%D"], capture_output=True, text=True,
                           timeout=30, check=True).stdout.split()[0]
    done = subprocess.run(["sbatch", "--parsable", "--partition=high", "--exclusive", f"--nodes={nodes}",
                           "--ntasks-per-node=1", "--job-name=pt-high",
                           f"--output={tmp_path}/high-%j.out", f"--wrap=sleep {seconds}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    jobs.append(done.stdout.strip().split(";")[0])
    return jobs[-1]


def assert_resumed_where_it_stopped(job: Job, restarts: int = 1) -> int:
    """Attempt k+1 started training on the step attempt k agreed to stop and checkpoint at; returns
    the first stop step."""
    events = job.events()
    stops = {e["restart_count"]: e["step"] for e in events if e["event"] == Event.STOP_AGREED}
    starts = {e["restart_count"]: e["step"] for e in events if e["event"] == Event.TRAIN_START}
    for attempt in range(restarts):
        assert attempt in stops, f"attempt {attempt} never agreed to stop: {events}{job.log_tail()}"
        assert starts.get(attempt + 1) == stops[attempt], (
            f"attempt {attempt + 1} started at step {starts.get(attempt + 1)}, "
            f"attempt {attempt} stopped at {stops[attempt]}{job.log_tail()}")
        assert 0 < stops[attempt] < STEPS, f"the stop at step {stops[attempt]} was not mid-run"
    finishes = [e for e in events if e["event"] == Event.FINISH]
    assert [(e["step"], e["restart_count"]) for e in finishes] == [(STEPS, restarts)], finishes
    return stops[0]


def assert_stopped_for(job: Job, attempt: int, cause: str, action: str) -> int:
    """Attempt ``attempt`` journaled the stop cause ``cause`` (and ``action``) once, after committing a checkpoint at
    its stop step; returns that step."""
    events = [e for e in job.events() if e["restart_count"] == attempt and e["rank"] == 0]
    verdicts = [(e["cause"], e["action"]) for e in events if e["event"] == Event.STOP_CAUSE]
    assert verdicts == [(cause, action)], f"attempt {attempt}: {verdicts} ({events}){job.log_tail()}"
    stop = next(e["step"] for e in events if e["event"] == Event.STOP_AGREED)
    committed = [e["step"] for e in events if e["event"] == Event.CHECKPOINT]
    assert stop in committed, f"attempt {attempt} stopped at {stop} but committed {committed}{job.log_tail()}"
    return int(stop)


def assert_finished_like_reference(job: Job, reference: Callable[..., Path], restarts: int = 1, **config: Any) -> None:
    info = job.wait_state("COMPLETED")
    assert info["ExitCode"] == "0:0", info
    assert int(info["Restarts"]) == restarts, f"expected {restarts} requeue(s): {info}{job.log_tail()}"
    assert_resumed_where_it_stopped(job, restarts)
    assert_same_as_reference(job.record, reference(max_steps=STEPS, devices=RANKS, **config))
    # Every attempt wrote to the one append-mode log.
    assert job.log_text().count("preemptible: job ") == restarts + 1, job.log_tail()


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_sbatch_submits_a_job_that_runs(tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str]) -> None:
    """The rendered single-task script is accepted by sbatch, runs under srun and exits cleanly."""
    run_dir = tmp_path / "run"
    code = "import os; print('hello from', os.environ['SLURM_JOB_ID'], os.environ['PREEMPTIBLE_RUN_DIR'])"
    job_id = sbatch_cli(tmp_path, "--job-name", "pt-hello", "--time", "5", "--signal-lead", "60",
                        "--run-dir", str(run_dir), "--", sys.executable, "-c", code)
    slurm_jobs.append(job_id)
    log = run_dir / f"slurm-{job_id}.out"
    info = slurm_cluster.wait_job_state(job_id, ["COMPLETED"], timeout=120, log=log)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    assert f"hello from {job_id} {run_dir}" in log.read_text()


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_preempted_by_high_partition_job_then_operator_requeue_resumes(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                                       slurm_jobs: list[str], reference_run) -> None:
    """Attempt 0: a job on ``high`` preempts ours: SIGUSR1 to every rank, checkpoint, requeue, exact resume.
    Attempt 1: ``scontrol requeue``: SIGTERM to every rank, a checkpoint within KillWait, an exact resume."""
    reference_run(max_steps=STEPS, devices=RANKS)  # before the job, so they do not share the 2 cores
    job = Job(tmp_path, slurm_cluster, slurm_jobs, "preempt", 0.5, slow_attempts=2)
    job.wait_state("RUNNING", timeout=120)
    job.wait_training(3)
    high = submit_high(tmp_path, slurm_jobs)
    job.wait_restarts(1)
    slurm_cluster.wait_job_state(high, ["COMPLETED"], timeout=120)
    # the requeued job trains again (from its checkpoint), then an operator requeues it
    job.wait_training_in(1, 2 + max(e["step"] for e in job.events() if e["event"] == Event.STOP_AGREED))
    subprocess.run(["scontrol", "requeue", job.id], check=True, timeout=30)
    assert_finished_like_reference(job, reference_run, restarts=2)
    events = job.events()
    preempted = {(e["rank"], e["signal"]) for e in events if e["event"] == Event.SIGNAL and e["restart_count"] == 0}
    assert preempted == {(0, "SIGUSR1"), (1, "SIGUSR1")}, f"every rank should see SIGUSR1 at preemption: {preempted}"
    requeued = {e["signal"] for e in events if e["event"] == Event.SIGNAL and e["restart_count"] == 1}
    assert requeued == {"SIGTERM"}, requeued
    # the stop causes: preempted (preemptible asks for the requeue), then the operator's requeue (SLURM's own)
    assert_stopped_for(job, 0, StopCauseName.PREEMPTED, Action.REQUEUE)
    assert_stopped_for(job, 1, StopCauseName.REQUEUED_BY_OPERATOR, Action.ALREADY_REQUEUED)
    assert len(slurm_cluster.jobcomp_records(job.id)) == 3, slurm_cluster.jobcomp_records(job.id)


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_time_limit_warning_requeues_and_finishes(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                  slurm_jobs: list[str], reference_run) -> None:
    """``--signal=USR1@60`` before a 2-minute limit: checkpoint and self-requeue, not a TIMEOUT.

    SLURM checks the warning every 30 s, so it arrives 60 to 90 s before the limit (30 to 60 s
    into the attempt); the training is slow enough to still be running then (until the first
    resume: the relaunch runs at full speed). Every attempt gets its own warning, so once the first
    requeue happened the test lifts the limit, as an operator would, for the second attempt to
    finish instead of cycling.
    """
    reference_run(max_steps=STEPS, devices=RANKS)
    job = Job(tmp_path, slurm_cluster, slurm_jobs, "timelimit", 2.0, "--time", "2", "--signal-lead", "60",
              slow_attempts=1)
    job.wait_state("RUNNING", timeout=120)
    job.wait_restarts(1, timeout=180)
    subprocess.run(["scontrol", "update", f"JobId={job.id}", "TimeLimit=10"], check=True, timeout=30)
    assert_finished_like_reference(job, reference_run)
    first = [e for e in job.events() if e["event"] == Event.SIGNAL and e["restart_count"] == 0]
    assert first and all(e["signal"] == "SIGUSR1" for e in first), first
    assert "DUE TO TIME LIMIT" not in job.log_text(), job.log_tail()
    assert_stopped_for(job, 0, StopCauseName.TIME_LIMIT, Action.REQUEUE)


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_requeue_limit_stops_requeueing(tmp_path: Path, slurm_cluster: SlurmCluster,
                                        slurm_jobs: list[str]) -> None:
    """With ``--max-requeues 0`` a preempted job checkpoints but does not requeue, and says why."""
    job = Job(tmp_path, slurm_cluster, slurm_jobs, "limit", 0.5, "--max-requeues", "0")
    job.wait_state("RUNNING", timeout=120)
    job.wait_training(3)
    submit_high(tmp_path, slurm_jobs)
    info = job.wait_state("FAILED")
    assert info["Restarts"] == "0", info
    assert "requeue limit reached" in job.log_text(), job.log_tail()
    outcomes = [e.get("outcome") for e in job.events() if e["event"] == Event.REQUEUE]
    assert outcomes == [RequeueOutcomeName.LIMIT_REACHED], outcomes


#: A validation of 90 batches of 1 s at step 4: far longer than the ``low`` partition's GraceTime of 20 s (and than
#: the scheduler takes to preempt).
LONG_VALIDATION = {"val_every": 4, "val_batches": 90}


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_preempted_during_a_validation_longer_than_the_grace_time(tmp_path: Path, slurm_cluster: SlurmCluster,
                                                                   slurm_jobs: list[str], reference_run) -> None:
    """A ``high`` job preempts ours while it validates (90 s of validation, 20 s of GraceTime): the stop is taken
    at the next validation batch, the checkpoint (the state from the validation's start, owing it) is committed
    before SIGKILL, and the requeued job redoes that validation and ends bitwise like an uninterrupted run."""
    reference_run(max_steps=STEPS, devices=RANKS, **LONG_VALIDATION)
    job = Job(tmp_path, slurm_cluster, slurm_jobs, "longval", 0.2, slow_attempts=1, val_sleep=1.0, **LONG_VALIDATION)
    job.wait_state("RUNNING", timeout=120)
    # Until rank 0 is two batches into the validation of step 4 (88 s of it still to go).
    slurm_cluster.wait_for(lambda: sum(e["kind"] == TraceKind.VAL and e["rank"] == 0 and e["step"] == 4
                                       for e in job.records()) >= 2, 120, f"job {job.id} to be validating at step 4")
    submit_high(tmp_path, slurm_jobs)
    job.wait_restarts(1)
    assert_finished_like_reference(job, reference_run, **LONG_VALIDATION)
    events = job.events()
    stop = [e for e in events if e["event"] == Event.STOP_AGREED and e["restart_count"] == 0]
    assert [(e["place"], e["step"]) for e in stop] == [(Place.VALIDATION, 4)], stop
    assert 2 <= stop[0]["batch"] < LONG_VALIDATION["val_batches"], f"not stopped inside the validation: {stop}"
    owed = [e for e in events if e["event"] == Event.VALIDATION_OWED and e["restart_count"] == 0]
    assert len(owed) == 1 and owed[0]["path"], owed
    assert [e["restart_count"] for e in events if e["event"] == Event.VALIDATION_REDONE] == [1]
