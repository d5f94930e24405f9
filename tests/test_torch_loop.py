"""``preemptible.loop.PreemptibleLoop``: a plain PyTorch loop, 1 rank and 2-rank DDP (gloo), preempted by real signals.

Every run is the README's example loop (``preemptible/examples/torch_loop.py``): a shuffled map-style
DataLoader (a ``DistributedSampler`` under DDP), augmentation noise drawn in ``__getitem__``, dropout,
AdamW and a StepLR schedule, so the data position, every rank's RNG and every registered object must
come back exactly. Each preempted run is compared with the uninterrupted one: every rank's loss at
every (epoch, batch, step) and the final weights, bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loop_helpers import assert_bitwise_resumed, run_loop

from preemptible.core.schema import Event
from preemptible.tools.simulator import Preemption

FORGETFUL = Path(__file__).parent / "scripts" / "forgetful_loop.py"
STEPS = 40  # 16 batches per epoch on one rank, 8 per rank under DDP: a resume crosses epoch ends


def test_one_rank_with_workers_and_background_checkpoints(tmp_path: Path) -> None:
    """USR1 to the process tree (workers included) mid-epoch; batches loaded by 2 worker processes; periodic
    background saves. (Not SIGTERM: torch's DataLoader workers exit on a SIGTERM that is not from their parent.)"""
    options = ["--num-workers", "2"]
    _, reference, _ = run_loop(tmp_path, "reference", "torch", steps=STEPS, options=options)
    summary, trace, run_dir = run_loop(tmp_path, "preempted", "torch", steps=STEPS,
                                       options=[*options, "--every-n-steps", "6", "--step-sleep", "0.05"],
                                       plan=[Preemption(at_step=9, signal="USR1")])
    events = assert_bitwise_resumed(summary, trace, reference, run_dir, ranks=1, steps=STEPS, preemptions=1)
    periodic = [e for e in events if e["event"] == Event.CHECKPOINT and e["reason"] == "periodic"]
    assert periodic and all(e["background"] for e in periodic), periodic
    assert summary.attempts[0].stop_step not in (None, 16), "a stop on an epoch's last batch waits one step"


def test_two_ranks_signal_to_one_rank_then_to_all(tmp_path: Path) -> None:
    """DDP over gloo, ranks started as srun does; USR1 to rank 1 only stops both, then SIGTERM to every process."""
    _, reference, _ = run_loop(tmp_path, "reference", "torch", ranks=2, steps=STEPS)
    plan = [Preemption(at_step=6, signal="USR1", target="rank:1"), Preemption(at_step=21, signal="TERM")]
    summary, trace, run_dir = run_loop(tmp_path, "preempted", "torch", ranks=2, steps=STEPS,
                                       options=["--step-sleep", "0.05"], plan=plan)
    events = assert_bitwise_resumed(summary, trace, reference, run_dir, ranks=2, steps=STEPS, preemptions=2)
    first = [e for e in events if e["event"] == Event.SIGNAL and e["restart_count"] == 0]
    assert {e["rank"] for e in first} == {1}, "only rank 1 got the first signal"
    stops = [e for e in events if e["event"] == Event.STOP_AGREED]
    assert [e["step"] for e in stops] == [a.stop_step for a in summary.attempts[:2]]
    exits = [e for e in events if e["event"] == Event.EXIT]
    assert sorted((e["restart_count"], e["rank"]) for e in exits) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_check_accepts_a_loop_and_tells_exact_from_inexact(tmp_path: Path) -> None:
    """``preemptible check --loop COMMAND``: the example loop is identical; a loop that forgot its optimizer is not."""
    exact = subprocess.run([sys.executable, "-m", "preemptible.cli", "check", "--workdir", str(tmp_path / "exact"),
                            "--preempt-at", "5", "--loop", sys.executable, "-m", "preemptible.examples.torch_loop",
                            "--max-steps", "20", "--step-sleep", "0.05"], capture_output=True, text=True, timeout=300)
    assert exact.returncode == 0, exact.stdout + exact.stderr
    assert "identical: all" in exact.stdout and "resumed at step" in exact.stdout, exact.stdout
    forgetful = subprocess.run([sys.executable, "-m", "preemptible.cli", "check", "--workdir", str(tmp_path / "forgetful"),
                                "--preempt-at", "5", "--loop", sys.executable, str(FORGETFUL), "20"],
                               capture_output=True, text=True, timeout=300)
    assert forgetful.returncode == 1, forgetful.stdout + forgetful.stderr
    assert "final state: model.weight: differs" in forgetful.stdout and "not identical" in forgetful.stdout, forgetful.stdout
