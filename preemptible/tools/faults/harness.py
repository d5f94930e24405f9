"""Driving one attempt of a training run under a fault: start it, poll its files, signal it, bound every wait.

A fault script (:mod:`preemptible.tools.faults.scripts`) gets a :class:`Control` of the running
attempt; :func:`run_attempt` returns what the attempt did as an :class:`AttemptResult`. Outcomes of
many trials are counted in a :class:`Tally`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import preemptible
from preemptible.core.schema import CHECKPOINT_DIR, COMMIT_SUFFIX, PROGRESS_FILE, Event, read_events
from preemptible.examples.train import options_to_argv

MiB = 1 << 20
WAIT = 120.0  # seconds any single wait may take before it counts as a hang
PY = sys.executable
#: The directory the ``preemptible`` package was imported from: children run there, so that
#: ``python -m preemptible.tools.faults.children`` imports this very package.
ROOT = Path(preemptible.__file__).resolve().parents[1]
CHILDREN = "preemptible.tools.faults.children"


#: The environment variable that tells a child where the markers of its holds go (``children train --hold``).
HOLD_DIR_ENV = "PREEMPTIBLE_FAULTS_HOLD_DIR"


def hold_dir_of(run_dir: Path) -> Path:
    """The hold markers' directory of an attempt in ``run_dir``: ``holds/`` next to it."""
    return Path(os.path.abspath(run_dir)).parent / "holds"


def child_command(name: str, *args: str) -> list[str]:
    """The command line of one of the child entry points in :mod:`preemptible.tools.faults.children`."""
    return [PY, "-m", CHILDREN, name, *args]


@dataclasses.dataclass
class Tally:
    """Outcomes of one campaign. The four "next start" outcomes are exclusive per trial."""

    fault: str
    trials: int = 0
    injected: int = 0
    resumed_newest: int = 0
    partial_loaded: int = 0
    lost: int = 0
    hang: int = 0
    clear_error: int = 0
    moments: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    stats: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # not in the table

    def problem(self, text: str) -> None:
        self.problems.append(text)

    @property
    def ok(self) -> bool:
        return not (self.partial_loaded or self.lost or self.hang or self.problems)


def train_command(record: Optional[Path], *, max_steps: int, step_sleep: float = 0.05, ballast_mb: float = 0.0,
                  self_signal: Sequence[str] = (), **options: Any) -> list[str]:
    """The example training with fault hooks (``children train``): see :func:`~preemptible.tools.faults.children.train_main`."""
    cmd = child_command("train", "--max-steps", str(max_steps), "--step-sleep", str(step_sleep))
    if record is not None:
        cmd += ["--record", str(record)]
    if ballast_mb:
        cmd += ["--ballast-mb", str(ballast_mb)]
    for s in self_signal:
        cmd += ["--self-signal", s]
    return cmd + options_to_argv(**options)


