"""DataLoader workers and the job's signals (preemptible/core/workers.py), with real worker processes and real signals.

SLURM signals every process of a step, DataLoader workers included: a SIGTERM that does not come from a
worker's parent makes torch's own handler kill the worker, and the training then crashes with "DataLoader
worker (pid ...) exited unexpectedly" before its checkpoint. Here: what torch does unshielded, that a shielded
worker lives through SIGTERM/SIGUSR1/SIGUSR2 from elsewhere yet still exits on its parent's ``terminate()``
(at once, code 0) and once orphaned, that a process exits without hanging when multiprocessing terminates a
live worker at exit, and the Trainer with 2 workers preempted by SIGTERM and by SIGUSR1 sent to every process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import assert_same_as_reference, example_command
from torch.utils.data import DataLoader, Dataset

from preemptible.core.schema import Event, read_events
from preemptible.core.workers import ShieldedWorkerInit
from preemptible.tools.simulator import Preemption
from preemptible.tools.testing import assert_resumed_on_same_step, run_preempted

WAIT = 30.0  # seconds any single wait here may take at most (a busy CI machine), never a timed assertion


class Numbers(Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> int:
        return index


def _signal_from_elsewhere(pids: list[int], *signals: signal.Signals) -> None:
    """Send as slurmstepd does: from a process that is not the workers' parent (this test process is)."""
    code = "import os, sys\nfor s in sys.argv[2:]:\n    for p in sys.argv[1].split(','):\n        os.kill(int(p), int(s))"
    subprocess.run([sys.executable, "-I", "-S", "-c", code, ",".join(map(str, pids)), *(str(int(s)) for s in signals)],
                   check=True, timeout=WAIT)


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting {WAIT:.0f} s for {what}"
        time.sleep(0.05)


def test_unshielded_worker_dies_of_a_foreign_sigterm() -> None:
    """The bug, with torch alone: a worker killed by a SIGTERM from elsewhere crashes the loader."""
    iterator = iter(DataLoader(Numbers(), batch_size=2, num_workers=2))
    next(iterator)
    victim = iterator._workers[0]  # type: ignore[attr-defined]
    try:
        with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
            _signal_from_elsewhere([victim.pid], signal.SIGTERM)
            _wait_until(lambda: not victim.is_alive(), "the worker to die")
            for _ in iterator:
                pass
        assert victim.exitcode == -signal.SIGTERM
    finally:
        iterator._shutdown_workers()  # type: ignore[attr-defined]  # and its pids leave torch's SIGCHLD watch


