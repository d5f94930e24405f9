#!/usr/bin/env python
"""Fault-injection campaigns for preemptible: ``make faults`` -> a table on stdout and ``benchmarks/FAULTS.md``.

Every campaign injects a real fault into a real process and then plays "the next start": it checks,
independently of the store's own bookkeeping, that the run resumes from the newest *complete*
checkpoint, that no partial or damaged file is ever handed out, that no committed checkpoint is
lost, that nothing hangs, and that a fault the library cannot repair ends with a clear error.

Campaigns (``--only`` takes these names):

* ``store-kill``: a child process commits 24 MiB checkpoints in a loop through ``CheckpointStore``
  and is SIGKILLed at a random moment (or when its temp file reaches a random size).
* ``lightning-kill``: the example training with a 16 MiB checkpoint gets a preemption signal and is
  SIGKILLed 0-250 ms later (or the moment its temp file / commit record appears).
* ``periodic-kill``: SIGKILL without warning while background periodic checkpoints are written.
* ``damage``: committed checkpoints are truncated, bit-flipped, emptied, overwritten with random
  bytes, or their commit record is damaged or removed.
* ``disk-full``: a write fails with EFBIG (``RLIMIT_FSIZE`` in a child process, SIGXFSZ ignored) or
  ENOSPC (a small tmpfs, when ``mount -t tmpfs`` works here) at the store; ``lightning-disk-full``:
  the same in a real emergency save.
* ``storm``: 100+ mixed signals through the save and the exit; ``term-during-save``: SIGTERM while the
  checkpoint is written; ``early-second``: a second preemption right after a resume; ``teardown``:
  SIGTERM after the last step, then a restart.

Usage::

    python benchmarks/faults.py                 # default trial counts (about 12 minutes on 2 cores)
    python benchmarks/faults.py --quick         # a smoke run
    python benchmarks/faults.py --trials 300    # scale every campaign
    python benchmarks/faults.py --only damage,store-kill

Internal entry points used by the campaigns and by ``tests/test_faults.py`` (child processes):
``faults.py _writer ...``, ``faults.py _limited-writer ...`` and ``faults.py _train ...``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
PY = sys.executable
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from preemptible.core.store import COMMIT_SUFFIX, CheckpointError, CheckpointStore, CommitRecord, file_checksum  # noqa: E402
from preemptible.examples.train import options_to_argv  # noqa: E402

MiB = 1 << 20
CKPT_NAME = re.compile(r"^step-(\d{9})(?:\.(\d+))?\.ckpt$")
WAIT = 120.0  # seconds any single wait may take before it counts as a hang


# =====================================================================================================
# Tallies and the table
# =====================================================================================================
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
    moments: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    stats: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # not in the table

    def problem(self, text: str) -> None:
        self.problems.append(text)

    @property
    def ok(self) -> bool:
        return not (self.partial_loaded or self.lost or self.hang or self.problems)


COLUMNS = ["fault", "trials", "faults injected", "resumed from newest complete", "partial file loaded",
           "committed checkpoint lost", "hang", "clear error", "other problems"]


def table_rows(tallies: Sequence[Tally]) -> list[list[str]]:
    return [[t.fault, str(t.trials), str(t.injected), str(t.resumed_newest), str(t.partial_loaded), str(t.lost),
             str(t.hang), str(t.clear_error), str(len(t.problems))] for t in tallies]


def render_text(tallies: Sequence[Tally]) -> str:
    rows = [COLUMNS] + table_rows(tallies)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(tallies: Sequence[Tally]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(tallies)]
    return "\n".join(lines)


def moments_text(t: Tally) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(t.moments.items(), key=lambda kv: -kv[1]))


# =====================================================================================================
# Deterministic payloads: the oracle knows every byte a complete checkpoint of a step must hold
# =====================================================================================================
_BASE: bytes | None = None
_SHA_CACHE: dict[tuple[int, int], str] = {}


def _base() -> bytes:
    global _BASE
    if _BASE is None:
        _BASE = random.Random(20240607).randbytes(MiB)
    return _BASE


def payload_chunks(step: int, size: int) -> Iterator[bytes]:
    """The bytes of a checkpoint for ``step``: 1 MiB chunks, each stamped with (step, chunk index)."""
    base, done, i = _base(), 0, 0
    while done < size:
        head = f"step={step};chunk={i};".encode().ljust(32, b".")
        chunk = (head + base[32:])[: size - done]
        yield chunk
        done += len(chunk)
        i += 1


def sha256_of(path: Path) -> str:
    """The content's identity (independent of the store's own checksum, which is under test)."""
    return file_checksum(path, "sha256").partition(":")[2]


def recorded_checksum_holds(path: Path, recorded: str) -> bool:
    algorithm = recorded.partition(":")[0]
    try:
        return file_checksum(path, algorithm) == recorded
    except ValueError:  # an unknown algorithm: the record does not describe this file
        return False


def expected_sha(step: int, size: int) -> str:
    key = (step, size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for c in payload_chunks(step, size):
            h.update(c)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def commit_payload(store: CheckpointStore, step: int, size: int) -> Any:
    pending = store.begin(step)
    store.write(pending, lambda f: [f.write(c) for c in payload_chunks(step, size)])
    return store.commit(pending, CommitRecord(file="", step=step, bytes=0, checksum="", reason="fault-campaign"))


# =====================================================================================================
# Child: a writer that commits checkpoints in a loop (store-level SIGKILL campaign)
# =====================================================================================================
def writer_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="faults.py _writer")
    p.add_argument("directory")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--pause", type=float, default=0.1, help="up to this many seconds of 'training' between saves")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    store = CheckpointStore(a.directory, keep=2)
    rng = random.Random(a.seed)
    fd = os.open(a.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def log(event: str, step: int) -> None:
        os.write(fd, f"{os.getpid()} {event} {step}\n".encode())

    # What every start does: clear dead writers' temp files, resume from the newest valid checkpoint.
    store.clean_stale_temps()
    latest = store.latest_valid()
    step = (latest.step if latest else 0) + 1
    print("ready", flush=True)
    while True:
        log("begin", step)
        stored = commit_payload(store, step, a.size)
        log("commit", step)
        store.prune(protect={stored.path})
        log("pruned", step)
        time.sleep(rng.uniform(0, a.pause))
        step += 1


def limited_writer_main(argv: Sequence[str]) -> int:
    """Write one checkpoint of ``--size`` bytes; exit 3 with the error on stdout if the store refuses."""
    p = argparse.ArgumentParser(prog="faults.py _limited-writer")
    p.add_argument("directory")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--step", type=int, required=True)
    a = p.parse_args(argv)
    store = CheckpointStore(a.directory, keep=2)
    try:
        commit_payload(store, a.step, a.size)
    except CheckpointError as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
        return 3
    return 0


def fsize_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: files this child writes may not grow past ``limit`` bytes (write fails with EFBIG)."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited across exec: write() returns EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# =====================================================================================================
# Child: the example training with a bigger checkpoint and self-signals at awkward points
# =====================================================================================================
SELF_SIGNAL_POINTS = ("sanity", "save", "train_end", "fit_end", "teardown", "after_fit")


def train_main(argv: Sequence[str]) -> int:
    """``preemptible.examples.train`` plus fault hooks; options not listed here go to the example.

    ``--ballast-mb N`` adds an N MiB tensor to the checkpoint (in a callback's state, so the model, its
    losses and its weight digest stay those of the plain example). ``--self-signal POINT:SIG`` makes the
    process signal itself at POINT: ``sanity`` (first sanity-check batch), ``save`` (while the
    checkpoint is being assembled), ``train_end``, ``fit_end`` (after Lightning restored the signal
    handlers, before preemptible's own on_fit_end), ``teardown`` (after preemptible's teardown),
    ``after_fit`` (after ``trainer.fit`` returned).
    """
    p = argparse.ArgumentParser(prog="faults.py _train", add_help=False)
    p.add_argument("--ballast-mb", type=float, default=0.0)
    p.add_argument("--self-signal", action="append", default=[], metavar="POINT:SIG")
    ours, rest = p.parse_known_args(argv)
    points: dict[str, signal.Signals] = {}
    for spec in ours.self_signal:
        point, _, name = spec.partition(":")
        if point not in SELF_SIGNAL_POINTS:
            raise SystemExit(f"unknown self-signal point {point!r}; one of {SELF_SIGNAL_POINTS}")
        points[point] = signal.Signals["SIG" + (name or "TERM").upper().removeprefix("SIG")]
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    import pytorch_lightning as pl
    import torch

    from preemptible.examples import train as train_example

    def fire(point: str) -> None:
        sig = points.pop(point, None)  # each point fires once per process
        if sig is not None:
            print(f"faults: self-signal {sig.name} at {point}", flush=True)
            os.kill(os.getpid(), sig)

    class Ballast(pl.Callback):
        def __init__(self, mib: float) -> None:
            self.tensor = torch.arange(int(mib * MiB) // 4, dtype=torch.float32)

        def state_dict(self) -> dict[str, Any]:
            fire("save")
            return {"ballast": self.tensor}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            if not torch.equal(state_dict["ballast"], self.tensor):
                raise RuntimeError("faults: the ballast tensor read back from the checkpoint differs")

    class Before(pl.Callback):  # placed before PreemptionCallback
        def on_validation_batch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if trainer.sanity_checking:
                fire("sanity")

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            fire("train_end")

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            fire("fit_end")

    class After(pl.Callback):  # placed after PreemptionCallback
        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            fire("teardown")

    class Trainer(pl.Trainer):
        def __init__(self, *args: Any, callbacks: Optional[list] = None, **kwargs: Any) -> None:
            extra: list = [Ballast(ours.ballast_mb)] if ours.ballast_mb else []
            super().__init__(*args, callbacks=[Before(), *(callbacks or []), *extra, After()], **kwargs)

    pl.Trainer = Trainer  # type: ignore[misc]  # train_example looks it up at call time
    code = train_example.main(rest)
    fire("after_fit")
    return code


def train_command(record: Optional[Path], *, max_steps: int, step_sleep: float = 0.05, ballast_mb: float = 0.0,
                  self_signal: Sequence[str] = (), **options: Any) -> list[str]:
    cmd = [PY, str(SCRIPT), "_train", "--max-steps", str(max_steps), "--step-sleep", str(step_sleep)]
    if record is not None:
        cmd += ["--record", str(record)]
    if ballast_mb:
        cmd += ["--ballast-mb", str(ballast_mb)]
    for s in self_signal:
        cmd += ["--self-signal", s]
    return cmd + options_to_argv(**options)


# =====================================================================================================
# Driving one attempt of a training run: poll its files, signal it, bound every wait
# =====================================================================================================
def read_events(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    try:
        with open(run_dir / "events.jsonl", "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    e = json.loads(line)
                    if isinstance(e, dict):
                        out.append(e)
    except FileNotFoundError:
        pass
    return out


class Control:
    """What a fault script sees of a running attempt (one process: devices=1, no loader workers)."""

    def __init__(self, proc: subprocess.Popen, run_dir: Path, deadline: float) -> None:
        self.proc, self.run_dir, self.deadline = proc, run_dir, deadline
        self.ckpt_dir = run_dir / "checkpoints"
        self.sent: collections.Counter = collections.Counter()
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
            data = json.loads((self.run_dir / "progress.json").read_text())
        except (OSError, ValueError):
            return None
        return data.get("step") if isinstance(data, dict) and data.get("pid") == self.proc.pid else None

    def wait_train_start(self) -> Optional[int]:
        e = self.wait_for(lambda: self.event("train_start"), interval=0.02)
        return e.get("step") if e else None

    def wait_step(self, at_least: int) -> Optional[int]:
        return self.wait_for(lambda: (s := self.step()) is not None and s >= at_least and s)  # type: ignore[return-value]

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
    sent: collections.Counter
    notes: dict[str, Any]

    def event(self, name: str) -> Optional[dict[str, Any]]:
        return next((e for e in self.events if e.get("event") == name), None)

    @property
    def checkpoint_event(self) -> Optional[dict[str, Any]]:
        return self.event("checkpoint")


def run_attempt(cmd: Sequence[str], run_dir: Path, index: int, *, script: Optional[Callable[[Control], None]] = None,
                preexec: Optional[Callable[[], None]] = None, timeout: float = 240.0, log: Optional[Path] = None,
                env: Optional[dict[str, str]] = None) -> AttemptResult:
    """Start one attempt, run ``script(control)`` against it, wait for its exit (killing it past ``timeout``)."""
    full_env = dict(os.environ, PREEMPTIBLE_RUN_DIR=str(run_dir), PREEMPTIBLE_ATTEMPT=str(index),
                    PREEMPTIBLE_PROGRESS_INTERVAL="0", PYTHONUNBUFFERED="1")
    full_env.pop("SLURM_JOB_ID", None)
    full_env.update(env or {})
    log = log or run_dir.parent / f"attempt-{index}.log"
    deadline = time.monotonic() + timeout
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                preexec_fn=preexec, cwd=str(REPO))
        ctl = Control(proc, run_dir, deadline)
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
    start = next((e.get("step") for e in events if e.get("event") == "train_start"), None)
    return AttemptResult(index, proc.returncode, timed_out, log.read_text(errors="replace"), start, events, ctl.sent, ctl.notes)


# =====================================================================================================
# Independent checks of a run directory's checkpoints
# =====================================================================================================
@dataclasses.dataclass
class Inventory:
    records: dict[str, dict[str, Any]]  # checkpoint file name -> parsed record (None if unreadable)
    intact: dict[str, int]  # committed checkpoint name -> step, for those whose bytes match their record
    broken: list[str]  # committed (record present) but not intact
    temps: list[str]
    orphans: list[str]  # data files without a record

    @property
    def newest_intact_step(self) -> int:
        return max(self.intact.values(), default=0)


def inventory(ckpt_dir: Path, loadable: bool = False) -> Inventory:
    """Recompute everything from the bytes on disk (size and checksum against the record, optionally torch.load)."""
    names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
    records: dict[str, Any] = {}
    for n in names:
        if n.endswith(COMMIT_SUFFIX) and not n.startswith("."):
            try:
                records[n[: -len(COMMIT_SUFFIX)]] = json.loads((ckpt_dir / n).read_text())
            except (OSError, ValueError):
                records[n[: -len(COMMIT_SUFFIX)]] = None
    intact, broken = {}, []
    for name, rec in records.items():
        path = ckpt_dir / name
        ok = (isinstance(rec, dict) and path.is_file() and path.stat().st_size == rec.get("bytes")
              and isinstance(rec.get("checksum"), str) and recorded_checksum_holds(path, rec["checksum"]))
        if ok and loadable:
            import torch

            try:
                ck = torch.load(path, map_location="cpu", weights_only=True)
                ok = ck.get("global_step") == rec.get("step")
            except Exception:  # noqa: BLE001 - any failure means not a usable checkpoint
                ok = False
        if ok:
            intact[name] = int(rec["step"])
        else:
            broken.append(name)
    temps = sorted(n for n in names if n.startswith(".tmp-"))
    orphans = sorted(n for n in names if CKPT_NAME.match(n) and n not in records)
    return Inventory(records, intact, broken, temps, orphans)


# =====================================================================================================
# (a) SIGKILL at random moments during checkpoint writes: the store under a looping writer
# =====================================================================================================
def store_kill_trials(workdir: Path, trials: int, *, seed: int = 1, size: int = 24 * MiB, max_delay: float = 1.5,
                      targeted: float = 1 / 3, pause: float = 0.1) -> Tally:
    """``trials`` restarts of a writer in one directory, each killed with SIGKILL.

    Two thirds of the kills land after a random delay (mid-write or between writes, as it falls), a third
    when the temp file has reached a random size (certainly mid-write). After each kill the oracle
    recomputes every committed checkpoint's bytes, then plays the next start (clean stale temps, latest_valid).
    """
    tally = Tally("SIGKILL at a random moment of a checkpoint write (store, 24 MiB checkpoints)")
    rng = random.Random(seed)
    directory = workdir / "store-kill"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log = workdir / "store-kill.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    logged_commits: set[int] = set()
    known_orphans: set[str] = set()
    targeted_kills = 0
    for t in range(trials):
        tally.trials += 1
        proc = subprocess.Popen([PY, str(SCRIPT), "_writer", str(directory), "--size", str(size), "--log", str(log),
                                 "--pause", str(pause), "--seed", str(seed * 100003 + t)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], WAIT)
            if not ready or proc.stdout.readline().strip() != b"ready":  # type: ignore[union-attr]
                tally.hang += 1
                tally.problem(f"trial {t}: the writer did not start ({proc.poll()=})")
                continue
            if rng.random() < targeted:
                target = rng.randrange(size)
                targeted_kills += 1
                if not _kill_when_temp_reaches(directory, target, proc):
                    tally.hang += 1
                    tally.problem(f"trial {t}: the temp file never reached {target} bytes")
                    continue
            else:
                time.sleep(rng.uniform(0, max_delay))
                os.kill(proc.pid, signal.SIGKILL)
            tally.injected += 1
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            for stream in (proc.stdout, proc.stderr):
                stream.close()  # type: ignore[union-attr]
        # ---- what the kill left behind ---------------------------------------------------------------
        mine = [ln.split() for ln in log.read_text().splitlines() if ln.startswith(f"{proc.pid} ")]
        logged_commits |= {int(s) for _, ev, s in mine if ev == "commit"}
        inv = inventory(directory)
        new_orphans = set(inv.orphans) - known_orphans
        data_temps = [n for n in inv.temps if COMMIT_SUFFIX not in n]
        if data_temps:
            temp_size = (directory / data_temps[0]).stat().st_size
            tally.moments["mid-write (data complete, before rename)" if temp_size == size else "mid-write"] += 1
        elif any(COMMIT_SUFFIX in n for n in inv.temps) or new_orphans:
            tally.moments["after rename, before commit record"] += 1
        elif not any(ev == "begin" for _, ev, _ in mine):
            tally.moments["before the first write (start-up)"] += 1
        elif mine and mine[-1][1] == "commit":
            tally.moments["after commit, during pruning"] += 1
        else:
            tally.moments["between writes"] += 1
        known_orphans |= new_orphans
        # ---- oracle: bytes of every committed checkpoint; nothing retained may be missing -----------------
        for name in inv.broken:
            tally.problem(f"trial {t}: committed checkpoint {name} does not match its record after a kill")
        for name, step in inv.intact.items():
            if sha256_of(directory / name) != expected_sha(step, size):
                tally.problem(f"trial {t}: committed checkpoint {name} holds bytes the writer never wrote")
        committed_steps = logged_commits | set(inv.intact.values())
        retained = sorted(committed_steps)[-2:]
        missing = [s for s in retained if s not in inv.intact.values()]
        newest = max(inv.intact.values(), default=None)
        # ---- the next start -----------------------------------------------------------------------------
        store = CheckpointStore(directory, keep=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store.clean_stale_temps()
            found = store.latest_valid()
        for w in caught:
            tally.problem(f"trial {t}: unexpected warning on restart: {w.message}")
        left = [n for n in os.listdir(directory) if n.startswith(".tmp-")]
        if left:
            tally.problem(f"trial {t}: temp files of a dead writer survived the restart's clean-up: {left}")
        if found is not None and sha256_of(found.path) != expected_sha(found.step, size):
            tally.partial_loaded += 1
        elif missing or (newest is not None and (found is None or found.step != newest)):
            tally.lost += 1
            tally.problem(f"trial {t}: retained steps {retained}, missing {missing}, newest {newest}, got {found and found.step}")
        else:
            tally.resumed_newest += 1
    tally.stats["targeted"] = targeted_kills
    tally.notes.append(f"{targeted_kills} kills were timed by the temp file reaching a random size, the others by a "
                       f"random delay of 0-{max_delay} s after the writer's start")
    tally.notes.append(f"{len(known_orphans)} complete data file(s) without commit record left behind by kills between "
                       "rename and commit record (never loaded; not cleaned up either)")
    tally.seconds = time.monotonic() - started
    shutil.rmtree(directory, ignore_errors=True)
    return tally


def _kill_when_temp_reaches(directory: Path, target: int, proc: subprocess.Popen) -> bool:
    end = time.monotonic() + WAIT
    while time.monotonic() < end and proc.poll() is None:
        for name in os.listdir(directory):
            if name.startswith(".tmp-step-") and COMMIT_SUFFIX not in name:
                with contextlib.suppress(FileNotFoundError):
                    if (directory / name).stat().st_size >= target:
                        os.kill(proc.pid, signal.SIGKILL)
                        return True
        time.sleep(0.0005)
    return False


# =====================================================================================================
# (b) Damaged files: every one detected, reported by name, quarantined, the previous one used
# =====================================================================================================
DATA_DAMAGE = ["truncated at a random offset", "random bit flips", "zero-length", "random bytes, same size",
               "random bytes, other size", "garbage appended", "data file missing"]
RECORD_DAMAGE = ["record truncated", "record random bytes", "record zero-length", "record checksum altered",
                 "record size altered", "record is JSON null", "record missing"]


def damage(path: Path, record: Path, kind: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if kind == "truncated at a random offset":
        path.write_bytes(data[: rng.randrange(1, len(data))])
    elif kind == "random bit flips":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        if bytes(buf) == data:  # flips cancelled out: flip one more
            buf[0] ^= 1
        path.write_bytes(bytes(buf))
    elif kind == "zero-length":
        path.write_bytes(b"")
    elif kind == "random bytes, same size":
        path.write_bytes(rng.randbytes(len(data)))
    elif kind == "random bytes, other size":
        path.write_bytes(rng.randbytes(rng.choice([rng.randrange(1, len(data)), len(data) + rng.randrange(1, 4096)])))
    elif kind == "garbage appended":
        path.write_bytes(data + rng.randbytes(rng.randrange(1, 4096)))
    elif kind == "data file missing":
        path.unlink()
    else:
        text = record.read_text()
        rec = json.loads(text)
        if kind == "record truncated":
            record.write_text(text[: rng.randrange(0, len(text) - 2)])
        elif kind == "record random bytes":
            record.write_bytes(rng.randbytes(rng.randrange(1, 600)))
        elif kind == "record zero-length":
            record.write_bytes(b"")
        elif kind == "record checksum altered":
            kind_, digest = rec["checksum"].split(":")
            i = rng.randrange(len(digest))
            rec["checksum"] = f"{kind_}:{digest[:i]}{'0' if digest[i] != '0' else '1'}{digest[i + 1:]}"
            record.write_text(json.dumps(rec))
        elif kind == "record size altered":
            rec["bytes"] += rng.choice([-1, 1]) * rng.randint(1, 1000)
            record.write_text(json.dumps(rec))
        elif kind == "record is JSON null":
            record.write_text("null")
        elif kind == "record missing":
            record.unlink()
        else:
            raise ValueError(kind)


def damage_trials(workdir: Path, trials: int, *, seed: int = 2) -> Tally:
    tally = Tally("damaged checkpoint or commit record (random kind, offset and bits; 1-3 of 2-4 checkpoints)")
    rng = random.Random(seed)
    started = time.monotonic()
    base = workdir / "damage"
    shutil.rmtree(base, ignore_errors=True)
    for t in range(trials):
        directory = base / f"t{t}"
        store = CheckpointStore(directory, keep=10)
        n = rng.randint(2, 4)
        sizes = {s: rng.randint(1, 256 * 1024) for s in range(1, n + 1)}
        saved = [commit_payload(store, s, sizes[s]) for s in range(1, n + 1)]
        m = rng.randint(1, n - 1)
        damaged = {}
        for ck in saved[-m:]:
            kind = rng.choice(DATA_DAMAGE + RECORD_DAMAGE)
            damage(ck.path, ck.record_path, kind, rng)
            damaged[ck.path.name] = kind
            tally.moments[kind] += 1
            tally.injected += 1
        tally.trials += 1
        expected = saved[-m - 1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = store.latest_valid()
        messages = [str(w.message) for w in caught]
        quarantined = os.listdir(directory / "quarantine") if (directory / "quarantine").is_dir() else []
        if found is not None and sha256_of(found.path) != expected_sha(found.step, sizes[found.step]):
            tally.partial_loaded += 1
        elif found is None or found.path != expected.path:
            tally.lost += 1
        else:
            tally.resumed_newest += 1
        for name, kind in damaged.items():
            if kind == "record missing":
                # No record: the file was never committed as far as the store can tell (the crash-between-
                # rename-and-record case). It is skipped silently and left where it is.
                if any(name in msg for msg in messages) or not (directory / name).exists():
                    tally.problem(f"trial {t}: {name} without record was reported or moved")
                continue
            reported = any(name in msg for msg in messages)
            moved = [q for q in quarantined if q.startswith(name + ".") or q.startswith(name + COMMIT_SUFFIX + ".")]
            expected_moved = (kind != "data file missing") + 1  # data file (if it exists) and its record
            if reported and len(moved) == expected_moved:
                tally.clear_error += 1
            else:
                tally.problem(f"trial {t}: {name} ({kind}) reported={reported}, quarantined files {moved}")
        for ck in saved[: n - m]:
            if not ck.path.exists() or sha256_of(ck.path) != expected_sha(ck.step, sizes[ck.step]):
                tally.problem(f"trial {t}: an intact older checkpoint {ck.path.name} was touched")
    tally.notes.append("'clear error' counts damaged checkpoints reported by file name and moved to quarantine/; "
                       "a checkpoint whose record is missing counts as never committed (skipped silently, left in place)")
    tally.seconds = time.monotonic() - started
    shutil.rmtree(base, ignore_errors=True)
    return tally


# =====================================================================================================
# (c) Disk full and write errors
# =====================================================================================================
def rlimit_store_trials(workdir: Path, trials: int, *, seed: int = 3) -> Tally:
    """A child whose files may not grow past a random limit tries to commit a bigger checkpoint."""
    tally = Tally("write error: EFBIG from RLIMIT_FSIZE at a random offset (store, child process)")
    rng = random.Random(seed)
    started = time.monotonic()
    directory = workdir / "rlimit"
    for t in range(trials):
        shutil.rmtree(directory, ignore_errors=True)
        store = CheckpointStore(directory, keep=2)
        prev = commit_payload(store, 1, 128 * 1024)
        size = rng.randint(256 * 1024, 8 * MiB)
        limit = rng.randrange(0, size)
        proc = subprocess.run([PY, str(SCRIPT), "_limited-writer", str(directory), "--size", str(size), "--step", "2"],
                              capture_output=True, text=True, timeout=WAIT, preexec_fn=fsize_limit(limit))
        tally.trials += 1
        tally.injected += 1
        tally.moments["EFBIG at a random offset of the data"] += 1
        _judge_disk_full(tally, t, proc.returncode, proc.stdout + proc.stderr, directory, prev, "File too large")
    tally.seconds = time.monotonic() - started
    shutil.rmtree(directory, ignore_errors=True)
    return tally


def _judge_disk_full(tally: Tally, t: int, code: Optional[int], output: str, directory: Path, prev: Any, errno_text: str) -> None:
    inv = inventory(directory)
    leftovers = inv.temps + inv.orphans
    clear = code == 3 and "CheckpointError" in output and "step-000000002" in output and errno_text in output
    if clear:
        tally.clear_error += 1
    else:
        tally.problem(f"trial {t}: exit {code}, unclear or no error: {output.strip()[-300:]}")
    if leftovers:
        tally.problem(f"trial {t}: left behind after the failed save: {leftovers}")
    found = CheckpointStore(directory).latest_valid()
    if found is None or inv.broken:
        tally.lost += 1
    elif found.path == prev.path and sha256_of(found.path) == expected_sha(1, prev.record.bytes):
        tally.resumed_newest += 1
    elif found.step == 2:
        tally.partial_loaded += 1  # the failed save's checkpoint is offered to the next start
    else:
        tally.lost += 1


@contextlib.contextmanager
def tmpfs(size_bytes: int) -> Iterator[Optional[Path]]:
    """A freshly mounted tmpfs of ``size_bytes``, or None where mounting is not allowed."""
    mnt = Path(tempfile.mkdtemp(prefix="preemptible-tmpfs-"))
    mounted = False
    try:
        if sys.platform.startswith("linux") and shutil.which("mount"):
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(mnt)],
                                     capture_output=True, timeout=30).returncode == 0
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def fill_until_free(mnt: Path, free: int) -> Path:
    """Create ``mnt/filler`` so that ``free`` bytes (rounded down to pages) remain."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(mnt)
    now = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, now - free))
    return filler