class Control:
    """What a fault script sees of a running attempt (one process: devices=1, no loader workers)."""

    def __init__(self, proc: subprocess.Popen[bytes], run_dir: Path, deadline: float, index: int = 0,
                 holds: Sequence[str] = ()) -> None:
        self.proc, self.run_dir, self.deadline, self.index = proc, run_dir, deadline, index
        self.holds = set(holds)  # this attempt's ``--hold`` points
        self.start: Optional[int] = None  # the step training started from (once wait_train_start saw it)
        self.ckpt_dir = run_dir / CHECKPOINT_DIR
        self.sent: collections.Counter[str] = collections.Counter()
        self.notes: dict[str, Any] = {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, predicate: Callable[[], Any], interval: float = 0.002, timeout: float = WAIT) -> Any:
        """Poll ``predicate`` until it is truthy (returns it), the process exits or the time is up (returns None)."""
        end = min(self.deadline, time.monotonic() + timeout)
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            if not self.alive():
                return predicate() or None
            time.sleep(interval)
        return None

    def event(self, name: str) -> Optional[dict[str, Any]]:
        for e in read_events(self.run_dir):
            if e.get("event") == name and e.get("pid") == self.proc.pid:
                return e
        return None

    def step(self) -> Optional[int]:
        try:
            data = json.loads((self.run_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return None
        return data.get("step") if isinstance(data, dict) and data.get("pid") == self.proc.pid else None

    def wait_train_start(self) -> Optional[int]:
        e = self.wait_for(lambda: self.event(Event.TRAIN_START), interval=0.02)
        self.start = e.get("step") if e else None
        return self.start

    def wait_step(self, at_least: int) -> Optional[int]:
        """Wait until the progress file shows ``at_least``; when the attempt holds after that step
        (``--hold step:N``, N counted from the start), wait until it is held there too (then a signal sent
        now stops it at the next step, not inside the boundary that wrote the progress file)."""
        step = self.wait_for(lambda: (s := self.step()) is not None and s >= at_least and s)
        point = f"step:{at_least - self.start}" if self.start is not None else None
        if step and point in self.holds and not self.wait_hold(point):
            return None
        return step

    def temp_files(self) -> list[Path]:
        try:
            return [self.ckpt_dir / n for n in os.listdir(self.ckpt_dir) if n.startswith(".tmp-step-") and COMMIT_SUFFIX not in n]
        except FileNotFoundError:
            return []

    def records(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.ckpt_dir) if n.endswith(COMMIT_SUFFIX)}
        except FileNotFoundError:
            return set()

    # -- holds (``children train --hold``): the attempt pauses at a state until the script has acted -------
    def _hold_marker(self, name: str) -> Path:
        # the names of preemptible.tools.faults.children.hold_marker (not imported: the children module runs as
        # a fresh ``__main__``), in the directory run_attempt gives the child (HOLD_DIR_ENV)
        return hold_dir_of(self.run_dir) / f"attempt-{self.index}.{name.replace(':', '-')}"

    def wait_hold(self, point: str) -> bool:
        """Wait until the attempt is held at ``point`` (``"mid-write"``, ``"after-commit"``); False if it never is."""
        return bool(self.wait_for(self._hold_marker(point).exists, interval=0.005))

    def release(self) -> None:
        """Let a held attempt go on."""
        marker = self._hold_marker("release")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def signal(self, sig: signal.Signals) -> bool:
        if not self.alive():  # reaps it: a zombie's process group would still accept signals
            return False
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        self.sent[sig.name] += 1
        return True


@dataclasses.dataclass
class AttemptResult:
    index: int
    exit_code: Optional[int]
    timed_out: bool
    output: str
    start_step: Optional[int]
    events: list[dict[str, Any]]
    sent: collections.Counter[str]
    notes: dict[str, Any]

    def event(self, name: str) -> Optional[dict[str, Any]]:
        return next((e for e in self.events if e.get("event") == name), None)

    @property
    def checkpoint_event(self) -> Optional[dict[str, Any]]:
        return self.event(Event.CHECKPOINT)


def run_attempt(cmd: Sequence[str], run_dir: Path, index: int, *, script: Optional[Callable[[Control], None]] = None,
                preexec: Optional[Callable[[], None]] = None, timeout: float = 240.0, log: Optional[Path] = None,
                env: Optional[dict[str, str]] = None) -> AttemptResult:
    """Start one attempt, run ``script(control)`` against it, wait for its exit (killing it past ``timeout``)."""
    full_env = dict(os.environ, PREEMPTIBLE_RUN_DIR=str(run_dir), PREEMPTIBLE_ATTEMPT=str(index),
                    PREEMPTIBLE_PROGRESS_INTERVAL="0", PYTHONUNBUFFERED="1", **{HOLD_DIR_ENV: str(hold_dir_of(run_dir))})
    full_env.pop("SLURM_JOB_ID", None)
    full_env.update(env or {})
    log = log or run_dir.parent / f"attempt-{index}.log"
    deadline = time.monotonic() + timeout
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                preexec_fn=preexec, cwd=str(ROOT))
        ctl = Control(proc, run_dir, deadline, index, holds=_holds_of(cmd, index))
        timed_out = False
        try:
            if script is not None:
                script(ctl)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    events = [e for e in read_events(run_dir) if e.get("pid") == proc.pid]
    start = next((e.get("step") for e in events if e.get("event") == Event.TRAIN_START), None)
    return AttemptResult(index, proc.returncode, timed_out, log.read_text(errors="replace"), start, events, ctl.sent, ctl.notes)


def _holds_of(cmd: Sequence[str], index: int) -> list[str]:
    """The ``--hold`` points of attempt ``index`` in a ``children train`` command line (one value per attempt)."""
    values = [cmd[i + 1] for i, arg in enumerate(cmd[:-1]) if arg == "--hold"]
    return [p for p in values[index].split(",") if p and p != "-"] if index < len(values) else []


def last_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return {144: "requeue", 0: "finished", 1: "error"}.get(code, "other")  # type: ignore[arg-type]


def final_error(output: str) -> str:
    """The last line of the traceback that ended the process (what a user reads first)."""
    lines = [ln for ln in output.splitlines() if re.match(r"^[\w.]*(Error|Exception)\b.*: ", ln)]
    return lines[-1] if lines else ""