def test_shielded_worker_outlives_the_jobs_signals_and_still_obeys_its_parent() -> None:
    """SIGTERM, SIGUSR1 and SIGUSR2 from elsewhere to both workers: every batch still comes, in order; then the
    parent's terminate() (torch's fallback, multiprocessing's exit) ends a worker at once with code 0."""
    loader = DataLoader(Numbers(), batch_size=2, num_workers=2, worker_init_fn=ShieldedWorkerInit(None))
    iterator = iter(loader)
    got = list(next(iterator).tolist())
    workers = list(iterator._workers)  # type: ignore[attr-defined]
    # Once the first batch came, both workers have run their worker_init_fn (the first batch of each is asked at once).
    _wait_until(lambda: all(_shielded(w.pid) for w in workers), "the workers' shields")
    _signal_from_elsewhere([w.pid for w in workers], signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
    while len(got) < 48:  # each worker loads 10 more batches after the signals
        got += next(iterator).tolist()
    assert all(w.is_alive() for w in workers), [w.exitcode for w in workers]
    for batch in iterator:  # the last batch shuts the workers down, the normal way
        got += batch.tolist()
    assert got == list(range(64)), "every batch, in order, after the signals"
    for w in workers:
        w.join(WAIT)
    assert [w.exitcode for w in workers] == [0, 0], "the workers ended normally at the epoch's end"
    second = iter(loader)  # a new epoch: new workers, shielded as well
    first = second._workers[0]  # type: ignore[attr-defined]
    _wait_until(lambda: _shielded(first.pid), "the new worker's shield")
    started = time.monotonic()
    first.terminate()
    first.join(WAIT)
    assert first.exitcode == 0, f"the parent's SIGTERM must end a worker quietly (exit code {first.exitcode})"
    assert time.monotonic() - started < WAIT
    second._shutdown_workers()  # type: ignore[attr-defined]


def _shielded(pid: int) -> bool:
    """The worker's main thread blocks SIGTERM: its shield is in place (the SIGTERM thread takes the signal)."""
    status = Path(f"/proc/{pid}/status").read_text()
    blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    return bool(blocked & (1 << (signal.SIGTERM - 1)))


# A parent for the two tests below: a shielded loader whose workers sit in a 10-minute __getitem__ (where torch's
# own check for a dead parent, between two batches, never runs); it prints the worker pids, then:
#   "wait": waits to be killed;  "exit": once told, leaves the live iterator in a reference cycle and exits, so that
#   multiprocessing's exit handler terminates the workers and joins them without a timeout.
PARENT = """
import gc, sys, time
from torch.utils.data import DataLoader, Dataset
from preemptible.core.workers import ShieldedWorkerInit

class Slow(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, index):
        time.sleep(600)
        return index

if __name__ == "__main__":
    iterator = iter(DataLoader(Slow(), batch_size=1, num_workers=2, worker_init_fn=ShieldedWorkerInit(None)))
    print(",".join(str(w.pid) for w in iterator._workers), flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
    sys.stdin.readline()  # the test has seen the workers' shields
    gc.disable()
    cycle = [iterator]
    cycle.append(cycle)
    del iterator, cycle
    sys.exit(7)
"""


def _start_parent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip(), f"the parent printed no worker pids (exit code {proc.poll()})"
    workers = [psutil.Process(int(pid)) for pid in line.strip().split(",")]
    _wait_until(lambda: all(_shielded(w.pid) for w in workers), "the workers' shields")
    return proc, workers


def test_orphaned_worker_exits_even_inside_a_long_getitem(tmp_path: Path) -> None:
    proc, workers = _start_parent(tmp_path, "wait")
    proc.kill()
    proc.wait(WAIT)
    try:
        _wait_until(lambda: not any(_running(w) for w in workers), "the orphaned workers to exit")
    finally:
        for w in workers:
            if _running(w):
                w.kill()


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan that exited waits for whichever process adopted it to reap it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_exit_with_live_workers_does_not_hang(tmp_path: Path) -> None:
    """multiprocessing's exit handler sends the live workers SIGTERM and joins them with no timeout: a worker
    that ignored its parent's SIGTERM would hang the process here forever."""
    proc, workers = _start_parent(tmp_path, "exit")
    try:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
        code = proc.wait(WAIT)
    finally:
        proc.kill()
        for w in workers:
            if _running(w):
                w.kill()
    assert code == 7


def test_trainer_with_workers_sigterm_then_sigusr1_to_every_process(tmp_path: Path, reference_run) -> None:
    """The Trainer, 2 DataLoader workers: SIGTERM to the main process and its workers (sent from outside them,
    as slurmstepd sends it to every pid of the step), then SIGUSR1 to every process (``--signal=USR1``). Each
    attempt checkpoints at its agreed step, resumes there, and the run is bitwise the uninterrupted one."""
    steps, options = 24, {"num_workers": 2, "step_sleep": 0.05}
    record, log = tmp_path / "record.jsonl", tmp_path / "log.txt"
    # The first: the supervisor sends it to every process of the run's session (psutil), from outside. The second:
    # rank 0 has it sent to its process group at step 12 exactly, by a helper process (core/inject.py).
    plan = [Preemption(at_step=5, signal="TERM", repeat=2), Preemption(at_step=12, signal="USR1")]
    summary = run_preempted(example_command(record, max_steps=steps, **options), run_dir=tmp_path / "run", plan=plan,
                            timeout=180, log=log)
    text = log.read_text()
    assert "exited unexpectedly" not in text and "killed by signal" not in text, text[-4000:]
    assert summary.exit_code == 0 and summary.preemptions == 2, text[-4000:]
    assert_resumed_on_same_step(summary)
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    assert [e["reason"] for e in events if e["event"] == Event.CHECKPOINT][:2] == ["SIGTERM", "SIGUSR1"]
    assert_same_as_reference(record, reference_run(max_steps=steps, **options))
