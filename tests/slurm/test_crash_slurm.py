"""Failures without warning on the real two-node cluster, with the ddp template (``--nodes 2``, one rank per node).

* a rank SIGKILLed (as by the OOM killer): the batch shell requeues the job by itself, it resumes from the
  newest periodic checkpoint and finishes bitwise; in the same job, the next attempt is preempted by a
  2-node ``high`` job and resumes bitwise too;
* a crash loop (killed twice before any checkpoint): stopped, with the message in the log, the journal,
  run.json and ``preemptible status``;
* ``scontrol`` hidden from the ranks (a container): the ranks checkpoint and exit 144, the batch shell
  requeues;
* a lost node (NODE_FAIL): slurmd of ``n2`` and the job's processes there are killed and the node is
  marked down, as slurmctld does once it stops hearing from it; SLURM requeues the job (``--requeue``),
  which resumes from its periodic checkpoint once ``n2`` is back.

Every wait is bounded (conftest's ``wait_for``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from helpers import assert_same_after_crash, example_command

from preemptible.core.exit import CRASH_EXIT_CODE
from preemptible.core.schema import CrashDecision, Event, RequeueOutcomeName, RunRecordKey, RunStatus, read_events
from preemptible.core.watchdog import LossKind

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]

STEPS = 40
NODES = 2
JOB_TIMEOUT = 300
PYTHON = sys.executable


class NodesJob:
    """A 2-node job of the example training (one rank per node) submitted with ``preemptible sbatch``."""

    def __init__(self, tmp_path: Path, cluster: SlurmCluster, jobs: list[str], name: str, *options: str,
                 wrap: list[str] | None = None, env: dict[str, str] | None = None, **train: Any) -> None:
        self.cluster = cluster
        self.run_dir = tmp_path / "run"
        self.record = tmp_path / "record.jsonl"
        command = example_command(self.record, max_steps=STEPS, devices=1, num_nodes=NODES, **train)
        tmp_path.mkdir(parents=True, exist_ok=True)
        # One intra-op thread per rank, as in the reference (2 ranks on 2 cores, where Lightning picks 1): another
        # thread count changes float sums. sbatch hands the submitting environment to the job.
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        done = subprocess.run([PYTHON, "-m", "preemptible.cli", "sbatch", "--template", "ddp", "--nodes", str(NODES),
                               "--ntasks-per-node", "1", "--cpus-per-task", "1", "--partition", "low",
                               "--job-name", f"pt-{name}", "--run-dir", str(self.run_dir), *options, "--",
                               *(wrap or []), *command], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env=env)
        assert done.returncode == 0, done.stderr
        self.id = done.stdout.strip()
        jobs.append(self.id)
        self.log = self.run_dir / f"slurm-{self.id}.out"

    def info(self) -> dict[str, str]:
        info = self.cluster.job_info(self.id)
        assert info is not None, f"SLURM forgot job {self.id}{self.tail()}"
        return info

    def wait_state(self, *states: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        return self.cluster.wait_job_state(self.id, states, timeout, log=self.log)

    def wait_restarts(self, count: int, timeout: float = 180) -> None:
        self.cluster.wait_for(lambda: int(self.info().get("Restarts", "0")) >= count, timeout,
                              f"job {self.id} to be requeued {count} time(s){self.tail()}")

    def events(self) -> list[dict[str, Any]]:
        return list(read_events(self.run_dir))

    def wait_event(self, kind: str, attempt: int, timeout: float = 120, min_step: int | None = None,
                   **fields: Any) -> dict[str, Any]:
        """The first ``kind`` event of ``attempt`` with these fields (and a step of at least ``min_step``)."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events() if e["event"] == kind and e["restart_count"] == attempt
                         and all(e.get(k) == v for k, v in fields.items())
                         and (min_step is None or (e.get("step") or 0) >= min_step)), None)
        return self.cluster.wait_for(found, timeout, f"{kind} {fields} in attempt {attempt} of job {self.id}{self.tail()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        return f"\n--- {self.log} ---\n{self.text()[-4000:]}"


def submit_high(tmp_path: Path, jobs: list[str]) -> str:
    """A short job on ``high`` that takes both nodes whole: it preempts the 2-node ``low`` job."""
    done = subprocess.run(["sbatch", "--parsable", "--partition=high", "--exclusive", f"--nodes={NODES}",
                           "--ntasks-per-node=1", "--job-name=pt-high", f"--output={tmp_path}/high-%j.out",
                           "--wrap=sleep 3"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    jobs.append(done.stdout.strip().split(";")[0])
    return jobs[-1]


def crash_decisions(job: NodesJob) -> list[str]:
    return [e["decision"] for e in job.events() if e["event"] == Event.CRASH]


def train_start(job: NodesJob, attempt: int) -> int:
    return next(e["step"] for e in job.events() if e["event"] == Event.TRAIN_START and e["restart_count"] == attempt)


@pytest.mark.timeout(3 * JOB_TIMEOUT)
def test_two_nodes_crash_requeued_by_itself_then_preempted_resume_bitwise(
        tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str], reference_run) -> None:
    """Attempt 0: rank 1 (node n2) SIGKILLs itself at step 6, after the periodic checkpoint of step 4: the
    batch shell requeues. Attempt 1 resumes at 4 and is preempted by a 2-node ``high`` job. Attempt 2 finishes.
    Every loss and the final weights are bitwise those of an uninterrupted 2-rank run."""
    reference = reference_run(max_steps=STEPS, devices=2)
    # Rank 1 dies on another node: rank 0 learns it from its silence (peer_timeout, 10 s here), then ends the step.
    job = NodesJob(tmp_path, slurm_cluster, slurm_jobs, "crash2n", every_n_steps=4, sync_periodic=True,
                   signal_at=["6"], signal_rank=1, signal_name="KILL", step_sleep=0.5, slow_attempts=2,
                   env={"PREEMPTIBLE_PEER_TIMEOUT": "10"})
    job.wait_restarts(1)
    [crash] = [e for e in job.events() if e["event"] == Event.CRASH]
    assert crash["decision"] == CrashDecision.REQUEUE and crash["checkpoint_step"] in (4, 5, 6), crash
    assert "batch shell requeued job" in job.text(), job.tail()
    job.wait_event(Event.TRAIN_START, 1)
    resumed = train_start(job, 1)
    # Under DDP a periodic save lands one or two steps after it is due (the ranks agree on it as on a stop).
    assert resumed == crash["checkpoint_step"], f"attempt 1 resumed at {resumed}, not at the periodic checkpoint {crash}"
    job.wait_event(Event.CHECKPOINT, 1, min_step=8, reason="periodic")
    submit_high(tmp_path, slurm_jobs)
    job.wait_restarts(2)
    info = job.wait_state("COMPLETED")
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "2", info
    stop = next(e["step"] for e in job.events() if e["event"] == Event.STOP_AGREED and e["restart_count"] == 1)
    assert train_start(job, 2) == stop, job.events()
    signalled = {e["rank"] for e in job.events() if e["event"] == Event.SIGNAL and e["restart_count"] == 1}
    assert signalled == {0, 1}, f"both ranks (both nodes) should see the preemption signal: {signalled}"
    assert_same_after_crash(job.record, reference, resumed_at={1: resumed, 2: stop})
    record = json.loads((job.run_dir / "run.json").read_text())
    assert record[RunRecordKey.CRASH_REQUEUES] == 1 and record[RunRecordKey.REQUEUES] == 1, record
    assert record[RunRecordKey.STATUS] == RunStatus.FINISHED, record


@pytest.mark.timeout(3 * JOB_TIMEOUT)
def test_crash_loop_stops_with_the_message_and_scontrol_hidden_from_ranks_requeues(
        tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str], reference_run) -> None:
    """Two jobs, one after the other.

    A: rank 1 SIGKILLed at step 2 in attempts 0 and 1, before the first checkpoint (every 4 steps): the second
    crash without progress ends the job FAILED with "crash loop at step 2" in the log, journal, run.json, status.
    B: the ranks run with a PATH without scontrol (as in a container); ``scancel --signal=USR1`` asks them to
    stop: they checkpoint, exit 144, and the batch shell requeues; the job resumes bitwise and completes.
    """
    loop = NodesJob(tmp_path / "loop", slurm_cluster, slurm_jobs, "crashloop", every_n_steps=4, sync_periodic=True,
                    signal_at=["2", "2", "2"], signal_rank=1, signal_name="KILL", env={"PREEMPTIBLE_PEER_TIMEOUT": "10"})
    info = loop.wait_state("FAILED")
    assert info["Restarts"] == "1", info
    assert crash_decisions(loop) == [CrashDecision.REQUEUE, CrashDecision.CRASH_LOOP], loop.events()
    text = " ".join(loop.text().split())
    assert "crash loop at step 2" in text and f"See slurm-{loop.id}.out" in text, loop.tail()
    record = json.loads((loop.run_dir / "run.json").read_text())
    assert record[RunRecordKey.STATUS] == RunStatus.CRASH_LOOP, record
    status = subprocess.run([PYTHON, "-m", "preemptible.cli", "status", str(loop.run_dir)], capture_output=True,
                            text=True, timeout=60)
    assert "crash loop at step 2" in " ".join(status.stdout.split()), status.stdout

    reference = reference_run(max_steps=STEPS, devices=2)
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "python").symlink_to(PYTHON)
    hidden = NodesJob(tmp_path / "hidden", slurm_cluster, slurm_jobs, "noscontrol",
                      wrap=["/usr/bin/env", f"PATH={bare}"], step_sleep=0.3, slow_attempts=1)
    hidden.wait_event(Event.TRAIN_START, 0)
    subprocess.run(["scancel", "--signal=USR1", hidden.id], check=True, timeout=30)
    hidden.wait_restarts(1)
    info = hidden.wait_state("COMPLETED")
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", info
    outcomes = [e["outcome"] for e in hidden.events() if e["event"] == Event.REQUEUE]
    assert outcomes == [RequeueOutcomeName.DELEGATED], outcomes
    assert crash_decisions(hidden) == [CrashDecision.SHELL_REQUEUE], hidden.events()
    assert "batch shell requeued job" in hidden.text(), hidden.tail()
    stop = next(e["step"] for e in hidden.events() if e["event"] == Event.STOP_AGREED)
    assert train_start(hidden, 1) == stop
    assert_same_after_crash(hidden.record, reference, resumed_at={1: stop})


