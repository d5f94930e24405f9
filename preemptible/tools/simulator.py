"""Local simulation of preemption: run a command, signal it at a planned point, relaunch on requeue.

This is what ``preemptible run`` does on a laptop or in CI, and what :mod:`preemptible.tools.testing`
offers to pytest suites. Signals are real: they are sent with ``kill`` to the real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence

import psutil

from preemptible.core.cause import write_stop_request
from preemptible.core.crashes import decide
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import REQUEUE_EXIT_CODE
from preemptible.core.rundir import RunDirError, read_progress, resolve_run_dir
from preemptible.core.schema import JOURNAL_FILE, PLACES_BEFORE_TRAINING, PROGRESS_FILE, Event, read_events
from preemptible.core.signals import parse_signal


@dataclass
class Preemption:
    """When to send the signal during one attempt, and to whom."""

    at_step: Optional[int] = None
    after_seconds: Optional[float] = None
    #: signal once the run's journal records this event in the current attempt (``Event.START``, ``Event.RESUME``,
    #: ``Event.TRAIN_START``, ...).
    at_event: Optional[str] = None
    signal: signal.Signals = signal.SIGUSR1
    #: "tree" (every process of the job, as SLURM does), or "rank:N" (only that rank's process).
    target: str = "tree"
    #: how many times to send it (a burst), and the pause between two.
    repeat: int = 1
    interval: float = 0.0
    #: a fault without warning instead of the signal: ``"kill"`` (SIGKILL), ``"freeze"`` (SIGSTOP), ``"segv"``.
    fault: Optional[str] = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.at_step, self.after_seconds, self.at_event)) != 1:
            raise ValueError("a Preemption needs exactly one of at_step, after_seconds or at_event")
        self.signal = parse_signal(self.signal)
        if self.fault is not None and (self.at_step is None or self.fault not in ("kill", "freeze", "segv")):
            raise ValueError(f"fault={self.fault!r}: use 'kill', 'freeze' or 'segv', with at_step")

    @property
    def in_process(self) -> bool:
        """At a step, once: the rank does it to itself at that very step (``PREEMPTIBLE_INJECT``), however short
        the steps; watching ``progress.json`` from outside would land steps late on sub-millisecond steps."""
        return self.at_step is not None and self.repeat == 1

    def injection(self, attempt: int) -> str:
        """The ``PREEMPTIBLE_INJECT`` value of this plan item in attempt ``attempt`` (see ``core/inject.py``)."""
        if self.target.startswith("rank:"):
            return f"{self.fault or self.signal.name}:{self.at_step}:{self.target.split(':', 1)[1]}:{attempt}"
        if self.fault:
            return f"{self.fault}:{self.at_step}:*:{attempt}"
        # The whole tree, as SLURM signals every process of the job: rank 0 signals the job's process group.
        return f"group-{self.signal.name}:{self.at_step}:0:{attempt}"


@dataclass
class Attempt:
    index: int
    command: list[str]
    exit_code: Optional[int] = None
    started: float = 0.0
    ended: float = 0.0
    signal_sent_at: Optional[float] = None
    signal_step: Optional[int] = None
    signal_name: Optional[str] = None
    stop_step: Optional[int] = None
    #: Where the stop was taken (:class:`~preemptible.core.schema.Place`) and at which batch of that place.
    stop_place: Optional[str] = None
    stop_batch: Optional[int] = None
    checkpoint: Optional[str] = None
    save_seconds: Optional[float] = None
    signal_to_commit: Optional[float] = None
    resumed_from_step: Optional[int] = None
    first_step_at: Optional[float] = None
    timed_out: bool = False
    #: the stop's cause as the run journaled it (``cancelled``, ``requested``, ...; see ``core.cause``)
    stop_cause: Optional[str] = None

    @property
    def stopped_before_training(self) -> bool:
        """The stop came before this attempt's first step (set-up, loading, the sanity check): nothing to save."""
        return self.stop_place in PLACES_BEFORE_TRAINING or (
            self.stop_step is not None and self.stop_step == self.resumed_from_step)


@dataclass
class RunSummary:
    attempts: list[Attempt] = field(default_factory=list)
    #: the signal (name) that asked ``preemptible run`` itself to stop (Ctrl-C: SIGINT), if any: no relaunch after it
    stopped_by: Optional[str] = None

    @property
    def exit_code(self) -> Optional[int]:
        return self.attempts[-1].exit_code if self.attempts else None

    @property
    def preemptions(self) -> int:
        return sum(1 for a in self.attempts if a.exit_code == REQUEUE_EXIT_CODE)

    def restart_seconds(self, i: int) -> Optional[float]:
        """Time from attempt ``i - 1``'s exit to attempt ``i``'s first training step."""
        if i == 0 or i >= len(self.attempts):
            return None
        first = self.attempts[i].first_step_at
        return None if first is None else max(0.0, first - self.attempts[i - 1].ended)


