"""Requeue backends chosen from the environment, their errors, and run-directory resolution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from preemptible.core.environment import JobEnvironment
from preemptible.core.requeue import LocalRequeue, RequeueError, SlurmRequeue, SubmititRequeue, select_backend
from preemptible.core.rundir import RunDirError, resolve_run_dir


def _env(**kw: str) -> JobEnvironment:
    return JobEnvironment.from_env(kw)


def test_auto_backend_follows_the_environment() -> None:
    assert isinstance(select_backend("auto", _env()), LocalRequeue)
    assert isinstance(select_backend("auto", _env(SLURM_JOB_ID="12")), SlurmRequeue)
    assert isinstance(select_backend("auto", _env(SLURM_JOB_ID="12", SUBMITIT_FOLDER="/x")), SubmititRequeue)
    with pytest.raises(ValueError, match="choose one of"):
        select_backend("kubernetes", _env())


def test_array_tasks_are_requeued_by_array_id() -> None:
    env = _env(SLURM_JOB_ID="101", SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="3", SLURM_RESTART_COUNT="2")
    assert env.requeue_job_id == "100_3" and env.restart_count == 2


def test_missing_scontrol_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RequeueError, match="not on PATH.*checkpoint is committed") as err:
        SlurmRequeue().request(_env(SLURM_JOB_ID="5"))
    assert err.value.code == 1


def test_failing_scontrol_reports_its_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A real executable that fails the way scontrol does when the job was not submitted with --requeue.
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'scontrol: error: Requested operation is presently disabled for job 5' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RequeueError, match="presently disabled.*--requeue"):
        SlurmRequeue().request(_env(SLURM_JOB_ID="5"))


def test_run_dir_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREEMPTIBLE_RUN_DIR", raising=False)
    assert resolve_run_dir("explicit") == Path("explicit")
    assert resolve_run_dir(None, _env(SLURM_JOB_ID="77")) == Path("runs/77")
    with pytest.raises(RunDirError, match="PREEMPTIBLE_RUN_DIR"):
        resolve_run_dir(None, _env())
    # $PREEMPTIBLE_RUN_DIR beats the SLURM default; it is read where every variable is (JobEnvironment).
    assert resolve_run_dir(None, _env(SLURM_JOB_ID="77", PREEMPTIBLE_RUN_DIR="/from/env")) == Path("/from/env")
    monkeypatch.setenv("PREEMPTIBLE_RUN_DIR", "/from/env")
    assert resolve_run_dir(None) == Path("/from/env")


def test_already_requeued_job_counts_as_requeued(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # What scontrol answers when an operator's `scontrol requeue` (or a preemption) got there first.
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'Job is pending execution for job 5' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    outcome = SlurmRequeue().request(_env(SLURM_JOB_ID="5"))
    assert outcome.requested and "already requeued" in outcome.detail
