"""The real SLURM cluster for tests (two nodes on this machine), and helpers to watch its jobs.

``slurm_cluster`` starts the cluster with ``docker/slurm/cluster.sh start --nodes 2`` (or finds it up),
exports ``SLURM_CONF`` and yields a :class:`SlurmCluster`. Where this machine cannot run a
cluster (not root, no apt) the tests skip, unless ``PREEMPTIBLE_REQUIRE_SLURM=1`` (set by CI),
which turns that skip into a failure: CI must never pass by skipping the real thing.

Every wait polls with a timeout; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "docker" / "slurm" / "cluster.sh"
#: cluster.sh's exit code for "this machine cannot run a cluster" (not root, no apt).
UNSUPPORTED = 3
#: Jobs the tests submit are named with this prefix, so stale ones can be told from others.
JOB_PREFIX = "pt-"
#: Job states after which a job never runs again by itself.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"})

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        AssertionError: after ``timeout`` seconds, naming ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _slurm(*args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check)


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value2`` (one ``scontrol show -o`` record) as a dict.

    A word without ``=`` belongs to the previous value (values such as ``Reason`` may hold spaces).
    """
    info: dict[str, str] = {}
    key: str | None = None
    for word in line.split():
        name, sep, value = word.partition("=")
        if sep and name:
            key = name
            info[key] = value
        elif key is not None:
            info[key] += " " + word
    return info


def job_info(job_id: str) -> dict[str, str] | None:
    """``scontrol show job -o JOB`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``Reason``...).

    ``None`` once SLURM has forgotten the job (``MinJobAge`` after it ended).
    """
    done = _slurm("scontrol", "show", "job", "-o", str(job_id), check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return parse_scontrol_line(done.stdout.splitlines()[0])


def _log_tail(log: Path | None, chars: int = 4000) -> str:
    if log is None:
        return ""
    try:
        return f"\n--- {log} (tail) ---\n" + Path(log).read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"\n--- {log}: {exc} ---"


def wait_job_state(job_id: str, states: Iterable[str], timeout: float, log: Path | None = None) -> dict[str, str]:
    """Wait until the job is in one of ``states``; returns its :func:`job_info`.

    Fails at once, with the job log's tail, when the job reaches another final state.
    """
    wanted = set(states)
    last: dict[str, Any] = {}

    def reached() -> dict[str, str] | None:
        info = job_info(job_id)
        if info is None:
            raise AssertionError(f"SLURM no longer knows job {job_id} (last seen {last}){_log_tail(log)}")
        last.clear()
        last.update(info)
        state = info.get("JobState", "")
        if state in wanted:
            return info
        if state in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended {state} (ExitCode={info.get('ExitCode')}, "
                                 f"Reason={info.get('Reason')}), expected {sorted(wanted)}{_log_tail(log)}")
        return None

    try:
        return wait_for(reached, timeout, f"job {job_id} to reach {sorted(wanted)}")
    except AssertionError as exc:
        if "timed out" in str(exc):
            raise AssertionError(f"{exc}; last: JobState={last.get('JobState')} Restarts={last.get('Restarts')} "
                                 f"Reason={last.get('Reason')}{_log_tail(log)}") from None
        raise


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster: where its files are, and its helpers."""

    state_dir: Path
    conf: Path
    jobcomp: Path

    # Test modules reach the helpers through the fixture: importing this conftest by name would
    # pick whichever conftest.py pytest loaded last.
    wait_for = staticmethod(wait_for)

    def job_info(self, job_id: str) -> dict[str, str] | None:
        return job_info(job_id)

    def wait_job_state(self, job_id: str, states: Iterable[str], timeout: float,
                       log: Path | None = None) -> dict[str, str]:
        return wait_job_state(job_id, states, timeout, log)

    def jobcomp_records(self, job_id: str) -> list[dict[str, str]]:
        """The jobcomp file's lines for ``job_id``: one per ended attempt (requeued ones included)."""
        if not self.jobcomp.exists():
            return []
        records = (parse_scontrol_line(line) for line in self.jobcomp.read_text().splitlines())
        return [r for r in records if r.get("JobId") == str(job_id)]

    def cancel(self, job_ids: Iterable[str], timeout: float = 60) -> None:
        """Cancel jobs and wait until none of them holds the node any more."""
        ids = [str(j) for j in job_ids]
        if not ids:
            return
        _slurm("scancel", *ids, check=False)

        def gone() -> bool:
            for job in ids:
                info = job_info(job)
                if info is not None and info.get("JobState") not in FINAL_STATES:
                    return False
            return True

        wait_for(gone, timeout, f"cancelled jobs {ids} to end")

    def cancel_test_jobs(self, timeout: float = 60) -> None:
        """Cancel what earlier, interrupted test sessions left queued (jobs named ``pt-*``)."""
        listing = _slurm("squeue", "-h", "-o", "%i %j", check=False).stdout.split("\n")
        stale = [line.split()[0] for line in listing if line.strip() and line.split()[1].startswith(JOB_PREFIX)]
        self.cancel(stale, timeout)


#: The cluster the tests expect (what .ci/run starts): multi-node tests need two nodes.
NODES = 2


def _cluster_sh(command: str, timeout: float, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SH), command, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start (or find) the local cluster; stop it at the end only if this session started it."""
    required = os.environ.get("PREEMPTIBLE_REQUIRE_SLURM") == "1"

    def unavailable(reason: str) -> None:
        if required:
            pytest.fail(f"{reason}; PREEMPTIBLE_REQUIRE_SLURM=1 forbids skipping the SLURM tests", pytrace=False)
        pytest.skip(reason)

    state_dir = Path(os.environ.get("PREEMPTIBLE_SLURM_DIR", "/tmp/preemptible-slurm"))
    conf = state_dir / "slurm.conf"
    was_up = _cluster_sh("status", timeout=60).returncode == 0
    if not was_up:
        if os.geteuid() != 0:
            unavailable("the local SLURM cluster needs root (docker/slurm/cluster.sh start runs slurmd and munged)")
        # Generous: a first start may install slurm-wlm and munge with apt.
        started = _cluster_sh("start", 600, "--nodes", str(NODES))
        if started.returncode == UNSUPPORTED:
            unavailable(f"cannot start a SLURM cluster here: {started.stderr.strip()[-500:]}")
        if started.returncode != 0:
            pytest.fail(f"docker/slurm/cluster.sh start failed (exit {started.returncode}):\n"
                        f"{started.stderr[-3000:]}\nlogs in {state_dir}", pytrace=False)
    os.environ["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(state_dir=state_dir, conf=conf, jobcomp=state_dir / "jobcomp.log")
    cluster.cancel_test_jobs()
    try:
        yield cluster
    finally:
        if not was_up:
            _cluster_sh("stop", timeout=120)


@pytest.fixture
def slurm_jobs(slurm_cluster: SlurmCluster) -> Iterator[list[str]]:
    """A list a test appends its job ids to; they are cancelled (and awaited) after the test,
    so the next test finds the node free whatever happened."""
    jobs: list[str] = []
    yield jobs
    slurm_cluster.cancel(jobs)
