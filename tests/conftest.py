from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ReferenceForkServer, example_command  # noqa: E402

from preemptible.tools.testing import run_preempted  # noqa: E402

# Child processes must not inherit a run directory from the developer's shell.
os.environ.pop("PREEMPTIBLE_RUN_DIR", None)
os.environ.pop("SLURM_JOB_ID", None)

#: Example options that change when and how a run is checkpointed or paced, never its numbers: an
#: uninterrupted reference run is the same without them, so they are left out of its configuration
#: (one reference then serves every test of that configuration, and the comparison also checks that
#: periodic saves, slow steps and test holds leave every loss and weight as they are).
TIMING_ONLY_OPTIONS = frozenset({"step_sleep", "slow_until_resumed", "slow_attempts", "every_n_steps",
                                 "every_n_minutes", "sync_periodic", "hold_for_signal", "hold_until_exists",
                                 # the same numbers under either Lightning package, and whoever finds the checkpoint
                                 "namespace", "no_ckpt_path", "val_sleep", "epoch_end_sleep"})


FORK_REFERENCES = os.environ.get("PREEMPTIBLE_TEST_FORK_REFERENCES", "1") != "0"

#: Test files whose tests share a costly module- or session-scoped run: under pytest-xdist each goes to one
#: worker as a whole, so that run is made once (tests/test_status_report.py: ``preempted_run``;
#: tests/test_run_safety.py: ``finished_run``).
SHARED_RUN_FILES = ("tests/test_status_report.py", "tests/test_run_safety.py")


def xdist_scope(nodeid: str) -> str:
    """The unit of work pytest-xdist hands to one worker: every SLURM test together (they share the one-node
    cluster, so they run one after the other in one worker while the other worker runs the rest), a
    file of :data:`SHARED_RUN_FILES` together, any other test alone."""
    if nodeid.startswith("tests/slurm/"):
        return "slurm"
    path = nodeid.split("::", 1)[0]
    return path if path in SHARED_RUN_FILES else nodeid


class _XdistScheduling:
    """Registered when pytest-xdist is there: ``--dist loadgroup`` (``make test``) schedules by :func:`xdist_scope`.

    (pytest-xdist's own loadgroup reads ``xdist_group`` marks by renaming node ids, which pytest 9.2's
    structured node ids no longer allow; the scopes here are plain functions of the node id.)
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class ScopeScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return xdist_scope(nodeid)

        return ScopeScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistScheduling(), "preemptible-xdist-scheduling")


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory all pytest-xdist workers of this session see (the session's own base without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """An uninterrupted run's record for a configuration, computed once per session and shared.

    Shared across pytest-xdist workers too: the first worker to ask computes it under a file lock, the
    others wait for it and read the same record. The run is forked from a process that has imported
    Lightning once (:class:`helpers.ReferenceForkServer`); ``PREEMPTIBLE_TEST_FORK_REFERENCES=0`` launches
    it as a fresh process instead, as the preempted runs are.
    """
    root = _shared_dir(tmp_path_factory) / "references"
    root.mkdir(parents=True, exist_ok=True)
    servers: list[ReferenceForkServer] = []

    def get(**config: Any) -> Path:
        config = {k: v for k, v in config.items() if k not in TIMING_ONLY_OPTIONS}
        key = hashlib.sha1(json.dumps(sorted(config.items()), default=str).encode()).hexdigest()[:16]
        base = root / key
        record, done = base / "record.jsonl", base / "done"
        with open(root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(base, ignore_errors=True)  # what an earlier, failed try left
                base.mkdir()
                (base / "config.json").write_text(json.dumps(config, default=str))
                command = example_command(record, **config)
                if FORK_REFERENCES:
                    if not servers:
                        servers.append(ReferenceForkServer(root / f"server-{os.getpid()}.log"))
                    assert command[1:3] == ["-m", "preemptible.examples.train"], command
                    codes = servers[0].run(command[3:], devices=int(config.get("devices", 1)), log=base / "log.txt",
                                           env={"PREEMPTIBLE_RUN_DIR": str(base / "run"), "PREEMPTIBLE_ATTEMPT": "0"},
                                           timeout=240)
                    assert codes and set(codes) == {0}, f"exit codes {codes}\n" + (base / "log.txt").read_text()[-3000:]
                else:
                    summary = run_preempted(command, run_dir=base / "run", timeout=240, log=base / "log.txt")
                    assert summary.exit_code == 0, (base / "log.txt").read_text()[-3000:]
                done.touch()
        return record

    yield get
    for server in servers:
        server.close()
