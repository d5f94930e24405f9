"""The submitit face of preemptible: ``PreemptibleTask``.

::

    import submitit
    from preemptible.scheduler.submitit import PreemptibleTask

    executor = submitit.AutoExecutor(folder="logs")
    job = executor.submit(PreemptibleTask(train, cfg, run_dir="runs/exp1"))
    job.result()   # train(cfg)'s return value, after any number of preemptions

``train`` builds its own ``Trainer`` with a ``PreemptionCallback()`` (no arguments needed: the task
exports ``PREEMPTIBLE_RUN_DIR``) and calls ``trainer.fit(..., ckpt_path=cb.resume_path())``.

How the two libraries share the signal: submitit installs its handlers when the task starts
(SIGUSR2 → checkpoint-and-requeue *inside the handler*, rank 0 only; SIGTERM/SIGCONT → log
"Bypassing"). While ``trainer.fit`` runs, the callback's recording handlers replace them, so the
emergency checkpoint is taken by the training loop at an agreed step on **all** ranks, and rank 0
requeues (``scontrol requeue`` on SLURM; exit code 144, which submitit's ``LocalExecutor``
relaunches, locally). submitit's own handler is back in place outside ``fit`` (data preparation,
code after training); a signal there goes through :meth:`PreemptibleTask.checkpoint`, which
resubmits the same task — it resumes from the run directory's newest checkpoint.

Cancelling: ``job.cancel()`` is ``scancel``; the ranks checkpoint, the session sees the job
cancelled (:mod:`preemptible.core.cause`) and ends it without a requeue (exit 143, the job ends CANCELLED).
submitit's own timeout (``--signal=USR2@90`` before ``timeout_min``) and a preemption requeue as usual.

Timeouts: submitit tells a timeout from a preemption by elapsed time only and spends its
``max_num_timeout`` budget on each one it handles. Signals handled by preemptible during ``fit``
never reach submitit's handler, so they are not spent from that budget; preemptible's own
``max_requeues`` (counted from ``SLURM_RESTART_COUNT`` and ``run.json``) bounds requeue loops.

Crashes: submitit's sbatch script has no step after ``srun`` (where the batch shell of the sbatch templates
decides, :mod:`preemptible.scheduler.afterstep`), so the ranks decide themselves. While the training function
runs, the task is the process's in-process supervisor (:mod:`preemptible.core.supervisor`): when a rank dies
without warning (SIGKILL, OOM kill, segfault) or freezes, the peer watchdog of every survivor calls it right
before ending the process (its main thread may be stuck in a collective for good), and so does the task when
the collective error itself reaches it (watchdog turned off). The first survivor to claim the attempt
(an ``O_EXCL`` file in the run directory, whichever ranks survive, rank 0 included) applies the rule and bounds
of :mod:`preemptible.core.crashes` (``max_crash_requeues``; the crash loop), never while the job is being
cancelled, and on a requeue runs ``scontrol requeue`` under SLURM and leaves with
:data:`~preemptible.REQUEUE_EXIT_CODE`, the code on which ``LocalExecutor`` relaunches every task. The other
survivors leave with :data:`~preemptible.core.exit.CRASH_EXIT_CODE`. The job resumes from the newest valid
periodic checkpoint. An exception of the training code itself is raised as before (submitit reports it; no retry).

``LocalExecutor`` gives a relaunched task no restart count; the task numbers the attempts itself (exported as
``PREEMPTIBLE_ATTEMPT``) from the claims the ended attempts left in the run directory, so that the crash rule
and the journal tell the attempts apart there as on SLURM.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Optional

import submitit

from preemptible.core import supervisor
from preemptible.core.crashes import failure_kind
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import CRASH_EXIT_CODE, REQUEUE_EXIT_CODE, Preempted
from preemptible.core.schema import FailureKind

__all__ = ["PreemptibleTask"]


class PreemptibleTask(submitit.helpers.Checkpointable):
    """A submitit callable that runs ``train_fn(*args, **kwargs)`` as a preemptible run.

    Args:
        train_fn: the training function; it creates the ``Trainer`` with a ``PreemptionCallback``.
        run_dir: the run directory, shared by every requeue of the job (exported as ``PREEMPTIBLE_RUN_DIR``).
        max_requeues: preemptible's requeue limit for this run (exported as ``PREEMPTIBLE_MAX_REQUEUES``).
        distributed_env: for multi-task jobs outside SLURM (``LocalExecutor`` with ``tasks_per_node > 1``),
            export ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``, ``NODE_RANK`` and ``WORLD_SIZE`` from
            submitit's job environment so that Lightning's DDP finds its peers. Under SLURM, Lightning reads
            SLURM's variables itself and nothing is exported.
    """

    def __init__(self, train_fn: Callable[..., Any], *args: Any, run_dir: str | os.PathLike[str],
                 max_requeues: Optional[int] = None, distributed_env: bool = True, **kwargs: Any) -> None:
        if not callable(train_fn):
            raise TypeError(f"PreemptibleTask needs a callable training function, got {type(train_fn).__name__}")
        self.train_fn = train_fn
        self.args = args
        self.kwargs = kwargs
        self.run_dir = os.fspath(run_dir)
        self.max_requeues = max_requeues
        self.distributed_env = distributed_env

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.run_dir = run_dir = os.path.abspath(self.run_dir)  # in the job's own working directory
        os.environ["PREEMPTIBLE_RUN_DIR"] = run_dir
        if self.max_requeues is not None:
            os.environ["PREEMPTIBLE_MAX_REQUEUES"] = str(self.max_requeues)
        if self.distributed_env:
            _export_distributed_env()
        if not JobEnvironment.from_env().under_slurm:
            # LocalExecutor: no restart count of its own (see the module's docstring)
            os.environ["PREEMPTIBLE_ATTEMPT"] = str(supervisor.claimed_attempts(run_dir, _job_key(JobEnvironment.from_env())))
        # The in-process supervisor of a crash (core/supervisor.py), with this task's job key (LocalExecutor's too).
        previous = supervisor.set_crash_supervisor(
            supervisor.RankCrashSupervisor(run_dir, job_key=_job_key, log_hint="the submitit logs"))
        try:
            return self.train_fn(*(args or self.args), **(kwargs or self.kwargs))
        except Exception as exc:
            # Without the watchdog (peer_timeout 0) the collective error itself reaches this point.
            if failure_kind(exc) == FailureKind.PEER and supervisor.crash_exit_code(CRASH_EXIT_CODE) == REQUEUE_EXIT_CODE:
                raise Preempted(reason=f"crash: {type(exc).__name__}") from exc
            raise
        except SystemExit as exc:
            if exc.code == REQUEUE_EXIT_CODE:  # a preemption requeue: the next attempt is numbered after this one
                self._claim_relaunch(JobEnvironment.from_env())
            raise
        finally:
            supervisor.set_crash_supervisor(previous)

    def _claim_relaunch(self, env: JobEnvironment) -> None:
        """Outside SLURM, note a preemption's relaunch as a claim: ``LocalExecutor`` numbers no attempts itself."""
        if not env.under_slurm:  # SLURM counts the restarts itself
            supervisor.claim_attempt(self.run_dir, _job_key(env), env.restart_count, env.global_rank, "requeue")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's own handler when a signal arrives outside ``trainer.fit``.

        Nothing needs saving there: the run directory already holds the newest checkpoint, and the
        same task resumes from it.
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _job_key(env: JobEnvironment) -> str:
    """The job's id for the claims: SLURM's, or the ``LocalExecutor`` job's (its controller's pid)."""
    return env.job_id or f"local-{submitit.JobEnvironment().job_id}"


def _export_distributed_env() -> None:
    env = submitit.JobEnvironment()
    if env.num_tasks <= 1 or JobEnvironment.from_env().under_slurm:
        return  # one task, or SLURM: Lightning's SLURMEnvironment reads the ranks itself
    port = os.environ.get("MASTER_PORT") or str(random.Random(env.job_id).randint(20000, 60000))
    per_node = env.num_tasks // env.num_nodes
    os.environ.update(
        MASTER_ADDR=env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1",
        MASTER_PORT=port,
        LOCAL_RANK=str(env.local_rank),
        NODE_RANK=str(env.node),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_WORLD_SIZE=str(per_node),
    )
