"""Local simulation of preemption: run a command, signal it at a planned point, relaunch on requeue.

This is what ``preemptible run`` does on a laptop or in CI, and what :mod:`preemptible.tools.testing`
offers to pytest suites. Signals are real: they are sent with ``kill`` to the real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence

import psutil

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

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.at_step, self.after_seconds, self.at_event)) != 1:
            raise ValueError("a Preemption needs exactly one of at_step, after_seconds or at_event")
        self.signal = parse_signal(self.signal)


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

    @property
    def stopped_before_training(self) -> bool:
        """The stop came before this attempt's first step (set-up, loading, the sanity check): nothing to save."""
        return self.stop_place in PLACES_BEFORE_TRAINING or (
            self.stop_step is not None and self.stop_step == self.resumed_from_step)


@dataclass
class RunSummary:
    attempts: list[Attempt] = field(default_factory=list)

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
    """Runs ``command`` until it exits with something other than :data:`REQUEUE_EXIT_CODE`.

    Args:
        command: the training command (one command both starts and resumes).
        run_dir: the run directory (exported as ``PREEMPTIBLE_RUN_DIR``); needed to follow steps.
        plan: preemptions, one per attempt in order (attempts past the list run undisturbed).
        max_restarts: relaunches allowed; past it the requeue exit code is returned as is.
        timeout: seconds an attempt may take before it is killed (no test may hang).
        env: extra environment variables.
        on_event: called with a line of text for each notable event (the CLI prints them).
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

    def run(self) -> RunSummary:
        summary = RunSummary()
        index = 0
        while True:
            preemption = self.plan[index] if index < len(self.plan) else None
            attempt = self._run_attempt(index, preemption)
            summary.attempts.append(attempt)
            if attempt.exit_code != REQUEUE_EXIT_CODE:
                break
            if index >= self.max_restarts:
                self.on_event(f"requeue asked, but --max-restarts {self.max_restarts} is reached; stopping")
                break
            index += 1
            self.on_event(f"attempt {index - 1} exited with {REQUEUE_EXIT_CODE} (requeue): relaunching")
        self._fill_from_journal(summary)
        return summary

    # -------------------------------------------------------------------------------------------------
    def _environment(self, index: int, follow_steps: bool) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PREEMPTIBLE_ATTEMPT"] = str(index)
        if self.run_dir is not None:
            env["PREEMPTIBLE_RUN_DIR"] = str(self.run_dir)
        if follow_steps:
            env["PREEMPTIBLE_PROGRESS_INTERVAL"] = "0"
        return env

    def _run_attempt(self, index: int, preemption: Optional[Preemption]) -> Attempt:
        attempt = Attempt(index=index, command=self.command)
        follow = preemption is not None and preemption.at_step is not None
        if follow and self.run_dir is not None:
            (self.run_dir / PROGRESS_FILE).unlink(missing_ok=True)
        attempt.started = time.time()
        proc = subprocess.Popen(self.command, env=self._environment(index, follow), start_new_session=True,
                                stdout=self.stdout, stderr=subprocess.STDOUT if self.stdout is not None else None)
        self.on_event(f"attempt {index}: started pid {proc.pid}")
        deadline = time.monotonic() + self.timeout
        sent = 0
        last_tick = 0.0
        try:
            while proc.poll() is None:
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
            mine = [e for e in events if a.started <= e.get("time", 0) <= a.ended + 1 and e.get("rank") == 0]
            for e in mine:
                kind = e.get("event")
                if kind == Event.STOP_AGREED:
                    a.stop_step, a.stop_place, a.stop_batch = e.get("step"), e.get("place"), e.get("batch")
                elif kind == Event.CHECKPOINT:
                    a.checkpoint, a.save_seconds = e.get("path"), e.get("seconds")
                    a.signal_to_commit = e.get("signal_to_commit_seconds")
                elif kind == Event.TRAIN_START and a.first_step_at is None:
                    a.resumed_from_step, a.first_step_at = e.get("step"), e.get("time")


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
