"""The faults themselves: scripts run against a live training attempt, damage to files, full disks.

A :data:`FaultScript` gets the attempt's :class:`~preemptible.tools.faults.harness.Control` and a
random generator, waits for its moment (a step, a temp file, a commit record, an event) and injects
its fault; it notes where the fault landed in ``ctl.notes["moment"]``. :func:`damage` breaks a
committed checkpoint or its record in place; :func:`fsize_limit` and :func:`tmpfs` make writes fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from preemptible.core.schema import Event
from preemptible.tools.faults.harness import WAIT, Control

FaultScript = Callable[[Control, random.Random], None]


# =====================================================================================================
# Signals and kills against a training attempt
# =====================================================================================================
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


def fault_kill_when(what: str, lead: int = 3, held: bool = False) -> FaultScript:
    """USR1, then SIGKILL as soon as the checkpoint's temp file (``"temp"``) or its commit record (``"record"``) appears.

    ``held``: the attempt runs with ``--hold mid-write`` (``"temp"``) or ``--hold after-commit`` (``"record"``):
    the kill waits for the attempt to be held there, so it lands mid-write, or after the commit while the
    process is still on its way out, whatever the machine's speed (without a hold, a write or an exit that
    completes before the kill is delivered shifts the moment).
    """

    def script(ctl: Control, rng: random.Random) -> None:
        before = _preempt_after_steps(ctl, lead)
        if before is None:
            return
        if held:
            seen = ctl.wait_hold("mid-write" if what == "temp" else "after-commit")
        else:
            seen = ctl.wait_for(ctl.temp_files if what == "temp" else (lambda: ctl.records() - before), interval=0.0005)
        ctl.signal(signal.SIGKILL)
        ctl.proc.wait(timeout=30)
        ctl.notes["moment"] = classify_kill(ctl, before) if seen else f"never saw the {what}"

    return script


def fault_storm(total: int = 100, term_burst: int = 30, held: bool = False, lead: Optional[int] = None) -> FaultScript:
    """USR1 at a random step, a burst of SIGTERM while the checkpoint is written, then mixed signals every
    0-4 ms: at least ``total`` in all, and on until the process is gone (through its exit).

    ``held``: the attempt runs with ``--hold mid-write``: the burst, and mixed signals up to ``total``, are sent
    while the attempt is held in the middle of its checkpoint write (certainly while writing, and ``total``
    signals whatever the machine's speed); then it is released and the storm goes on through its exit.
    ``lead``: the USR1 goes this many steps after the start (default: 2-5 at random).
    """

    mix = [signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2]

    def script(ctl: Control, rng: random.Random) -> None:
        start = ctl.wait_train_start()
        if start is None or not ctl.wait_step(start + (lead if lead is not None else rng.randint(2, 5))):
            return
        ctl.signal(signal.SIGUSR1)
        if held:
            if ctl.wait_hold("mid-write"):
                for _ in range(term_burst):
                    ctl.signal(signal.SIGTERM)
                while sum(ctl.sent.values()) < total and ctl.signal(rng.choice(mix)):
                    time.sleep(rng.uniform(0, 0.002))
                ctl.notes["moment"] = "SIGTERM burst landed while writing" if ctl.temp_files() else "the hold did not hold"
            ctl.release()
        elif ctl.wait_for(ctl.temp_files, interval=0.0005):
            for _ in range(term_burst):
                ctl.signal(signal.SIGTERM)
            ctl.notes["moment"] = "SIGTERM burst landed while writing" if ctl.temp_files() else "burst overlapped the commit"
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
    """Preempt right after the (re)start: ``"first"`` (a plain preemption at step 4, setting the scene),
    ``"before-first-step"`` (at the resume event, before any step) or after the first step."""

    def script(ctl: Control, rng: random.Random) -> None:
        if variant == "first":
            start = ctl.wait_train_start()
            if start is not None and ctl.wait_step(start + 4):
                ctl.signal(signal.SIGUSR1)
            ctl.notes["moment"] = "first preemption"
        elif variant == "before-first-step":
            if ctl.wait_for(lambda: ctl.event(Event.RESUME), interval=0.005):
                ctl.signal(signal.SIGUSR1)
            ctl.notes["moment"] = "signal during set-up of the resumed run"
        else:
            start = ctl.wait_train_start()
            if start is not None and ctl.wait_step(start + 1):
                ctl.signal(signal.SIGUSR1)
            ctl.notes["moment"] = "signal right after the resumed run's first step"

    return script


def fault_plain_preemption(lead: int = 3) -> FaultScript:
    """SIGUSR1 ``lead`` steps after the start, nothing else (sets the scene, or meets a failing save)."""

    def script(ctl: Control, rng: random.Random) -> None:
        start = ctl.wait_train_start()
        if start is not None and ctl.wait_step(start + lead):
            ctl.signal(signal.SIGUSR1)
        ctl.notes["moment"] = "preempted (SIGUSR1), nothing else"

    return script


# =====================================================================================================
# Damaged files
# =====================================================================================================
DATA_DAMAGE = ["truncated at a random offset", "random bit flips", "zero-length", "random bytes, same size",
               "random bytes, other size", "garbage appended", "data file missing"]
RECORD_DAMAGE = ["record truncated", "record random bytes", "record zero-length", "record checksum altered",
                 "record size altered", "record is JSON null", "record missing"]


def damage(path: Path, record: Path, kind: str, rng: random.Random) -> None:
    """Damage a committed checkpoint (``path``) or its commit record (``record``) as ``kind`` says."""
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


# =====================================================================================================
# Write errors and full disks
# =====================================================================================================
def fsize_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: files this child writes may not grow past ``limit`` bytes (write fails with EFBIG)."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited across exec: write() returns EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


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
