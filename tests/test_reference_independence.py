"""The uninterrupted reference, checked against a run without preemptible at all.

Every other "bitwise identical" test compares a preempted run with an uninterrupted run that also has
``PreemptionCallback`` installed: a callback that changed every run's numbers the same way would pass
them all. Here the same configuration (``tests/scripts/plain_vs_callback.py``: the example's TinyModel
with dropout and BatchNorm, a shuffled loader with random augmentation, ``num_workers=0``, the sanity
check and mid-epoch validation, one epoch boundary or more) is trained

* as a plain Lightning run (the script checks that no preemptible training code was even imported),
* with ``PreemptionCallback(requeue="none")``,
* with the callback and background periodic checkpoints every 3 steps,

each arm in its own fresh process (nothing the callback leaves in a process can reach the plain run),
and every training loss, every validation loss, the weights after every optimizer step and the final
weights of every rank must be bitwise equal: README's "with ``num_workers=0`` a preemptible run is
identical to a plain Lightning run", for one process and for 2-rank DDP over gloo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from preemptible.core.schema import REASON_FINISHED, REASON_PERIODIC, Event, TraceKind, read_events, read_trace

SCRIPT = Path(__file__).parent / "scripts" / "plain_vs_callback.py"
ARMS = ("plain", "callback", "periodic")
EVERY = 3  # the periodic arm's checkpoint interval
TIMEOUT = 420.0  # seconds for all arms together (they run at once; each pays ~5 s of imports, twice under DDP)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open while they are chosen, so they differ from one another)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _run_arms(tmp_path: Path, devices: int, **options: Any) -> dict[str, Path]:
    """Run every arm at once (separate processes, own sessions); return each arm's trace. Bounded by
    :data:`TIMEOUT`; on a timeout or a failure every arm's process group is killed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PREEMPTIBLE_", "WANDB_"))}
    env["PYTHONUNBUFFERED"] = "1"
    ports = _free_ports(len(ARMS))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    traces = {arm: tmp_path / f"{arm}.jsonl" for arm in ARMS}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    try:
        for arm, port in zip(ARMS, ports):
            logs[arm] = tmp_path / f"{arm}.log"
            with open(logs[arm], "wb") as out:
                procs[arm] = subprocess.Popen(
                    [sys.executable, str(SCRIPT), "--arm", arm, "--trace", str(traces[arm]),
                     "--run-dir", str(tmp_path / f"run-{arm}"), "--devices", str(devices),
                     f"--every-n-steps={EVERY}", *argv],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(tmp_path),
                    env=dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        deadline = time.monotonic() + TIMEOUT
        for arm, proc in procs.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"arm {arm!r} did not finish within {TIMEOUT:.0f} s:\n{logs[arm].read_text()[-3000:]}")
            assert code == 0, f"arm {arm!r} exited {code}:\n{logs[arm].read_text()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            # a DDP rank started by Lightning shares the launcher's session: kill whatever is left of it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    return traces


def _assert_identical(traces: dict[str, Path], tmp_path: Path, devices: int, max_steps: int) -> int:
    """Every arm's trace equals the plain run's, entry by entry; returns the number of compared entries."""
    plain = read_trace(traces["plain"])
    assert not plain.duplicates, plain.duplicates[:5]
    train = [k for k in plain.entries if k[0] == TraceKind.TRAIN]
    val = [k for k in plain.entries if k[0] == TraceKind.VAL]
    # Not vacuous: every rank trained every step, validation ran mid-epoch, every step changed the weights.
    assert len(train) == max_steps * devices and {k[1] for k in train} == set(range(devices))
    assert val and {k[1] for k in val} == set(range(devices))
    assert all(plain.entries[k]["loss"] and plain.entries[k]["weights"] for k in train)
    assert len({plain.entries[k]["weights"] for k in train if k[1] == 0}) == max_steps
    assert sorted(plain.final) == list(range(devices))
    for arm in ARMS[1:]:
        got = read_trace(traces[arm])
        assert not got.duplicates, f"{arm}: batches recorded twice: {got.duplicates[:5]}"
        assert sorted(got.entries) == sorted(plain.entries), (
            f"{arm}: other batches than the plain run: missing {sorted(set(plain.entries) - set(got.entries))[:5]}, "
            f"extra {sorted(set(got.entries) - set(plain.entries))[:5]}")
        for field in ("loss", "weights", "metrics"):
            differ = [k for k in sorted(plain.entries) if got.entries[k].get(field) != plain.entries[k].get(field)]
            assert not differ, (f"{arm}: {len(differ)} {field} entries differ from the plain Lightning run, first at "
                                f"{differ[0]}: {got.entries[differ[0]].get(field)} vs {plain.entries[differ[0]].get(field)}")
        assert got.final == plain.final, f"{arm}: final weights differ from the plain run: {got.final} vs {plain.final}"
    # The callback arms really ran the callback: a finished run with its final checkpoint; the periodic arm
    # committed background checkpoints while training. (Where exactly: in one process at every EVERY-th step;
    # under DDP the ranks agree on a save a step or two after it is due, and skip one together while the
    # previous write is in flight, so only their number is bounded here.)
    for arm in ARMS[1:]:
        events = list(read_events(tmp_path / f"run-{arm}"))
        saves = [(e["step"], e["reason"]) for e in events if e["event"] == Event.CHECKPOINT]
        assert events and events[-1]["event"] == Event.FINISH and events[-1]["step"] == max_steps, events[-3:]
        assert saves[-1] == (max_steps, REASON_FINISHED), saves
        periodic = [e for e in events if e["event"] == Event.CHECKPOINT and e["reason"] == REASON_PERIODIC]
        if arm == "callback":
            assert periodic == [], saves
        else:
            assert len(periodic) >= max_steps // EVERY // 2 and all(e["background"] for e in periodic), saves
            if devices == 1:
                skipped = {e["step"] for e in events if e["event"] == Event.CHECKPOINT_SKIPPED}
                assert sorted({e["step"] for e in periodic} | skipped) == list(range(EVERY, max_steps + 1, EVERY)), saves
    return len(plain.entries) + len(plain.final)


def test_one_process_callback_and_periodic_saves_are_bitwise_a_plain_lightning_run(tmp_path: Path) -> None:
    # 16 batches per epoch: validation at batches 5, 10, 15 and after the epoch boundary at 21; 24 steps.
    steps = 24
    traces = _run_arms(tmp_path, devices=1, max_steps=steps, val_every=5)
    # Entries: every step, 2 batches and the logged metrics of each of the 4 validations, the final weights.
    assert _assert_identical(traces, tmp_path, devices=1, max_steps=steps) == steps + 4 * (2 + 1) + 1


@pytest.mark.ddp
def test_ddp_callback_and_periodic_saves_are_bitwise_a_plain_lightning_run(tmp_path: Path) -> None:
    # 2 ranks, DistributedSampler injected by Lightning: 8 batches per rank and epoch, validation at batch 5 of
    # every epoch (steps 5, 13 and 21 of 22, across two epoch boundaries).
    steps = 22
    traces = _run_arms(tmp_path, devices=2, max_steps=steps, val_every=5)
    assert _assert_identical(traces, tmp_path, devices=2, max_steps=steps) == 2 * (steps + 3 * (2 + 1) + 1)