def tmpfs_store_trials(workdir: Path, trials: int, *, seed: int = 4) -> Optional[Tally]:
    """ENOSPC on a 16 MiB tmpfs: while writing the data (random free space), or exactly at the commit record."""
    tally = Tally("disk full: ENOSPC on a small tmpfs (store; data write or commit record)")
    rng = random.Random(seed)
    started = time.monotonic()
    with tmpfs(16 * MiB) as mnt:
        if mnt is None:
            return None
        for t in range(trials):
            directory = mnt / "ckpt"
            shutil.rmtree(directory, ignore_errors=True)
            store = CheckpointStore(directory, keep=2)
            prev = commit_payload(store, 1, 128 * 1024)
            size = rng.randint(1 * MiB, 6 * MiB)
            page = os.statvfs(mnt).f_frsize
            at_record = t % 3 == 2
            free = -(-size // page) * page if at_record else rng.randrange(0, size - page)
            tally.moments["ENOSPC at the commit record" if at_record else "ENOSPC while writing the data"] += 1
            fill_until_free(mnt, free)
            output, code = "", 0
            try:
                commit_payload(store, 2, size)
            except CheckpointError as exc:
                output, code = f"CheckpointError: {exc}", 3
            tally.trials += 1
            tally.injected += 1
            _judge_disk_full(tally, t, code, output, directory, prev, "No space left on device")
            (mnt / "filler").unlink()
    tally.seconds = time.monotonic() - started
    return tally


# =====================================================================================================
# Lightning chains: one run directory, one fault per attempt, the next attempt checks the resume
# =====================================================================================================
def load_losses(record: Path) -> tuple[dict[tuple, str], dict[int, str]]:
    losses, final = {}, {}
    if record.exists():
        for line in record.read_text().splitlines():
            e = json.loads(line)
            if e["kind"] == "final":
                final[e["rank"]] = e["weights"]
            else:
                losses[(e["kind"], e["rank"], e["epoch"], e["batch"], e["step"])] = e["loss"]
    return losses, final


def merged_losses(records: Sequence[Path], starts: Sequence[int]) -> tuple[dict[tuple, str], dict[int, str], list[tuple]]:
    """The losses of a preempted run, attempt by attempt: attempt k owns steps (start_k, start_k+1]."""
    merged: dict[tuple, str] = {}
    duplicates: list[tuple] = []
    final: dict[int, str] = {}
    for k, record in enumerate(records):
        lo = starts[k]
        hi = starts[k + 1] if k + 1 < len(starts) else float("inf")
        losses, fin = load_losses(record)
        for key, loss in losses.items():
            if lo < key[4] <= hi:
                if key in merged:
                    duplicates.append(key)
                merged[key] = loss
        if k == len(records) - 1:
            final = fin
    return merged, final, duplicates


def compare_to_reference(records: Sequence[Path], starts: Sequence[int], reference: Path,
                         killed: Sequence[int] = ()) -> Optional[str]:
    """None when every loss and the final weights are bitwise those of the uninterrupted reference run.

    An attempt in ``killed`` may lack the loss of its very last step (SIGKILL after the commit, before the
    step's loss was recorded); the final weights are compared in any case.
    """
    got, final, dup = merged_losses(records, starts)
    want, want_final = load_losses(reference)
    excused = {starts[k + 1] for k in killed if k + 1 < len(starts)}
    if dup:
        return f"steps trained twice: {dup[:3]}"
    missing = sorted(k for k in set(want) - set(got) if k[4] not in excused)
    extra = sorted(set(got) - set(want))
    if missing or extra:
        return f"missing {missing[:3]}, extra {extra[:3]}"
    differ = [k for k in sorted(got) if got[k] != want[k]]
    if differ:
        return f"{len(differ)} losses differ, first at {differ[0]}"
    if final != want_final:
        return f"final weights differ: {final} vs {want_final}"
    return None


FaultScript = Callable[[Control, random.Random], None]


def lightning_chain(tally: Tally, workdir: Path, faults: Sequence[FaultScript], *, max_steps: int, ballast_mb: float,
                    expect_exit: int, reference: Optional[Path], scene: int = 0, seed: int = 5,
                    preexec: Optional[Callable[[], None]] = None, between: Optional[Callable[[int], None]] = None,
                    error_text: Sequence[str] = (), run_dir: Optional[Path] = None,
                    step_sleep: float = 0.05, options: Optional[dict[str, Any]] = None) -> list[AttemptResult]:
    """Attempt k suffers ``faults[k]``; attempt k+1 must start from the newest intact committed checkpoint.

    The first ``scene`` faults only set the scene (plain preemptions that commit checkpoints; exit 144)
    and are not counted; the others must end their attempt with ``expect_exit`` (-9 for SIGKILL), and
    with every string of ``error_text`` in the output. ``preexec`` applies to the counted attempts,
    ``between(k)`` runs before attempt k starts. A last attempt runs to the end, and the whole run's losses
    must equal ``reference`` bitwise.
    """
    rng = random.Random(seed)
    run_dir = run_dir or workdir / "run"
    records: list[Path] = []
    results: list[AttemptResult] = []
    starts: list[int] = []
    started = time.monotonic()
    for k, fault in enumerate([*faults, None]):
        counted = fault is not None and k >= scene
        if between is not None:
            between(k)
        before = inventory(run_dir / "checkpoints", loadable=True)
        for name in before.broken:
            tally.problem(f"attempt {k}: committed checkpoint {name} is damaged before the start")
        expected_start = before.newest_intact_step
        record = workdir / f"record-{k}.jsonl"
        record.unlink(missing_ok=True)
        records.append(record)
        cmd = train_command(record, max_steps=max_steps, ballast_mb=ballast_mb, step_sleep=step_sleep, **(options or {}))
        script = (lambda ctl, f=fault: f(ctl, rng)) if fault is not None else None
        res = run_attempt(cmd, run_dir, k, script=script, preexec=preexec if counted else None,
                          log=workdir / f"attempt-{k}.log")
        results.append(res)
        starts.append(res.start_step if res.start_step is not None else -1)
        if k > 0:  # attempt k is the next start after fault k-1
            judged = k - 1 >= scene
            if res.timed_out or res.start_step is None:
                tally.hang += res.timed_out and judged
                tally.problem(f"attempt {k}: did not start training (exit {res.exit_code}): {last_line(res.output)!r}")
            elif res.start_step != expected_start:
                if judged:
                    if res.start_step in before.intact.values() or res.start_step == 0:
                        tally.lost += 1
                    else:
                        tally.partial_loaded += 1
                tally.problem(f"attempt {k} resumed at step {res.start_step}, the newest complete checkpoint is "
                              f"at {expected_start}")
            elif judged:
                tally.resumed_newest += 1
        if fault is None:
            if res.exit_code != 0:
                tally.problem(f"final attempt exited {res.exit_code}: {last_line(res.output)!r}")
            continue
        want_exit = expect_exit if counted else 144
        if counted:
            tally.trials += 1
            tally.injected += res.notes.get("injected", 1)
            tally.moments[res.notes.get("moment", "fault applied")] += 1
        if res.timed_out:
            tally.hang += counted
            tally.problem(f"attempt {k} hung and was killed after its time limit")
        elif res.exit_code != want_exit:
            tally.problem(f"attempt {k}: exit code {res.exit_code}, expected {want_exit} "
                          f"({describe_exit(res.exit_code)}); its last words: {last_line(res.output)!r}")
        elif counted and error_text:
            final = final_error(res.output)
            if all(s in final for s in error_text):
                tally.clear_error += 1
            else:
                tally.problem(f"attempt {k}: the error does not say {error_text}: {final!r}")
        after = inventory(run_dir / "checkpoints", loadable=True)
        for name in after.broken:
            tally.problem(f"attempt {k}: committed checkpoint {name} is damaged after the fault")
        if counted and expect_exit not in (-9, 144):
            leftovers = after.temps + [o for o in after.orphans if o not in before.orphans]
            if leftovers or set(after.intact) != set(before.intact):
                tally.problem(f"attempt {k}: the failed save changed the checkpoints: left {leftovers}, "
                              f"committed {sorted(after.intact)} (before {sorted(before.intact)})")
        # Retention keeps the newest two: a new commit may prune the older of them, nothing else may go.
        kept_before = sorted(before.intact, key=lambda n: before.intact[n])[-2:]
        gone = [n for n in kept_before if n not in after.intact]
        new = set(after.intact) - set(before.intact)
        if gone and not (new and gone == kept_before[:1]):
            tally.lost += counted
            tally.problem(f"attempt {k}: committed checkpoint(s) {gone} disappeared")
    if reference is not None and all(s >= 0 for s in starts):
        diff = compare_to_reference(records, starts, reference,
                                    killed=[r.index for r in results if r.exit_code == -9])
        if diff:
            tally.problem(f"the preempted run differs from the uninterrupted one: {diff}")
        else:
            tally.notes.append("every loss and the final weights are bitwise those of an uninterrupted run")
    tally.seconds += time.monotonic() - started
    return results


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


def classify_kill(ctl: Control, records_before: set[str]) -> str:
    if ctl.temp_files():
        return "killed mid-write (temp file left)"
    if ctl.records() - records_before:
        return "killed after the commit (on the way out)"
    return "killed before the write began"


def _preempt_after_steps(ctl: Control, lead: int) -> Optional[set[str]]:
    """Wait until training is ``lead`` steps past its start, send SIGUSR1; return the commit records
    seen just before (``None`` when training never got there)."""
    start = ctl.wait_train_start()
    if start is None or not ctl.wait_step(start + lead):
        return None
    before = ctl.records()
    ctl.signal(signal.SIGUSR1)
    return before


def fault_kill_after_signal(max_delay: float, lead: int = 3) -> FaultScript:
    """USR1 a few steps after the start, SIGKILL a random 0..max_delay seconds later."""

    def script(ctl: Control, rng: random.Random) -> None:
        before = _preempt_after_steps(ctl, lead)
        if before is None:
            return
        time.sleep(rng.uniform(0, max_delay))
        ctl.signal(signal.SIGKILL)
        ctl.proc.wait(timeout=30)
        ctl.notes["moment"] = classify_kill(ctl, before)

    return script


def fault_kill_during_training(max_delay: float = 0.15) -> FaultScript:
    """SIGKILL without warning at a random moment 2-8 steps after the start (periodic saves may be in flight)."""

    def script(ctl: Control, rng: random.Random) -> None:
        start = ctl.wait_train_start()
        before = ctl.records()
        if start is None or not ctl.wait_step(start + rng.randint(2, 8)):
            return
        time.sleep(rng.uniform(0, max_delay))
        ctl.signal(signal.SIGKILL)
        ctl.proc.wait(timeout=30)
        if ctl.temp_files():
            ctl.notes["moment"] = "killed while a periodic checkpoint was being written"
        elif ctl.records() - before:
            ctl.notes["moment"] = "killed between saves (a periodic checkpoint committed since the start)"
        else:
            ctl.notes["moment"] = "killed between saves (none committed since the start)"

    return script


def fault_kill_when(what: str, lead: int = 3) -> FaultScript:
    """USR1, then SIGKILL as soon as the checkpoint's temp file (``"temp"``) or its commit record (``"record"``) appears."""

    def script(ctl: Control, rng: random.Random) -> None:
        before = _preempt_after_steps(ctl, lead)
        if before is None:
            return
        seen = ctl.wait_for(ctl.temp_files if what == "temp" else (lambda: ctl.records() - before), interval=0.0005)
        ctl.signal(signal.SIGKILL)
        ctl.proc.wait(timeout=30)
        ctl.notes["moment"] = classify_kill(ctl, before) if seen else f"never saw the {what}"

    return script


def fault_storm(total: int = 100, term_burst: int = 30) -> FaultScript:
    """USR1 at a random step, a burst of SIGTERM while the checkpoint is written, then mixed signals every
    0-4 ms: at least ``total`` in all, and on until the process is gone (through its exit)."""

    def script(ctl: Control, rng: random.Random) -> None:
        start = ctl.wait_train_start()
        if start is None or not ctl.wait_step(start + rng.randint(2, 5)):
            return
        ctl.signal(signal.SIGUSR1)
        if ctl.wait_for(ctl.temp_files, interval=0.0005):
            for _ in range(term_burst):
                ctl.signal(signal.SIGTERM)
            ctl.notes["moment"] = "SIGTERM burst landed while writing" if ctl.temp_files() else "burst overlapped the commit"
        mix = [signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2]
        end = time.monotonic() + WAIT
        while ctl.signal(rng.choice(mix)) and time.monotonic() < end:
            time.sleep(rng.uniform(0, 0.004) if sum(ctl.sent.values()) >= total else rng.uniform(0, 0.002))
        ctl.notes["injected"] = sum(ctl.sent.values())

    return script


def fault_term_during_save() -> FaultScript:
    """USR1; one SIGTERM when the temp file appears, another when the commit record appears (SLURM's follow-up)."""

    def script(ctl: Control, rng: random.Random) -> None:
        start = ctl.wait_train_start()
        if start is None or not ctl.wait_step(start + rng.randint(2, 5)):
            return
        before = ctl.records()
        ctl.signal(signal.SIGUSR1)
        if ctl.wait_for(ctl.temp_files, interval=0.0005):
            ctl.signal(signal.SIGTERM)
            writing = bool(ctl.temp_files())
            if ctl.wait_for(lambda: ctl.records() - before, interval=0.0005):
                ctl.signal(signal.SIGTERM)
            ctl.notes["injected"] = ctl.sent["SIGTERM"]
            ctl.notes["moment"] = "SIGTERM while writing + after commit" if writing else "SIGTERM just after the write"

    return script


def fault_early_second(variant: str) -> FaultScript:
    """Preempt right after the (re)start: at the 'resume' event (before any step) or after the first step."""

    def script(ctl: Control, rng: random.Random) -> None:
        if variant == "first":
            start = ctl.wait_train_start()
            if start is not None and ctl.wait_step(start + 4):
                ctl.signal(signal.SIGUSR1)
            ctl.notes["moment"] = "first preemption"
        elif variant == "before-first-step":
            if ctl.wait_for(lambda: ctl.event("resume"), interval=0.005):
                ctl.signal(signal.SIGUSR1)
            ctl.notes["moment"] = "signal during set-up of the resumed run"
        else:
            start = ctl.wait_train_start()
            if start is not None and ctl.wait_step(start + 1):
                ctl.signal(signal.SIGUSR1)
            ctl.notes["moment"] = "signal right after the resumed run's first step"

    return script


def fault_plain_preemption(lead: int = 3) -> FaultScript:
    def script(ctl: Control, rng: random.Random) -> None:
        start = ctl.wait_train_start()
        if start is not None and ctl.wait_step(start + lead):
            ctl.signal(signal.SIGUSR1)
        ctl.notes["moment"] = "preempted (SIGUSR1), nothing else"

    return script


def teardown_trials(workdir: Path, points: Sequence[str] = ("train_end", "fit_end", "teardown")) -> Tally:
    """SIGTERM after the last step, at each point of the way out of ``trainer.fit``; then a restart.

    The run must end cleanly (exit 0) and the restart must do nothing: resume at the end, train no step.
    """
    tally = Tally("SIGTERM after the last step (on_train_end / on_fit_end / teardown), then a restart")
    started = time.monotonic()
    for point in points:
        d = _mk(workdir / point)
        first = run_attempt(train_command(d / "record-0.jsonl", max_steps=6, self_signal=[f"{point}:TERM"]),
                            d / "run", 0, log=d / "attempt-0.log")
        tally.trials += 1
        tally.injected += f"self-signal SIGTERM at {point}" in first.output
        inv = inventory(d / "run" / "checkpoints", loadable=True)
        tally.moments[f"{point}: exit {first.exit_code}"] += 1
        if first.exit_code != 0:
            tally.problem(f"{point}: the finished run ended with exit code {first.exit_code} (death by the signal's "
                          "default action) instead of 0; its final checkpoint is intact")
        if inv.broken or inv.temps or inv.newest_intact_step != 6:
            tally.problem(f"{point}: checkpoints after the signal: intact {inv.intact}, broken {inv.broken}, temps {inv.temps}")
        again = run_attempt(train_command(d / "record-1.jsonl", max_steps=6), d / "run", 1, log=d / "attempt-1.log")
        trained = [k for k in load_losses(d / "record-1.jsonl")[0] if k[0] == "train"]
        events = [e["event"] for e in again.events]
        if again.timed_out:
            tally.hang += 1
        elif again.exit_code == 0 and not trained and "train_start" not in events and "finish" in events:
            tally.resumed_newest += 1
        else:
            tally.lost += 1
            tally.problem(f"{point}: the restart exited {again.exit_code}, trained {len(trained)} step(s), events {events}")
    tally.notes.append("a restart of the finished run resumes its final checkpoint and trains nothing")
    tally.seconds = time.monotonic() - started
    return tally


def reference_run(workdir: Path, max_steps: int, ballast_mb: float) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "record.jsonl"
    record.unlink(missing_ok=True)
    res = run_attempt(train_command(record, max_steps=max_steps, ballast_mb=ballast_mb), workdir / "run", 0,
                      log=workdir / "log.txt")
    if res.exit_code != 0:
        raise RuntimeError(f"the reference run failed ({res.exit_code}): {res.output[-2000:]}")
    return record


# =====================================================================================================
# The campaign
# =====================================================================================================
def campaign(args: argparse.Namespace) -> list[Tally]:
    n = args.trials
    quick = args.quick
    only = set(args.only.split(",")) if args.only else None
    counts = {
        "store-kill": n,
        "damage": 2 * n,
        "disk-full": max(4, n // 4),
        "lightning-kill": max(2, n // 15),
        "periodic-kill": max(2, n // 15),
        "lightning-disk-full": max(1, n // 50),
        "storm": max(1, n // 50),
        "term-during-save": max(1, n // 50),
        "early-second": max(2, n // 40),
    }
    want = (lambda name: only is None or name in only or name.split("-")[0] in only)
    tallies: list[Tally] = []
    root = Path(tempfile.mkdtemp(prefix="preemptible-faults-"))
    say = (lambda msg: print(msg, flush=True))
    try:
        if want("store-kill"):
            say(f"store-kill: {counts['store-kill']} trials ...")
            tallies.append(store_kill_trials(root, counts["store-kill"]))
        if want("damage"):
            say(f"damage: {counts['damage']} trials ...")
            tallies.append(damage_trials(root, counts["damage"]))
        if want("disk-full"):
            say(f"disk-full: {counts['disk-full']} trials each ...")
            tallies.append(rlimit_store_trials(root, counts["disk-full"]))
            t = tmpfs_store_trials(root, counts["disk-full"])
            if t is not None:
                tallies.append(t)
            else:
                say("  (tmpfs cannot be mounted here: ENOSPC campaign skipped)")
        lightning = [k for k in ("lightning-kill", "periodic-kill", "lightning-disk-full", "storm", "term-during-save", "early-second",
                                 "teardown") if want(k)]
        if set(lightning) - {"teardown"}:
            # Each trial uses up to ~8 steps past its resume point; the final attempt trains to the end.
            longest = max(counts[k] for k in ("lightning-kill", "periodic-kill", "storm", "term-during-save", "early-second"))
            max_steps = 40 if quick else max(90, 9 * longest + 10)
            say(f"reference run ({max_steps} steps) ...")
            ref = reference_run(root / "reference", max_steps, 16)
        if "lightning-kill" in lightning:
            k = counts["lightning-kill"]
            say(f"lightning-kill: {k} trials ...")
            t = Tally("SIGKILL 0-250 ms after the preemption signal (Lightning emergency save, 16 MiB checkpoint)")
            faults = ([fault_plain_preemption()] + [fault_kill_after_signal(0.25) for _ in range(max(0, k - 2))]
                      + [fault_kill_when("temp"), fault_kill_when("record")])
            lightning_chain(t, _mk(root / "lightning-kill"), faults, max_steps=max_steps, ballast_mb=16, expect_exit=-9,
                            reference=ref, scene=1)
            tallies.append(t)
        if "periodic-kill" in lightning:
            k = counts["periodic-kill"]
            say(f"periodic-kill: {k} trials ...")
            t = Tally("SIGKILL without warning during training with background checkpoints every 3 steps (16 MiB)")
            lightning_chain(t, _mk(root / "periodic-kill"), [fault_kill_during_training() for _ in range(k)],
                            max_steps=max_steps, ballast_mb=16, expect_exit=-9, reference=ref,
                            options={"every_n_steps": 3})
            tallies.append(t)
        if "lightning-disk-full" in lightning:
            k = counts["lightning-disk-full"]
            say(f"lightning-disk-full: {k} trials each ...")
            t = Tally("write error: EFBIG (RLIMIT_FSIZE 1 MiB) in the Lightning emergency save (4 MiB checkpoint)")
            faults = [fault_plain_preemption() for _ in range(k + 1)]
            lightning_chain(t, _mk(root / "lightning-rlimit"), faults, max_steps=max_steps, ballast_mb=4, expect_exit=1,
                            reference=ref, scene=1, preexec=fsize_limit(MiB),
                            error_text=("CheckpointError", "File too large", "step-0"))
            t.moments = collections.Counter({"EFBIG in the emergency save": t.trials})
            tallies.append(t)
            t = lightning_tmpfs_disk_full(_mk(root / "lightning-tmpfs"), k, max_steps, ref)
            if t is not None:
                tallies.append(t)
        if "storm" in lightning:
            k = counts["storm"]
            say(f"storm: {k} trials ...")
            t = Tally("storm of 100+ signals (USR1/TERM/USR2) from a random step through the save and the exit")
            lightning_chain(t, _mk(root / "storm"), [fault_storm() for _ in range(k)], max_steps=max_steps, ballast_mb=16,
                            expect_exit=144, reference=ref)
            tallies.append(t)
        if "term-during-save" in lightning:
            k = counts["term-during-save"]
            say(f"term-during-save: {k} trials ...")
            t = Tally("SIGTERM during the emergency save (while writing, and after the commit)")
            lightning_chain(t, _mk(root / "term"), [fault_term_during_save() for _ in range(k)], max_steps=max_steps,
                            ballast_mb=16, expect_exit=144, reference=ref)
            tallies.append(t)
        if "teardown" in lightning:
            say("teardown: 3 trials ...")
            tallies.append(teardown_trials(_mk(root / "teardown")))
        if "early-second" in lightning:
            k = counts["early-second"]
            say(f"early-second: {k} trials ...")
            t = Tally("second preemption in the resumed run's first moments (during set-up, or after step 1)")
            variants = ["before-first-step" if i % 2 == 0 else "after-first-step" for i in range(k)]
            lightning_chain(t, _mk(root / "early"), [fault_early_second("first")] + [fault_early_second(v) for v in variants],
                            max_steps=max_steps, ballast_mb=16, expect_exit=144, reference=ref, scene=1)
            tallies.append(t)
    finally:
        if args.keep_workdir:
            say(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return tallies


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def lightning_tmpfs_disk_full(workdir: Path, trials: int, max_steps: int, reference: Path) -> Optional[Tally]:
    """The run directory on a 48 MiB tmpfs; before each faulted attempt the free space is cut below one checkpoint."""
    tally = Tally("disk full: ENOSPC on a small tmpfs in the Lightning emergency save (4 MiB checkpoint)")
    with tmpfs(48 * MiB) as mnt:
        if mnt is None:
            return None
        rng = random.Random(11)

        def between(k: int) -> None:
            (mnt / "filler").unlink(missing_ok=True)
            if 1 <= k <= trials:
                # Room for the journal and the small files, not for a ~4 MiB checkpoint: 1 to 3 MiB free.
                fill_until_free(mnt, rng.randint(1 * MiB, 3 * MiB))

        faults = [fault_plain_preemption() for _ in range(trials + 1)]
        lightning_chain(tally, workdir, faults, max_steps=max_steps, ballast_mb=4, expect_exit=1, reference=reference,
                        scene=1, run_dir=mnt / "run", between=between,
                        error_text=("CheckpointError", "No space left on device", "step-0"))
    tally.moments = collections.Counter({"ENOSPC in the emergency save": tally.trials})
    return tally


def grouped_problems(tallies: Sequence[Tally]) -> list[tuple[str, str]]:
    """One line per distinct problem of a campaign, with the trials or attempts it happened in."""
    out = []
    for t in tallies:
        groups: dict[str, list[str]] = {}
        for p in t.problems:
            m = re.match(r"^(trial|attempt) (\d+): (.*)$", p, re.S)
            key, where = (m.group(3), f"{m.group(1)} {m.group(2)}") if m else (p, "")
            if m:  # the same problem in another trial differs only in step numbers and paths
                key = re.sub(r"(step[ -])\d+", r"\1N", key)
                key = re.sub(r"/\S*/(step-N\.ckpt)", r".../\1", key)
            groups.setdefault(key, []).append(where)
        for key, where in groups.items():
            seen = [w for w in where if w]
            out.append((t.fault, f"{key} ({len(seen)}x: {', '.join(seen)})" if seen else key))
    return out


def write_report(tallies: Sequence[Tally], args: argparse.Namespace, seconds: float, path: Path) -> None:
    import torch

    try:
        import pytorch_lightning as pl

        plv = pl.__version__
    except ImportError:
        plv = "?"
    lines = [
        "# Fault-injection campaign",
        "",
        f"Written by `make faults` (`python benchmarks/faults.py{' --quick' if args.quick else ''} --trials {args.trials}`) "
        f"on {time.strftime('%Y-%m-%d')}: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, pytorch-lightning {plv}; "
        f"{seconds / 60:.1f} minutes.",
        "",
        render_markdown(tallies),
        "",
        "Columns: *resumed from newest complete* — the next start used the newest checkpoint whose bytes match "
        "its commit record (recomputed by the campaign from the file, not taken from the store); "
        "*partial file loaded* — the next start used anything else (must be 0); *committed checkpoint lost* — a "
        "committed checkpoint that retention keeps disappeared or went bad, or an older one was used (must be 0); "
        "*hang* — a process or a wait exceeded its bound (must be 0); *clear error* — the fault ended the process with "
        "an error naming the file and the cause (disk full), or a damaged checkpoint was reported by name and moved "
        "to `quarantine/`; *other problems* — anything unexpected, listed below (must be 0).",
        "",
        "## Where the faults landed",
        "",
    ]
    for t in tallies:
        lines.append(f"* **{t.fault}** ({t.seconds:.0f} s): {moments_text(t) or '-'}")
        for note in t.notes:
            lines.append(f"  * {note}")
    lines += ["", "## Problems", ""]
    lines += [f"* {fault}: {p}" for fault, p in grouped_problems(tallies)] or ["None."]
    lines += [
        "",
        "## What this does not show",
        "",
        "SIGKILL stops a process, not the machine: data already handed to the kernel survives it, so these trials "
        "check the ordering of write, rename and commit record, not that `fsync` reaches the disk before a power "
        "loss. Network filesystems (NFS, Lustre) are not exercised here.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_writer":
        return writer_main(argv[1:])
    if argv and argv[0] == "_limited-writer":
        return limited_writer_main(argv[1:])
    if argv and argv[0] == "_train":
        return train_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=None, help="SIGKILL trials at the store (others scale with it); default 150")
    p.add_argument("--quick", action="store_true", help="a smoke run: few trials of each kind")
    p.add_argument("--only", default=None, help="comma-separated campaigns: store-kill, damage, disk-full, lightning-kill, "
                   "periodic-kill, lightning-disk-full, storm, term-during-save, early-second, teardown")
    p.add_argument("--out", type=Path, default=SCRIPT.parent / "FAULTS.md")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.trials is None:
        args.trials = 20 if args.quick else 150
    started = time.monotonic()
    tallies = campaign(args)
    seconds = time.monotonic() - started
    print()
    print(render_text(tallies))
    for t in tallies:
        print(f"* {t.fault} ({t.seconds:.0f} s): {moments_text(t)}")
    for t in tallies:
        for problem in t.problems:
            print(f"PROBLEM [{t.fault}]: {problem}")
    if args.out and not args.only:
        write_report(tallies, args, seconds, args.out)
        print(f"\nwritten: {args.out}")
    return 0 if all(t.ok for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
