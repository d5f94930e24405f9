"""How a preempted process ends: the :class:`Preempted` exception and its exit code.

The exit code is shared with submitit's ``LocalExecutor``, which relaunches a task that exits
with 144; ``preemptible run`` relaunches on the same code, so one convention serves both.
"""

from __future__ import annotations

#: Exit code of a process that took an emergency checkpoint and wants to be started again.
#: Anything that supervises training (``preemptible run``, submitit's ``LocalExecutor``, an
#: sbatch script) treats this code as "requeue me", every other code as final.
REQUEUE_EXIT_CODE: int = 144


class Preempted(SystemExit):
    """Raised out of ``trainer.fit`` on every rank after the emergency checkpoint is committed.

    It is a :class:`SystemExit`, so an uncaught one ends the process with
    :data:`REQUEUE_EXIT_CODE` and no traceback, while code after ``trainer.fit`` (saving "final"
    weights, marking the run finished) does not run as if training had completed.

    Attributes:
        step: the global step the checkpoint was taken at (``None`` when stopped before any step).
        checkpoint: path of the committed checkpoint, or ``None``.
        reason: the signal name or other cause, e.g. ``"SIGUSR1"`` or ``"deadline"``.
    """

    def __init__(
        self,
        step: int | None = None,
        checkpoint: str | None = None,
        reason: str = "preempted",
        code: int = REQUEUE_EXIT_CODE,
    ) -> None:
        super().__init__(code)
        self.step = step
        self.checkpoint = checkpoint
        self.reason = reason

    def __str__(self) -> str:
        where = f"at global step {self.step}" if self.step is not None else "before the first step"
        saved = f", checkpoint {self.checkpoint}" if self.checkpoint else ", nothing to save"
        return f"preempted ({self.reason}) {where}{saved}; exit code {self.code}"


class RequeueLimitReached(SystemExit):
    """Raised instead of :class:`Preempted` when the run has used up ``max_requeues``.

    The checkpoint is still written and kept; the process exits with code 1 so that no
    supervisor requeues it again.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


#: Exit code of a process that took its checkpoint and was *cancelled* (``scancel``, submitit's ``job.cancel()``,
#: Ctrl-C/SIGTERM to ``preemptible run``): 128 + SIGTERM, the code of a process terminated on request. It is
#: not :data:`REQUEUE_EXIT_CODE`, so no supervisor relaunches it; SLURM shows the job CANCELLED whatever the code.
CANCELLED_EXIT_CODE: int = 143


class Cancelled(Preempted):
    """Raised instead of :class:`Preempted` when the stop was a cancellation: checkpoint kept, no requeue.

    A subclass of :class:`Preempted`, so code that catches ``Preempted`` to skip the "training done" path
    keeps doing so; its code is :data:`CANCELLED_EXIT_CODE`. Resubmitting the same command resumes from
    the checkpoint.
    """

    def __init__(self, step: int | None = None, checkpoint: str | None = None, reason: str = "cancelled") -> None:
        super().__init__(step=step, checkpoint=checkpoint, reason=reason, code=CANCELLED_EXIT_CODE)

    def __str__(self) -> str:
        where = f"at global step {self.step}" if self.step is not None else "before the first step"
        saved = f", checkpoint {self.checkpoint} kept" if self.checkpoint else ", nothing to save"
        return f"cancelled ({self.reason}) {where}{saved}; not requeued; exit code {self.code}"
#: Exit code of a rank that left because another rank of the job died or froze without warning
#: (SIGKILL, a segfault, an OOM kill, a hung device; see :mod:`preemptible.core.watchdog`). It means
#: "crashed: start again from the newest committed checkpoint". Supervisors tell it apart from
#: :data:`REQUEUE_EXIT_CODE` (a checkpoint was just taken for the requeue), from 1 (a real failure:
#: do not retry) and from 128 + N (this process was killed by signal N). 145 is 128 + SIGCHLD, a
#: signal that never kills, so no death by signal reads as this code.
CRASH_EXIT_CODE: int = 145
