"""The peer watchdog: when a rank dies or freezes without warning, every other rank leaves within a bound.

Why: a rank killed without warning (SIGKILL, a segfault, the OOM killer) or frozen (a hung device, a
stuck filesystem, SIGSTOP) leaves the others in a collective until the process group's timeout
(Lightning's default: 30 minutes) while the allocation burns; and when the collective does fail
("Connection closed by peer"), the exit code (1) says "bug, do not retry", so nothing requeues.

How: every rank runs a daemon thread that beats (a counter, ``interval`` apart) into its own file
``<run_dir>/watchdog/rank-N.json``. Global rank 0 reads every peer's file; every other rank reads
rank 0's. A peer whose counter has not moved for ``timeout`` seconds (by the reader's own clock, so
no clocks need to agree), or whose process is gone (checked directly when it runs on the same host),
is lost: rank 0 writes that verdict into its own file, where every rank reads it at its next beat,
and each rank journals :attr:`~preemptible.core.schema.Event.PEER_LOST`, says ``left`` in its file
and ends its process with :data:`~preemptible.core.exit.CRASH_EXIT_CODE` ("crashed: start again
from the newest checkpoint").

Nothing is left stopped. "The same host" is the session's host identity (host name plus SLURM node
name: :attr:`~preemptible.core.environment.JobEnvironment.host_identity`), so that two SLURM nodes
that share a host name are told apart. A frozen peer on the same host is SIGKILLed by the rank that
leaves on it. A silent peer on *another* host cannot be killed from here, and it would keep the
job step (``srun --kill-on-bad-exit=0`` waits for every task) and so the batch shell's crash decision
waiting for ever: the rank that judged it silent waits (at most ``3 * interval``) until every other
rank has left (or one on the peer's host killed it), then ends the whole SLURM step with ``scancel
--ctld --signal=KILL JOBID.STEPID`` (delivered by the controller: scancel itself runs inside that step).
That kills the step's remaining tasks (the frozen one and this rank),
``srun`` returns 137 (or the ranks' own 145), the job stays RUNNING (a signal to a step is no cancellation of the job), and the
batch shell's decision (:mod:`preemptible.scheduler.afterstep`) counts the exit as a crash and
requeues from the newest checkpoint. Outside a SLURM step (no ``SLURM_STEP_ID``: torchrun on bare
hosts, for one) whoever launched the ranks must end the frozen one; the log says so.

The bounds: a rank leaves at most ``timeout + 2 * interval`` after a peer stopped beating, where
``interval = timeout / 6`` (within 0.05-5 s): at most ``4/3 * timeout``, 80 s at the default 60 s
(:func:`leave_bound`). A peer that exits on the same host is seen at the next beat. A step held by a
silent peer on another host ends at most ``timeout + 5 * interval`` after it stopped beating, plus
the time ``scancel`` takes (at most ``11/6 * timeout``; 85 s at the default: :func:`step_end_bound`).
A peer that *failed* (raised an exception: a bug, deterministic) says so in its file; the others then
fail too, with exit code 1, never with the crash code, so that no supervisor retries a bug. A rank
that finished or left for a requeue says ``done`` and is no longer watched.

Cost: nothing on the training step; one small file write and one (rank 0: ``world_size - 1``) small
read per interval, on a thread. It watches liveness, not progress: a process whose threads all still
run but whose main thread is stuck (a device call that never returns) is not detected here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

from preemptible.core.exit import CRASH_EXIT_CODE
from preemptible.core.fsutil import atomic_write_json

log = logging.getLogger(__name__)

#: Seconds without a heartbeat after which a peer counts as lost, unless configured otherwise.
DEFAULT_PEER_TIMEOUT = 60.0

#: The directory under the run directory where the ranks beat.
WATCHDOG_DIR = "watchdog"


class PeerState:
    """Values of the ``state`` a rank writes into its heartbeat file."""

    ALIVE = "alive"
    DONE = "done"  #: finished or left for a requeue: no longer watched
    FAILED = "failed"  #: raised an exception (a bug): the others fail too, without the crash code
    LEFT = "left"  #: left because a peer was lost (its ``left`` field says which, and whether it killed it)


class LossKind:
    """How a peer was lost (the ``how`` field of the ``peer_lost`` event)."""

    DIED = "died"  #: its process is gone (seen directly on the same host)
    SILENT = "silent"  #: no heartbeat for ``timeout`` seconds (dead on another host, or frozen)
    FAILED = "failed"  #: it raised an exception


@dataclass(frozen=True)
class PeerLoss:
    rank: int
    how: str
    seconds_silent: float
    #: taken over from rank 0's verdict, not judged by this rank (then rank 0 ends the step if need be)
    relayed: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.how == LossKind.FAILED else CRASH_EXIT_CODE


def interval_for(timeout: float) -> float:
    return max(0.05, min(5.0, timeout / 6.0))


def leave_bound(timeout: float) -> float:
    """The most seconds a rank stays after a peer stopped beating (see the module's docstring)."""
    return timeout + 2 * interval_for(timeout)


def step_end_bound(timeout: float) -> float:
    """The most seconds a SLURM step held by a silent peer on another host lasts after its last beat, plus scancel's time."""
    return leave_bound(timeout) + _ACK_INTERVALS * interval_for(timeout)


#: How many intervals the rank that ends a step waits for the other ranks to leave by themselves first.
_ACK_INTERVALS = 3

#: Seconds ``scancel`` may take (the controller may be busy); the step's end is bounded by it too.
SCANCEL_TIMEOUT = 30.0


def is_peer_loss_error(exc: BaseException) -> bool:
    """Whether ``exc`` is what a collective raises when a peer went away (then the watchdog explains it)."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset",
                                                                     "gloo", "NCCL", "Broken pipe"))


class PeerWatchdog:
    """One rank's heartbeat thread and its view of its peers (see the module's docstring).

    Args:
        directory: ``<run_dir>/watchdog`` (shared by all ranks, as the run directory is).
        token: the same on every rank of this attempt (broadcast by rank 0), so that files left by an
            earlier attempt never count as heartbeats.
        on_loss: called on the watchdog thread with the verdict, before the process ends (journal it,
            let children go); the process then ends with the verdict's exit code.
        exit: how the process ends (``os._exit``: the main thread is stuck in a collective and
            cannot be interrupted); replaceable for tests of the logic.
        host: this process's host identity (:attr:`JobEnvironment.host_identity`); peers with the same one
            run on this node: their pids are checked and a frozen one is killed. Default: the host name.
        slurm_step: ``JOBID.STEPID`` of the SLURM step this rank is a task of
            (:attr:`JobEnvironment.slurm_step`): ended with ``scancel`` when a silent peer on another host
            would hold it. ``None``: not in a step; nothing is ended.
        scancel: the command that ends the step (a name on ``PATH`` or a path).
        may_end_step: asked after ``on_loss``, before the step is ended: ``False`` when something else ends
            it or decides to (an in-rank supervisor that requeued the job, or whose decision is another rank's).
    """

    def __init__(self, directory: Path, rank: int, world_size: int, token: str, timeout: float,
                 on_loss: Callable[[PeerLoss], None], exit: Callable[[int], Any] = os._exit, *,
                 host: Optional[str] = None, slurm_step: Optional[str] = None, scancel: str = "scancel",
                 may_end_step: Callable[[], bool] = lambda: True) -> None:
        self.directory, self.rank, self.world_size, self.token = directory, rank, world_size, token
        self.timeout, self.interval = timeout, interval_for(timeout)
        self._on_loss, self._exit = on_loss, exit
        self._beat, self._state = 0, PeerState.ALIVE
        self._abort: Optional[dict[str, Any]] = None
        self._me = psutil.Process()
        self._host = host or socket.gethostname()
        self.slurm_step, self._scancel, self._may_end_step = slurm_step, scancel, may_end_step
        self._left: Optional[dict[str, Any]] = None
        self._watched = [r for r in range(world_size) if r != rank] if rank == 0 else [0]
        self._last_beat: dict[int, Any] = {}
        self._last_change: dict[int, float] = {}
        self._stopped = threading.Event()
        self._verdict: Optional[PeerLoss] = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="preemptible-peer-watchdog", daemon=True)

    # -- the rank's own side ---------------------------------------------------------------------------
    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write()
        now = time.monotonic()
        self._last_change = dict.fromkeys(self._watched, now)
        self._thread.start()

    def mark(self, state: str) -> None:
        """Say ``done`` or ``failed`` to the peers now; ``done`` also stops watching them."""
        with self._lock:
            self._state = state
            self._write()
        if state == PeerState.DONE:
            self._stopped.set()

    def stop(self) -> None:
        self.mark(PeerState.DONE)

    def wait_for_verdict(self, seconds: float) -> Optional[PeerLoss]:
        """Wait (bounded) until the thread has judged a peer lost; ``None`` if none was within ``seconds``.

        A peer that died or froze: also until the thread has acted on it (journal, the others' leaving, the
        step's end: bounded too), which ends this process; the caller must not exit first on its own.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._verdict is None and self._thread.is_alive():
            time.sleep(min(self.interval, 0.1))
        if self._verdict is not None and self._verdict.how != LossKind.FAILED:
            self._thread.join(_ACK_INTERVALS * self.interval + SCANCEL_TIMEOUT + 1.0)
        return self._verdict

    def _path(self, rank: int) -> Path:
        return self.directory / f"rank-{rank}.json"

    def _write(self) -> None:
        body = {"token": self.token, "rank": self.rank, "beat": self._beat, "state": self._state, "pid": self._me.pid,
                "host": self._host, "create_time": self._me.create_time(), "abort": self._abort, "left": self._left}
        try:
            atomic_write_json(self._path(self.rank), body)
        except OSError as exc:  # a stuck or full filesystem: the peers will see this rank as silent, rightly
            log.warning("preemptible: watchdog could not write its heartbeat: %s", exc)

    # -- watching the peers -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            with self._lock:
                if self._stopped.is_set():
                    return
                self._beat += 1
                self._write()
            loss = self._judge(time.monotonic())
            if loss is not None:
                self._leave(loss)
                return

    def _read(self, rank: int) -> Optional[dict[str, Any]]:
        try:
            body = json.loads(self._path(rank).read_text())
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) and body.get("token") == self.token else None

    def _judge(self, now: float) -> Optional[PeerLoss]:
        for rank in list(self._watched):
            body = self._read(rank)
            if body is not None and body.get("state") == PeerState.DONE:
                self._watched.remove(rank)
                continue
            if body is not None and body.get("abort"):
                abort = body["abort"]  # rank 0's verdict on another peer
                return PeerLoss(int(abort["rank"]), str(abort["how"]), float(abort["seconds_silent"]), relayed=True)
            if body is not None and body.get("state") == PeerState.FAILED:
                return PeerLoss(rank, LossKind.FAILED, 0.0)
            beat = body.get("beat") if body is not None else None
            if beat is not None and beat != self._last_beat.get(rank):
                self._last_beat[rank], self._last_change[rank] = beat, now
            if body is not None and body.get("host") == self._host and not _same_process_alive(body):
                return PeerLoss(rank, LossKind.DIED, now - self._last_change[rank])
            if now - self._last_change[rank] > self.timeout:
                return PeerLoss(rank, LossKind.SILENT, now - self._last_change[rank])
        return None

    def _leave(self, loss: PeerLoss) -> None:
        self._verdict = loss
        if self.rank == 0:
            with self._lock:  # every other rank reads this at its next beat and follows
                self._abort = {"rank": loss.rank, "how": loss.how, "seconds_silent": round(loss.seconds_silent, 2)}
                self._write()
        if loss.how == LossKind.FAILED:
            # A bug elsewhere: this rank's collective errors out when that peer exits, and the process fails
            # by itself (exit 1, its own traceback); only if it is still here after the grace is it ended, with 1.
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and not self._stopped.is_set():
                time.sleep(self.interval)
            if self._stopped.is_set():
                return
        try:
            self._on_loss(loss)
        except Exception as exc:  # noqa: BLE001 - the exit below must happen whatever went wrong here
            log.warning("preemptible: watchdog: %s", exc)
        killed = self._kill_frozen_peer(loss.rank) if loss.how == LossKind.SILENT else None
        self._say_left(loss, killed=killed is not None)
        if loss.how == LossKind.SILENT and killed is None and not loss.relayed and self._may_end_step():
            self._end_step_held_by(loss)
        _reap_dead_children(killed)
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(loss.exit_code)

    def _say_left(self, loss: PeerLoss, killed: bool, ending_step: Optional[str] = None) -> None:
        with self._lock:
            self._state = PeerState.LEFT
            self._left = {"lost_rank": loss.rank, "killed": killed, "ending_step": ending_step}
            self._write()

    def _end_step_held_by(self, loss: PeerLoss) -> None:
        """A silent peer nobody could kill (on another host) holds the SLURM step: end the whole step.

        First (bounded) every other rank leaves by itself, so that each journals its ``peer_lost``;
        if one of them killed the peer on its own host, nothing is left to end. Then ``scancel``
        SIGKILLs every task of the step that remains, this rank's own process included.
        """
        body = self._read(loss.rank) or {}
        where = f"rank {loss.rank} (pid {body.get('pid', '?')} on {body.get('host', 'an unknown host')})"
        if self._peers_left_or_killed(loss.rank, time.monotonic() + _ACK_INTERVALS * self.interval):
            print(f"preemptible: rank {self.rank}: {where} was killed by a rank on its host", file=sys.stderr,
                  flush=True)
            return
        if self.slurm_step is None:
            print(f"preemptible: rank {self.rank}: {where} is silent on another host and this is no SLURM job step, "
                  "so nothing here can end it: whoever launched the ranks must", file=sys.stderr, flush=True)
            return
        self._say_left(loss, killed=False, ending_step=self.slurm_step)
        print(f"preemptible: rank {self.rank}: {where} is silent on another host: ending SLURM step {self.slurm_step} "
              f"(scancel --ctld --signal=KILL), so that the job's batch shell can requeue it as a crash", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        error = cancel_slurm_step(self.slurm_step, self._scancel)  # usually kills this process too
        if error is not None:
            print(f"preemptible: rank {self.rank}: could not end SLURM step {self.slurm_step}: {error}; the step "
                  f"lasts until {where} ends (scancel {self.slurm_step} ends it by hand)", file=sys.stderr, flush=True)

    def _peers_left_or_killed(self, lost: int, deadline: float) -> bool:
        """Wait until every rank but this one and ``lost`` has left or finished (or ``deadline``);
        whether one of them killed ``lost`` (then the step needs no ending)."""
        pending = [r for r in range(self.world_size) if r not in (self.rank, lost)]
        while True:
            still = []
            for rank in pending:
                body = self._read(rank)
                left = body.get("left") if body is not None else None
                if isinstance(left, dict) and left.get("lost_rank") == lost and left.get("killed"):
                    return True
                if body is not None and body.get("state") not in (PeerState.LEFT, PeerState.DONE, PeerState.FAILED):
                    still.append(rank)
            pending = still
            if not pending or time.monotonic() >= deadline:
                return False
            time.sleep(min(self.interval / 4, 0.25))

    def _kill_frozen_peer(self, rank: int) -> Optional[int]:
        """A silent peer on this host (frozen: its process still exists) is killed, so nothing stays stopped."""
        body = self._read(rank)
        if body is None or body.get("host") != self._host or not _same_process_alive(body):
            return None
        try:
            os.kill(int(body["pid"]), signal.SIGKILL)
            print(f"preemptible: rank {self.rank}: killed frozen rank {rank} (pid {body['pid']})", file=sys.stderr, flush=True)
        except OSError:
            return None
        return int(body["pid"])


def cancel_slurm_step(step: str, scancel: str = "scancel", timeout: float = SCANCEL_TIMEOUT) -> Optional[str]:
    """``scancel --ctld --signal=KILL JOBID.STEPID``: SIGKILL to every task of that step, not a cancellation of the job.

    ``--ctld``: the controller delivers the signal to the step's nodes. Without it scancel sends it to each
    node's slurmd itself, and scancel is a child of a rank of that very step: the SIGKILL on the first node
    kills scancel while it still talks to the next one (measured on the two-node test cluster: the frozen
    task on the other node then went unsignalled and held the step until the test gave up).

    SLURM 22.05: the job stays RUNNING, ``srun`` ends with 137 and its batch shell goes on (to decide on a
    crash requeue). Returns ``None`` when the request was accepted, else why not (no scancel on ``PATH``
    in a container, an error from the controller, no answer within ``timeout``).
    """
    exe = shutil.which(scancel)
    if exe is None:
        return f"'{scancel}' is not on PATH"
    try:
        done = subprocess.run([exe, "--ctld", "--signal=KILL", step], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"scancel --ctld --signal=KILL {step}: {exc}"
    if done.returncode != 0:
        return (f"scancel --ctld --signal=KILL {step} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}")
    return None


def _same_process_alive(body: dict[str, Any]) -> bool:
    """Whether the process that wrote ``body`` (same pid and start time: not a reused pid) still runs."""
    try:
        proc = psutil.Process(int(body["pid"]))
        if abs(proc.create_time() - float(body["create_time"])) > 0.5:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _reap_dead_children(killed: Optional[int]) -> None:
    """Collect this process's dead children (a launcher's ranks), so none is left a zombie after it ends."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        try:
            if child.pid == killed or child.status() == psutil.STATUS_ZOMBIE:
                child.wait(timeout=2)  # dead or just SIGKILLed: returns at once
        except (psutil.Error, psutil.TimeoutExpired):
            pass