def _slurmd_pid(cluster: SlurmCluster, node: str) -> int | None:
    try:
        pid = int((cluster.state_dir / f"slurmd-{node}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        # A SIGKILLed slurmd may stay a zombie here (this machine's init need not reap it): that is not alive.
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        alive = False
    return pid if alive else None


def _job_processes_on(job_id: str, node: str) -> list[psutil.Process]:
    """The job's task processes on ``node`` and their slurmstepd (both slurmd run on this one machine)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME") == node and env.get("SLURM_STEP_ID") != "batch":
            found[proc.pid] = proc
            parent = proc.parent()
            if parent is not None and "slurmstepd" in " ".join(parent.cmdline()):
                found[parent.pid] = parent
    return list(found.values())


@pytest.mark.timeout(3 * JOB_TIMEOUT)
def test_node_failure_requeues_and_resumes_from_the_periodic_checkpoint(
        tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str], reference_run) -> None:
    """slurmd of n2 and the job's processes there are SIGKILLed after the periodic checkpoint of step 4 and n2 is
    marked down (NODE_FAIL): SLURM requeues the job; once n2 is back it resumes at step 4 and finishes bitwise."""
    reference = reference_run(max_steps=STEPS, devices=2)
    job = NodesJob(tmp_path, slurm_cluster, slurm_jobs, "nodefail", every_n_steps=4, sync_periodic=True,
                   step_sleep=0.5, slow_attempts=1)
    checkpoint = job.wait_event(Event.CHECKPOINT, 0, min_step=4, reason="periodic")["step"]
    node = "n2"
    slurmd = _slurmd_pid(slurm_cluster, node)
    assert slurmd is not None, f"no slurmd for {node}"
    try:
        victims = _job_processes_on(job.id, node)
        assert victims, f"no process of job {job.id} on {node}"
        for proc in [psutil.Process(slurmd), *victims]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=preemptible-test-node-fail"],
                       check=True, timeout=30)
        job.wait_restarts(1)
        # The job is back in the queue, for both nodes: it cannot run until n2 returns.
        assert job.info().get("JobState") in ("COMPLETING", "PENDING", "REQUEUED", "CONFIGURING", "RUNNING"), job.info()
    finally:
        # The cluster is shared: bring the node back whatever happened above.
        if _slurmd_pid(slurm_cluster, node) is None:
            subprocess.run(["slurmd", "-N", node], check=False, timeout=60)
        slurm_cluster.wait_for(lambda: _slurmd_pid(slurm_cluster, node), 60, f"slurmd {node} to start")
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False, timeout=30)
        # "idle*": slurmctld has not heard from the node yet; the job needs it responding.
        slurm_cluster.wait_for(lambda: node_state(node) in ("idle", "allocated", "mixed", "completing"), 120,
                               f"node {node} to come back and respond")
    info = job.wait_state("COMPLETED")
    assert info["ExitCode"] == "0:0", info
    resumed = train_start(job, int(info["Restarts"]))
    assert resumed >= checkpoint, f"the requeued attempt started at step {resumed}, before the checkpoint at {checkpoint}"
    assert_same_after_crash(job.record, reference, resumed_at={int(info["Restarts"]): resumed})


def node_state(node: str) -> str:
    done = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


@pytest.mark.timeout(3 * JOB_TIMEOUT)
def test_frozen_rank_leaves_within_the_bound_and_recovers(
        tmp_path: Path, slurm_cluster: SlurmCluster, slurm_jobs: list[str], reference_run) -> None:
    """Rank 1 (node n2) SIGSTOPs itself at step 6. Rank 0 (n1) is on another host (the nodes share this machine's
    host name; the watchdog tells them apart by SLURM node name), so it cannot kill it: once rank 1 is silent for
    peer_timeout (6 s) rank 0 journals peer_lost and ends the whole step (``scancel --ctld --signal=KILL JOB.0``); srun
    returns, the batch shell counts a crash and requeues, and the job resumes bitwise from the newest periodic
    checkpoint. The step's end is bounded by ``step_end_bound`` (11 s here); the wait for the requeue (120 s) is far
    below gloo's 30-minute collective timeout, which is what the frozen rank would otherwise cost."""
    reference = reference_run(max_steps=STEPS, devices=2)
    job = NodesJob(tmp_path, slurm_cluster, slurm_jobs, "frozen", every_n_steps=4, sync_periodic=True,
                   signal_at=["6"], signal_rank=1, signal_name="STOP", step_sleep=0.3, slow_attempts=1,
                   env={"PREEMPTIBLE_PEER_TIMEOUT": "6"})
    job.wait_restarts(1, timeout=120)
    [crash] = [e for e in job.events() if e["event"] == Event.CRASH]
    assert crash["decision"] == CrashDecision.REQUEUE, crash
    lost = [e for e in job.events() if e["event"] == Event.PEER_LOST and e["restart_count"] == 0]
    assert [(e["rank"], e["lost_rank"], e["how"]) for e in lost] == [(0, 1, LossKind.SILENT)], job.events()
    # The path taken: no kill on the same host; the step ended by rank 0, which killed it (and rank 1) by SIGKILL.
    text = job.text()
    ended = re.search(rf"rank 0: rank 1 \(pid (\d+) on [^ ]+/n2\) is silent on another host: ending SLURM step "
                      rf"{job.id}\.0 ", text)
    assert ended is not None and "killed frozen rank" not in text, job.tail()
    assert "batch shell requeued job" in text, job.tail()
    frozen = int(ended.group(1))  # both nodes run on this machine, so the frozen process can be looked at here
    assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() != psutil.STATUS_STOPPED, \
        f"the frozen rank (pid {frozen}) is still stopped"
    # srun's exit after its step was SIGKILLed (137), or rank 0's crash code if it left before the kill reached it
    assert crash["exit_code"] in (137, CRASH_EXIT_CODE), crash
    info = job.wait_state("COMPLETED")
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", info
    assert_same_after_crash(job.record, reference, resumed_at={1: crash["checkpoint_step"]})