class LocalSupervisor:
    """Runs ``command`` until it exits with something other than :data:`REQUEUE_EXIT_CODE` (or a crash it relaunches).

    Args:
        command: the training command (one command both starts and resumes).
        run_dir: the run directory (exported as ``PREEMPTIBLE_RUN_DIR``); needed to follow steps.
        plan: preemptions, one per attempt in order (attempts past the list run undisturbed).
        max_restarts: relaunches allowed; past it the requeue exit code is returned as is.
        timeout: seconds an attempt may take before it is killed (no test may hang).
        env: extra environment variables.
        on_event: called with a line of text for each notable event (the CLI prints them).
        crash_restarts: relaunch an attempt that crashed (see :mod:`preemptible.core.crashes`: not an error of
            the training code, within ``max_crash_requeues``, not twice in a row without a new checkpoint).
        stdout: where the command's output goes, stderr included (a file or a descriptor, as for ``subprocess.Popen``);
            None: inherited from this process.
    """

    def __init__(
        self,
        command: Sequence[str],
        run_dir: Optional[os.PathLike[str] | str] = None,
        plan: Sequence[Preemption] = (),
        max_restarts: int = 10,
        timeout: float = 600.0,
        env: Optional[dict[str, str]] = None,
        on_event: Optional[Callable[[str], None]] = None,
        stdout: Optional[int | IO[Any]] = None,
        on_tick: Optional[Callable[[int, Optional[dict]], None]] = None,
        crash_restarts: bool = True,
    ) -> None:
        if not command:
            raise ValueError("no command to run: put it after '--', e.g. preemptible run -- python train.py")
        self.command = list(command)
        self.run_dir = _run_dir(run_dir)
        if any(p.at_step is not None or p.at_event is not None for p in plan) and self.run_dir is None:
            raise ValueError("--preempt-at-step needs the run directory to follow training progress: "
                             "pass --run-dir or export PREEMPTIBLE_RUN_DIR")
        self.plan = list(plan)
        self.max_restarts = max_restarts
        self.timeout = timeout
        self.extra_env = dict(env or {})
        self.on_event = on_event or (lambda line: None)
        self.on_tick = on_tick
        self.stdout = stdout
        self.stop = StopRequest()
        self.crash_restarts = crash_restarts

    def run(self) -> RunSummary:
        summary = RunSummary()
        index = 0
        with self.stop.listening():
            while True:
                preemption = self.plan[index] if index < len(self.plan) else None
                attempt = self._run_attempt(index, preemption)
                summary.attempts.append(attempt)
                if self.stop.signal_name is not None:
                    summary.stopped_by = self.stop.signal_name
                    self.on_event(f"stopped by {self.stop.signal_name}: not relaunching (the checkpoint is kept; "
                                  "run the same command again to resume)")
                    break
                crashed = attempt.exit_code not in (0, REQUEUE_EXIT_CODE) and self._relaunch_after_crash(index, attempt)
                if attempt.exit_code != REQUEUE_EXIT_CODE and not crashed:
                    break
                if index >= self.max_restarts:
                    self.on_event(f"requeue asked, but --max-restarts {self.max_restarts} is reached; stopping")
                    break
                index += 1
                why = "crashed" if crashed else "requeue"
                self.on_event(f"attempt {index - 1} exited with {attempt.exit_code} ({why}): relaunching")
        self._fill_from_journal(summary)
        return summary

    # -------------------------------------------------------------------------------------------------
    def _relaunch_after_crash(self, index: int, attempt: Attempt) -> bool:
        """The rule of :mod:`preemptible.core.crashes`: a crash (no error recorded by the training code) is
        relaunched from the newest checkpoint, within the run's crash bounds; it journals the decision."""
        if not self.crash_restarts or self.run_dir is None or attempt.exit_code is None or attempt.timed_out:
            return False
        code = attempt.exit_code if attempt.exit_code >= 0 else 128 - attempt.exit_code  # -9 → 137, as a shell says
        verdict = decide(self.run_dir, code, env=JobEnvironment.from_env(self._environment(index, False)),
                         log_hint="the command's output")
        if verdict.message:
            self.on_event(verdict.message.removeprefix("preemptible: "))
        return verdict.requeue

    def _environment(self, index: int, follow_steps: bool) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PREEMPTIBLE_ATTEMPT"] = str(index)
        if self.run_dir is not None:
            env["PREEMPTIBLE_RUN_DIR"] = str(self.run_dir)
        if follow_steps:
            env["PREEMPTIBLE_PROGRESS_INTERVAL"] = "0"
        if self.stop.path is not None:
            env["PREEMPTIBLE_STOP_REQUEST"] = str(self.stop.path)
        return env

    def _run_attempt(self, index: int, preemption: Optional[Preemption]) -> Attempt:
        attempt = Attempt(index=index, command=self.command)
        inject = preemption is not None and preemption.in_process
        follow = preemption is not None and preemption.at_step is not None and not inject
        if follow and self.run_dir is not None:
            (self.run_dir / PROGRESS_FILE).unlink(missing_ok=True)
        env = self._environment(index, follow)
        if inject:
            assert preemption is not None
            env["PREEMPTIBLE_INJECT"] = preemption.injection(index)
            self.on_event(f"attempt {index}: {preemption.fault or preemption.signal.name} to {preemption.target} at step "
                          f"{preemption.at_step}, done by the rank itself (PREEMPTIBLE_INJECT={env['PREEMPTIBLE_INJECT']})")
            preemption = None  # nothing to send from here
        attempt.started = time.time()
        proc = subprocess.Popen(self.command, env=env, start_new_session=True,
                                stdout=self.stdout, stderr=subprocess.STDOUT if self.stdout is not None else None)
        self.on_event(f"attempt {index}: started pid {proc.pid}")
        deadline = time.monotonic() + self.timeout
        sent = 0
        last_tick = 0.0
        try:
            while proc.poll() is None:
                self.stop.pass_on(proc.pid, self.on_event)
                if time.monotonic() > deadline:
                    attempt.timed_out = True
                    self.on_event(f"attempt {index}: no exit after {self.timeout:.0f} s, killing the process tree")
                    _signal_tree(proc.pid, signal.SIGKILL)
                    break
                if preemption is not None and sent < preemption.repeat and self._due(preemption, attempt):
                    targets = _targets(proc.pid, preemption.target)
                    if targets:
                        if sent == 0:
                            attempt.signal_sent_at = time.time()
                            attempt.signal_name = preemption.signal.name
                            progress = read_progress(self.run_dir) if self.run_dir else None
                            attempt.signal_step = progress.get("step") if progress else None
                            self.on_event(f"attempt {index}: sending {preemption.signal.name} to {preemption.target} "
                                          f"({len(targets)} process(es)) at step {attempt.signal_step}")
                        for p in targets:
                            try:
                                p.send_signal(preemption.signal)
                            except psutil.Error:
                                pass
                        sent += 1
                        if preemption.interval:
                            time.sleep(preemption.interval)
                        continue
                if self.on_tick is not None and time.monotonic() - last_tick >= 0.5:
                    last_tick = time.monotonic()
                    self.on_tick(index, read_progress(self.run_dir) if self.run_dir else None)
                time.sleep(0.01)
            proc.wait()
        finally:
            if proc.poll() is None:
                _signal_tree(proc.pid, signal.SIGKILL)
                proc.wait()
            _wait_for_descendants(proc.pid, timeout=30)
        attempt.exit_code = proc.returncode
        attempt.ended = time.time()
        self.on_event(f"attempt {index}: exit code {attempt.exit_code}")
        return attempt

    def _due(self, p: Preemption, attempt: Attempt) -> bool:
        if p.after_seconds is not None:
            return time.time() - attempt.started >= p.after_seconds
        if p.at_event is not None:
            assert self.run_dir is not None
            return any(e.get("event") == p.at_event and e.get("time", 0) >= attempt.started
                       for e in read_events(self.run_dir / JOURNAL_FILE))
        progress = read_progress(self.run_dir) if self.run_dir else None
        return bool(progress and progress.get("time", 0) >= attempt.started and progress.get("step", -1) >= (p.at_step or 0))

    def _fill_from_journal(self, summary: RunSummary) -> None:
        if self.run_dir is None:
            return
        events = list(read_events(self.run_dir / JOURNAL_FILE))
        for a in summary.attempts:
            mine = [e for e in events if a.started <= e.get("time", 0) <= a.ended + 1
                    and (e.get("rank") == 0 or e.get("event") == Event.FAULT_INJECTED)]
            for e in mine:
                kind = e.get("event")
                if kind == Event.STOP_AGREED:
                    a.stop_step, a.stop_place, a.stop_batch = e.get("step"), e.get("place"), e.get("batch")
                elif kind == Event.CHECKPOINT:
                    a.checkpoint, a.save_seconds = e.get("path"), e.get("seconds")
                    a.signal_to_commit = e.get("signal_to_commit_seconds")
                elif kind == Event.STOP_CAUSE:
                    a.stop_cause = e.get("cause")
                elif kind == Event.FAULT_INJECTED and a.signal_step is None:
                    a.signal_step, a.signal_name = e.get("step"), _fault_name(e.get("action"))
                    a.signal_sent_at = e.get("time")
                elif kind == Event.TRAIN_START and a.first_step_at is None:
                    a.resumed_from_step, a.first_step_at = e.get("step"), e.get("time")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM to ``preemptible run`` itself: stop the run after its checkpoint, no relaunch.

    The command runs in its own session, so a terminal's Ctrl-C reaches only the supervisor. It notes
    the request in a file the run reads at its stop (``PREEMPTIBLE_STOP_REQUEST``: the run's stop cause
    is then "cancelled" and it exits with :data:`~preemptible.core.exit.CANCELLED_EXIT_CODE`), then sends
    SIGTERM to the command's processes so they checkpoint. A second Ctrl-C kills them at once.
    """

    def __init__(self) -> None:
        self.path: Optional[Path] = None
        self.signal_name: Optional[str] = None
        self._count = 0
        self._passed_on = 0

    def listening(self) -> "_Listening":
        return _Listening(self)

    def note(self, signum: int, frame: Any) -> None:  # the handler: records only
        self.signal_name = self.signal_name or signal.Signals(signum).name
        self._count += 1

    def pass_on(self, root_pid: int, on_event: Callable[[str], None]) -> None:
        """In the supervisor's loop: a new request becomes a note for the run and a signal to its processes."""
        if self._count == self._passed_on:
            return
        first = self._passed_on == 0
        self._passed_on = self._count
        if first:
            if self.path is not None:
                write_stop_request(self.path, self.signal_name or "a signal")
            on_event(f"got {self.signal_name}: asking the run to checkpoint and stop (SIGTERM); "
                     "Ctrl-C again to kill it without a checkpoint")
            _signal_tree(root_pid, signal.SIGTERM)
        else:
            on_event(f"got {self.signal_name} again: killing the process tree")
            _signal_tree(root_pid, signal.SIGKILL)


