"""Trial runners: inject a fault many times, play "the next start" after each, count the outcomes in a Tally.

* :func:`store_kill_trials`: a looping writer (child process) SIGKILLed at random moments;
* :func:`damage_trials`: committed checkpoints and records damaged in place;
* :func:`rlimit_store_trials`, :func:`tmpfs_store_trials`: writes failing with EFBIG / ENOSPC at the store;
* :func:`lightning_chain`: one run directory, one fault per training attempt, each next attempt must
  resume from the newest intact checkpoint, and the whole run must equal an uninterrupted one bitwise.

``benchmarks/faults.py`` runs them by the hundred (``make faults``); ``tests/test_faults.py`` by the few.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from preemptible.core.schema import CHECKPOINT_DIR, COMMIT_SUFFIX
from preemptible.core.store import CheckpointError, CheckpointStore, StoredCheckpoint
from preemptible.tools.faults.harness import (
    WAIT,
    AttemptResult,
    MiB,
    Tally,
    child_command,
    describe_exit,
    final_error,
    last_line,
    run_attempt,
    train_command,
)
from preemptible.tools.faults.oracle import commit_payload, compare_to_reference, expected_sha, inventory, sha256_of
from preemptible.tools.faults.scripts import DATA_DAMAGE, RECORD_DAMAGE, FaultScript, damage, fill_until_free, fsize_limit, tmpfs


# =====================================================================================================
# SIGKILL at random moments during checkpoint writes: the store under a looping writer
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
        proc = subprocess.Popen(child_command("writer", str(directory), "--size", str(size), "--log", str(log),
                                              "--pause", str(pause), "--seed", str(seed * 100003 + t)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], WAIT)
            if not ready or proc.stdout.readline().strip() != b"ready":
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
            proc.stdout.close()
            proc.stderr.close()
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


def _kill_when_temp_reaches(directory: Path, target: int, proc: subprocess.Popen[bytes]) -> bool:
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
# Damaged files: every one detected, reported by name, quarantined, the previous one used
# =====================================================================================================
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
# Disk full and write errors at the store
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
        proc = subprocess.run(child_command("limited-writer", str(directory), "--size", str(size), "--step", "2"),
                              capture_output=True, text=True, timeout=WAIT, preexec_fn=fsize_limit(limit))
        tally.trials += 1
        tally.injected += 1
        tally.moments["EFBIG at a random offset of the data"] += 1
        _judge_disk_full(tally, t, proc.returncode, proc.stdout + proc.stderr, directory, prev, "File too large")
    tally.seconds = time.monotonic() - started
    shutil.rmtree(directory, ignore_errors=True)
    return tally


def _judge_disk_full(tally: Tally, t: int, code: Optional[int], output: str, directory: Path, prev: StoredCheckpoint,
                     errno_text: str) -> None:
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
    ckpt_dir = run_dir / CHECKPOINT_DIR
    records: list[Path] = []
    results: list[AttemptResult] = []
    starts: list[int] = []
    started = time.monotonic()
    for k, fault in enumerate([*faults, None]):
        counted = fault is not None and k >= scene
        if between is not None:
            between(k)
        before = inventory(ckpt_dir, loadable=True)
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
        after = inventory(ckpt_dir, loadable=True)
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
