"""The in-process supervisor: who decides, inside the ranks themselves, what follows a crash.

Most supervisors of an attempt run *after* it, outside the ranks: the batch shell of the sbatch
templates (:mod:`preemptible.scheduler.afterstep`), ``preemptible run``. submitit's own sbatch
script has no step after ``srun``, so there the ranks must decide before they leave. This module
is the meeting point, free of submitit and Lightning:

* the supervisor registers a hook with :func:`set_crash_supervisor`: the submitit task
  (:class:`preemptible.scheduler.submitit.PreemptibleTask`) for the time it runs the training function;
  failing that, the session itself registers a :class:`RankCrashSupervisor` in any job that submitit's
  own sbatch script started (``SUBMITIT_EXECUTOR=slurm``: hydra-submitit-launcher, a plain
  ``executor.submit(train)``), since no batch shell decides after ``srun`` there either;
* a rank about to leave because a peer died or froze calls :func:`crash_exit_code`: the session on
  its peer watchdog's thread (:meth:`~preemptible.core.peers.PeerGuard._peer_lost`, right
  before the process ends; its main thread may be stuck in a collective for good), or the
  supervisor itself when the main thread sees the collective error (no watchdog). The hook runs once
  per process and answers the exit code to leave with (``None``: keep the crash code).

Exactly one process decides per attempt, whichever ranks survive: :func:`claim_attempt` creates
``<run_dir>/supervisor/attempt-<job>-<attempt>`` with ``O_CREAT | O_EXCL``, atomic on a local and on
an NFS (v3+) filesystem, and the run directory is shared by every rank (checked at start). The first
rank to get there wins; the others leave with the crash code. "The lowest surviving rank" would
need every rank to know which peers are still alive, which the watchdog does not give: only rank 0
watches everyone, and it may be the one that died. The rule and its bounds stay in
:func:`preemptible.core.crashes.decide`; the hook calls it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Optional

from preemptible.core.cause import QUERY_TIMEOUT
from preemptible.core.crashes import decide_after_attempt
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import REQUEUE_EXIT_CODE
from preemptible.core.requeue import RequeueError, SlurmRequeue

log = logging.getLogger(__name__)

#: ``hook(exit_code) -> exit code to leave with, or None`` (see the module's docstring).
CrashSupervisor = Callable[[int], Optional[int]]

#: Directory under the run directory for the claims of :func:`claim_attempt`.
SUPERVISOR_DIR = "supervisor"

_lock = threading.Lock()
_hook: Optional[CrashSupervisor] = None
_answer: Optional[int] = None  # the code this process leaves with, once the hook has answered
_decided_here = False  # this process claimed the attempt and decided what follows it


def set_crash_supervisor(hook: Optional[CrashSupervisor]) -> Optional[CrashSupervisor]:
    """Register ``hook`` for this process (``None`` removes it); returns the one it replaces.

    Registering also forgets an earlier answer, so that a process that runs several tasks one after
    the other asks each task's hook.
    """
    global _hook, _answer, _decided_here
    with _lock:
        previous, _hook, _answer, _decided_here = _hook, hook, None, False
    return previous


def has_crash_supervisor() -> bool:
    """Whether a hook is registered in this process."""
    with _lock:
        return _hook is not None


def decided_here() -> bool:
    """Whether this process is the one that claimed the attempt and decided what follows the crash."""
    with _lock:
        return _decided_here


def crash_exit_code(code: int) -> int:
    """The exit code for a rank that leaves on a crash with ``code``: the hook's answer, asked once per process.

    Safe from any thread: the watchdog's and the main thread may both get here; the second gets the
    first one's answer. Without a hook, or when it fails (logged), ``code`` itself.
    """
    global _answer
    with _lock:
        if _answer is not None:
            return _answer
        hook = _hook
        if hook is None:
            return code
        try:
            answer = hook(code)
        except Exception as exc:  # noqa: BLE001 - the process must still leave, with the crash code
            log.warning("preemptible: the crash supervisor failed (%s: %s); leaving with exit code %d",
                        type(exc).__name__, exc, code)
            answer = None
        _answer = code if answer is None else answer
        return _answer


def claim_attempt(run_dir: str | os.PathLike[str], job: str, attempt: int, rank: int, why: str) -> bool:
    """Whether this process is the first to claim the end of attempt ``attempt`` of job ``job``.

    The claimant decides what follows (``why``: ``"crash"``), or notes that the attempt asked to be
    relaunched (``"requeue"``: a supervisor without a restart count, submitit's ``LocalExecutor``,
    numbers its attempts by the claims: :func:`claimed_attempts`). The file keeps who claimed and why.
    """
    directory = Path(run_dir) / SUPERVISOR_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"attempt-{job}-{attempt}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        json.dump({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "why": why}, out)
    return True


def claimed_attempts(run_dir: str | os.PathLike[str], job: str) -> int:
    """How many attempts of job ``job`` have ended with a claim in ``run_dir``."""
    directory = Path(run_dir) / SUPERVISOR_DIR
    return len(list(directory.glob(f"attempt-{job}-*"))) if directory.is_dir() else 0


class RankCrashSupervisor:
    """The supervisor inside the ranks of a job whose batch script runs nothing after ``srun`` (submitit's).

    Registered with :func:`set_crash_supervisor`; called by a rank about to leave on a crash. The first
    rank of the attempt to :func:`claim_attempt` it decides by :func:`preemptible.core.crashes.decide`
    (bounds, crash loop, messages), never while the job is being cancelled; on a requeue it runs
    ``scontrol requeue`` under SLURM and answers :data:`~preemptible.REQUEUE_EXIT_CODE` (which also makes
    submitit's ``LocalExecutor`` relaunch). ``None``: leave with the crash code (no requeue, or another
    rank decides).

    Args:
        run_dir: the run directory (shared by every rank).
        job_key: the job's name in the claims; default: SLURM's job id (a supervisor outside SLURM gives its own).
        log_hint: where the attempt's output is, for the messages.
    """

    def __init__(self, run_dir: str | os.PathLike[str], job_key: Optional[Callable[[JobEnvironment], str]] = None,
                 log_hint: str = "the job's logs") -> None:
        self.run_dir = os.fspath(run_dir)
        self.job_key = job_key or (lambda env: env.job_id or "local")
        self.log_hint = log_hint

    def __call__(self, code: int) -> Optional[int]:
        global _decided_here
        env = JobEnvironment.from_env()
        if not claim_attempt(self.run_dir, self.job_key(env), env.restart_count, env.global_rank, "crash"):
            print(f"preemptible: rank {env.global_rank}: another rank decides what follows this crash", flush=True)
            return None
        _decided_here = True  # (called under the module's lock, by crash_exit_code)
        verdict = decide_after_attempt(self.run_dir, code, env=env, log_hint=self.log_hint,
                                       squeue_timeout=QUERY_TIMEOUT)
        if verdict.message:
            print(verdict.message, flush=True)
        if not verdict.requeue:
            return None
        if env.under_slurm:
            try:
                outcome = SlurmRequeue().request(env)
            except RequeueError as error:
                print(f"preemptible: {error}", flush=True)
                return None
            print(f"preemptible: rank {env.global_rank}: {outcome.detail}", flush=True)
        return REQUEUE_EXIT_CODE