class _Listening:
    """Installs :class:`StopRequest`'s handlers for SIGINT and SIGTERM (main thread only) and its file."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self._previous: dict[int, Any] = {}
        self._tmp: Optional[tempfile.TemporaryDirectory[str]] = None

    def __enter__(self) -> StopRequest:
        self._tmp = tempfile.TemporaryDirectory(prefix="preemptible-run-")
        self.stop.path = Path(self._tmp.name) / "stop-request.json"
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self.stop.note)
        return self.stop

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._tmp is not None:
            self._tmp.cleanup()
        self.stop.path = None


def _fault_name(action: Optional[str]) -> Optional[str]:
    if action in ("kill", "freeze", "segv"):
        return action
    try:
        return parse_signal(str(action).removeprefix("group-")).name
    except ValueError:
        return action


def _run_dir(run_dir: Optional[os.PathLike[str] | str]) -> Optional[Path]:
    """``run_dir``, else ``$PREEMPTIBLE_RUN_DIR``, else ``None``.

    Unlike the callback, the supervisor does not fall back to ``runs/<SLURM_JOB_ID>``: the command may
    name its own run directory, and following a guessed one would watch the wrong files.
    """
    try:
        return resolve_run_dir(run_dir, env=replace(JobEnvironment.from_env(), slurm_job_id=None))
    except RunDirError:
        return None


def _session(root_pid: int) -> list[psutil.Process]:
    """Every process of the job: the command was started in a new session whose id is its pid.

    Going by session rather than by parent links also finds ranks orphaned by an exited parent.
    """
    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == root_pid:
                members.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return members


def _targets(root_pid: int, target: str) -> list[psutil.Process]:
    tree = _session(root_pid)
    if target == "tree":
        return tree
    if target.startswith("rank:"):
        rank = target.split(":", 1)[1]
        for p in tree:
            try:
                env = p.environ()
                parent_env = p.parent().environ() if p.parent() else {}
            except psutil.Error:
                continue
            is_rank = env.get("LOCAL_RANK", "0") == rank or env.get("RANK") == rank
            parent_same = parent_env.get("LOCAL_RANK", "0") == env.get("LOCAL_RANK", "0") and p.pid != root_pid
            if is_rank and (p.pid == root_pid or not parent_same):
                return [p]
        return []
    raise ValueError(f"unknown target {target!r}: use 'tree' or 'rank:N'")


def _signal_tree(root_pid: int, sig: signal.Signals) -> None:
    for p in _targets(root_pid, "tree"):
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _wait_for_descendants(root_pid: int, timeout: float) -> None:
    """Relaunching while a rank of the last attempt still runs would reuse its port and files."""
    _, alive = psutil.wait_procs(_session(root_pid), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
