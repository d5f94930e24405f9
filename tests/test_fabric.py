"""``preemptible.fabric.FabricLoop``: Lightning Fabric loops, 1 rank and 2-rank DDP (gloo), preempted by real signals.

Every run is the README's Fabric example (``preemptible/examples/fabric_loop.py``); the 2-rank runs
let ``Fabric(strategy="ddp", devices=2)`` start the second rank itself, as users run it. Both package
names are covered: ``lightning.fabric`` and the standalone ``lightning_fabric``. Each preempted run is
compared with the uninterrupted one: every rank's loss at every (epoch, batch, step) and the final
weights, bit for bit; the checkpoint is a Fabric checkpoint (``fabric.load`` reads it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loop_helpers import assert_bitwise_resumed, run_loop

from preemptible import latest_checkpoint
from preemptible.core.schema import STATE_KEY, Event
from preemptible.tools.runinfo import summarize
from preemptible.tools.simulator import Preemption

STEPS = 40
README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = Path(__file__).resolve().parents[1] / "preemptible" / "examples" / "fabric_loop.py"


@pytest.mark.ddp
def test_two_ranks_fabric_launched_signal_to_one_rank_then_to_all(tmp_path: Path) -> None:
    """USR1 to rank 1 only stops both ranks on one step; then SIGTERM to every process; lightning.fabric."""
    _, reference, _ = run_loop(tmp_path, "reference", "fabric", ranks=2, steps=STEPS)
    plan = [Preemption(at_step=6, signal="USR1", target="rank:1"), Preemption(at_step=23, signal="TERM")]
    summary, trace, run_dir = run_loop(tmp_path, "preempted", "fabric", ranks=2, steps=STEPS,
                                       options=["--step-sleep", "0.05"], plan=plan)
    events = assert_bitwise_resumed(summary, trace, reference, run_dir, ranks=2, steps=STEPS, preemptions=2)
    first = [e for e in events if e["event"] == Event.SIGNAL and e["restart_count"] == 0]
    assert {e["rank"] for e in first} == {1}, "only rank 1 got the first signal"
    exits = [e for e in events if e["event"] == Event.EXIT]
    assert sorted((e["restart_count"], e["rank"]) for e in exits) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # The final checkpoint is what fabric.save writes: the registered names plus preemptible's entry.
    final = latest_checkpoint(run_dir)
    assert final is not None
    checkpoint = torch.load(final, weights_only=True)
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "samples_seen", STATE_KEY}
    assert checkpoint["samples_seen"] == STEPS * 16 and len(checkpoint[STATE_KEY]["ranks"]) == 2
    # `preemptible status` / `report` read a Fabric run as they read a Trainer's.
    info = summarize(run_dir)
    assert info.state == "finished" and len(info.attempts) == 3 and info.preemptions == 2, info.to_json()
    assert info.last_committed_step == STEPS and info.steps_lost == 0, info.to_json()
    for command, needle in (("status", str(STEPS)), ("report", "goodput")):
        done = subprocess.run([sys.executable, "-m", "preemptible.cli", command, str(run_dir)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and needle in done.stdout, done.stdout + done.stderr


def test_one_rank_standalone_package_with_workers_and_background_checkpoints(tmp_path: Path) -> None:
    """lightning_fabric (the standalone package), 2 DataLoader workers, periodic background saves; SIGTERM, then
    USR1, to every process of the run (the workers too, from outside, as SLURM sends them): the workers outlive
    both (preemptible/core/workers.py) and each attempt checkpoints at its agreed step."""
    options = ["--package", "lightning_fabric", "--num-workers", "2"]
    _, reference, _ = run_loop(tmp_path, "reference", "fabric", steps=STEPS, options=options)
    summary, trace, run_dir = run_loop(tmp_path, "preempted", "fabric", steps=STEPS,
                                       options=[*options, "--every-n-steps", "7", "--step-sleep", "0.05"],
                                       plan=[Preemption(at_step=12, signal="TERM"),
                                             Preemption(at_step=26, signal="USR1", repeat=2)])
    events = assert_bitwise_resumed(summary, trace, reference, run_dir, ranks=1, steps=STEPS, preemptions=2)
    assert [e["reason"] for e in events if e["event"] == Event.STOP_AGREED] == ["SIGTERM", "SIGUSR1"]
    periodic = [e for e in events if e["event"] == Event.CHECKPOINT and e["reason"] == "periodic"]
    assert periodic and all(e["background"] for e in periodic), periodic


def test_readme_shows_the_example_that_the_tests_run() -> None:
    """The README's Fabric and plain PyTorch loops are the example files' loops, line for line."""
    readme = README.read_text()
    for name in ("fabric", "torch"):
        source = (EXAMPLE.parent / f"{name}_loop.py").read_text()
        body = re.search(rf"# --- README: {name} example ---\n(.*?)    # --- README: end ---", source, re.S)
        assert body, f"markers missing in {name}_loop.py"
        block = "\n".join(line[4:] for line in body.group(1).strip("\n").splitlines())
        assert block in readme, f"the README's {name} loop differs from preemptible/examples/{name}_loop.py"
