"""A session's guard against peers that die or freeze without warning: the glue around the watchdog.

:class:`~preemptible.core.session.PreemptionSession` owns one :class:`PeerGuard` and calls it at three
points: :meth:`PeerGuard.start` when a multi-rank run opens, :meth:`PeerGuard.after` when training ends
with an exception, :meth:`PeerGuard.stop` at the session's end. The guard owns what lies between:

* the :class:`~preemptible.core.watchdog.PeerWatchdog` (heartbeats and the verdict on a lost peer);
* the in-rank crash supervisor (:class:`~preemptible.core.supervisor.RankCrashSupervisor`) it registers
  in a multi-task job started by submitit's own sbatch script, and removes again at the end;
* what happens on the watchdog's thread right before this rank leaves because a peer was lost: the
  journal line, the adapters' ``on_peer_lost`` hooks, the supervisor's choice of exit code, and the exit.

It is apart from the session because none of it takes part in the stop the ranks agree on: it acts
when that agreement can no longer happen (a peer is gone), mostly on another thread, and shares with
the session only the run directory, the rank and the last step. It imports neither the session nor
any trainer or scheduler package.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from preemptible.core import supervisor
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import CRASH_EXIT_CODE, REQUEUE_EXIT_CODE
from preemptible.core.rundir import RunDirectory
from preemptible.core.schema import Event
from preemptible.core.watchdog import WATCHDOG_DIR, PeerLoss, PeerState, PeerWatchdog, is_peer_loss_error, leave_bound


class PeerGuard:
    """One rank's watchdog and in-rank crash supervisor, for the life of a session.

    Args:
        env: the scheduler's view of this process.
        on_peer_lost: called (on the watchdog's thread) right before this rank leaves because a peer
            was lost; the session's own list, so that hooks an adapter adds later are called too.
        last_step: the last global step this rank saw (for the journal line).
    """

    def __init__(self, env: JobEnvironment, on_peer_lost: list[Callable[[], None]], last_step: Callable[[], int]) -> None:
        self.env = env
        self.on_peer_lost = on_peer_lost
        self._last_step = last_step
        self._run: Optional[RunDirectory] = None
        self._rank = 0
        self._watchdog: Optional[PeerWatchdog] = None
        self._leave_code: Optional[int] = None  # what the in-process supervisor chose after a lost peer
        self._own_supervisor: Optional[supervisor.RankCrashSupervisor] = None  # registered by this guard

    def start(self, run: RunDirectory, rank: int, world_size: int, token: str, timeout: float) -> None:
        """Every rank of a multi-rank run, once the run directory is known to be shared (``token``).

        ``timeout``: seconds without a peer's heartbeat before it counts as lost; 0: no watchdog.
        """
        self._run, self._rank = run, rank
        if self.env.in_submitit_sbatch and not supervisor.has_crash_supervisor():
            # submitit's own sbatch script (hydra-submitit-launcher, a plain executor.submit) runs nothing after
            # srun that could requeue a crashed attempt: the ranks decide (the submitit task registers its own).
            self._own_supervisor = supervisor.RankCrashSupervisor(run.path, log_hint="the submitit logs")
            supervisor.set_crash_supervisor(self._own_supervisor)
        if timeout > 0:
            self._watchdog = PeerWatchdog(run.path / WATCHDOG_DIR, rank, world_size, token, timeout,
                                          on_loss=self._peer_lost, exit=self._exit_after_peer_loss,
                                          host=self.env.host_identity, slurm_step=self.env.slurm_step,
                                          may_end_step=self._may_end_step)
            self._watchdog.start()

    @property
    def watching(self) -> bool:
        """Whether the peer watchdog runs (a multi-rank run with ``peer_timeout > 0``)."""
        return self._watchdog is not None

    def after(self, exception: BaseException, left_on_purpose: bool) -> None:
        """Training ended with ``exception``; ``left_on_purpose``: it is one of the session's own exits."""
        watchdog = self._watchdog
        if watchdog is None:
            return
        if left_on_purpose:
            watchdog.stop()
        elif is_peer_loss_error(exception):
            # A collective failed because a peer went away: the watchdog says how (and then ends this
            # process with the crash code), unless the peer failed by an error of its own (then: this one).
            loss = watchdog.wait_for_verdict(leave_bound(watchdog.timeout) + watchdog.interval)
            if loss is None:
                watchdog.mark(PeerState.FAILED)
            elif self._consults_supervisor(loss):
                # The watchdog's thread asks the supervisor (scontrol requeue can take seconds); this thread must
                # not end the process first: it waits for the same answer (asked once per process).
                supervisor.crash_exit_code(loss.exit_code)
        else:
            watchdog.mark(PeerState.FAILED)  # a bug here: the others fail too, and nobody asks for a retry

    def stop(self) -> None:
        """The session's end: stop the watchdog and remove the supervisor this guard registered."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._own_supervisor is not None:
            supervisor.set_crash_supervisor(None)
            self._own_supervisor = None

    def _peer_lost(self, loss: PeerLoss) -> None:
        """On the watchdog's thread, right before this process ends with ``loss.exit_code``.

        On a crash (not a peer's own error), an in-process supervisor (:mod:`preemptible.core.supervisor`:
        the submitit task) decides first whether the job is requeued, and may choose the exit code.
        """
        assert self._run is not None
        # Journaled first: the supervisor's decision reads this attempt's journal (its last step among others).
        # ``code`` is the loss's (the crash code); the line printed below says what the rank leaves with.
        self._run.journal.append(Event.PEER_LOST, lost_rank=loss.rank, how=loss.how, code=loss.exit_code,
                                 seconds_silent=round(loss.seconds_silent, 2), step=self._last_step())
        for hook in self.on_peer_lost:
            hook()
        if self._consults_supervisor(loss):
            self._leave_code = supervisor.crash_exit_code(loss.exit_code)
        code = self._leave_code if self._leave_code is not None else loss.exit_code
        print(f"preemptible: rank {self._rank}: rank {loss.rank} {loss.how} (no heartbeat for {loss.seconds_silent:.1f} s); "
              f"leaving with exit code {code}" + (" (crash: start again from the newest checkpoint)"
                                                  if loss.exit_code != 1 else ""), flush=True)

    @staticmethod
    def _consults_supervisor(loss: PeerLoss) -> bool:
        """A crash this rank judged itself: a rank that only follows rank 0's verdict (``relayed``) leaves the
        decision to the ranks that judged, so that the one deciding is never a follower racing its judge."""
        return loss.exit_code == CRASH_EXIT_CODE and not loss.relayed

    def _may_end_step(self) -> bool:
        """Whether the watchdog may end the SLURM step a silent peer holds. Under an in-rank supervisor only the
        rank that decided may, and only when it did not requeue: ``scontrol requeue`` ends the job's steps itself,
        and ending the step under the rank that is still deciding could kill it before its requeue."""
        if not supervisor.has_crash_supervisor():
            return True  # the batch shell decides after the step: the step must end
        return supervisor.decided_here() and self._leave_code != REQUEUE_EXIT_CODE

    def _exit_after_peer_loss(self, code: int) -> None:
        """How the watchdog ends this process: with the supervisor's code when it chose one."""
        os._exit(self._leave_code if self._leave_code is not None else code)
