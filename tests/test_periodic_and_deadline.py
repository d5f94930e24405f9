"""Periodic safety checkpoints (synchronous and on a background thread) and deadline awareness."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from helpers import assert_same_as_reference, example_command

from preemptible import REQUEUE_EXIT_CODE, latest_checkpoint
from preemptible.core.deadline import JobDeadline, parse_slurm_time
from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import REASON_PERIODIC, Event, read_events
from preemptible.tools.testing import run_preempted

# The configuration of test_preemption.py, so that the session's uninterrupted reference run is shared
# (periodic checkpoints do not enter the reference's configuration: they must not change a number).
STEPS = 24


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_periodic_checkpoints_go_through_the_store_and_a_crash_resumes_from_the_last(tmp_path: Path, mode: str,
                                                                                   reference_run) -> None:
    from preemptible.tools.simulator import Preemption

    record = tmp_path / "record.jsonl"
    options = {"every_n_steps": 4, "sync_periodic": mode == "sync"}
    cmd = example_command(record, max_steps=STEPS, step_sleep=0.05, **options)
    # SIGKILL (no warning, nothing to catch) at step 10: the run must continue from the periodic checkpoint at 8.
    summary = run_preempted(cmd, run_dir=tmp_path / "run", plan=[Preemption(at_step=10, signal="KILL")],
                            max_restarts=0, timeout=120, log=tmp_path / "log.txt")
    assert summary.exit_code == -9
    run_dir = tmp_path / "run"
    saves = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == Event.CHECKPOINT]
    assert [e["step"] for e in saves][:2] == [4, 8] and all(e["reason"] == REASON_PERIODIC for e in saves)
    assert all(e["background"] is (mode == "async") for e in saves)
    # A background save journals how long training waited for the copy of the state to CPU memory.
    assert all(("copy_seconds" in e) is (mode == "async") for e in saves)
    assert all(e["copy_seconds"] >= 0 for e in saves if mode == "async")
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert len(kept) == 2, f"retention keeps the two newest: {kept}"
    # Relaunch: resumes from the newest periodic checkpoint and reaches the end.
    trained_before = [json.loads(line) for line in record.read_text().splitlines()]
    resumed_from = max(e["step"] for e in saves)
    record.write_text("".join(json.dumps(e) + "\n" for e in trained_before if e["step"] <= resumed_from))
    again = run_preempted(cmd, run_dir=run_dir, timeout=120, log=tmp_path / "log2.txt")
    assert again.exit_code == 0 and again.attempts[0].resumed_from_step == resumed_from
    # Periodic saves never touch the training numbers (the copy happens between steps).
    assert_same_as_reference(record, reference_run(max_steps=STEPS, step_sleep=0.05, **options))


def test_deadline_checkpoints_and_requeues_before_the_hard_end(tmp_path: Path, reference_run) -> None:
    record = tmp_path / "record.jsonl"
    # The job "ends" 21 s after training is set up (the imports come before); stopping needs ~15 s of margin.
    cmd = example_command(record, max_steps=200, step_sleep=0.1, deadline_in=21)
    summary = run_preempted(cmd, run_dir=tmp_path / "run", max_restarts=0, timeout=120, log=tmp_path / "log.txt")
    assert summary.exit_code == REQUEUE_EXIT_CODE, (tmp_path / "log.txt").read_text()[-3000:]
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    deadline = [e for e in events if e["event"] == Event.DEADLINE]
    stops = [e for e in events if e["event"] == Event.STOP_AGREED]
    assert deadline and stops and stops[0]["reason"] == "deadline"
    # The point of the deadline: the checkpoint is committed, and every rank has left, before the job's end.
    end = deadline[0]["time"] + deadline[0]["seconds_left"]
    saves = [e for e in events if e["event"] == Event.CHECKPOINT and e["reason"] == "deadline"]
    exits = [e for e in events if e["event"] == Event.EXIT]
    assert len(saves) == 1 and saves[0]["step"] == stops[0]["step"]
    assert saves[0]["time"] < end and exits and all(e["time"] < end for e in exits), (saves, exits, end)
    assert latest_checkpoint(tmp_path / "run").name == f"step-{stops[0]['step']:09d}.ckpt"


def test_parse_slurm_end_time() -> None:
    assert parse_slurm_time("2026-11-30T21:00:00") == datetime(2026, 11, 30, 21, 0).timestamp()  # local time
    assert parse_slurm_time("N/A") is None and parse_slurm_time("Unknown") is None
    fixed = JobDeadline(JobEnvironment.from_env({}), end_time=1e12)
    assert fixed.known and not fixed.too_close(60)
    assert not JobDeadline(JobEnvironment.from_env({})).known, "outside SLURM there is no deadline to read"


def test_background_staging_copies_into_reused_buffers_that_training_cannot_change() -> None:
    """A background save copies the state to CPU memory at the step (training waits only for that) and
    writes the copy on a thread. The copy goes into the buffers of the previous save where shapes match:
    the values must be those of the moment of the copy, never the live tensors."""
    from collections import OrderedDict

    import torch

    from preemptible.core.checkpointing import BackgroundWriter

    weights = OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.zeros(3))
    weights._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    state = {"state_dict": weights, "optimizer_states": [{"state": {0: {"momentum": torch.ones(4)}}}],
             "loops": {"step": 7}, "pair": (torch.tensor([1, 2]), "tag")}
    writer = BackgroundWriter()
    first = writer.stage(state)
    assert first["loops"] == {"step": 7} and first["pair"][1] == "tag"
    assert first["state_dict"]._metadata == {"": {"version": 1}} and list(first["state_dict"]) == ["w", "b"]
    weights["w"].add_(100)  # training goes on
    assert torch.equal(first["state_dict"]["w"], torch.arange(6.0).reshape(2, 3)), "the copy does not follow training"
    buffer = first["state_dict"]["w"]
    second = writer.stage(state)
    assert second["state_dict"]["w"] is buffer, "the second save reuses the first one's buffer"
    assert torch.equal(buffer, torch.arange(6.0).reshape(2, 3) + 100)
    # A tensor whose shape changed gets a new buffer; one that is gone is no longer held.
    state["optimizer_states"][0]["state"][0]["momentum"] = torch.ones(5)
    del state["pair"]
    third = writer.stage(state)
    assert third["optimizer_states"][0]["state"][0]["momentum"].shape == (5,)
    assert ("pair", 0) not in writer._staging and len(writer._staging) == 3


def test_staging_refuses_while_a_write_still_reads_the_buffers() -> None:
    import threading

    import pytest
    import torch

    from preemptible.core.checkpointing import BackgroundWriter

    writer = BackgroundWriter()
    release = threading.Event()
    writer.stage({"w": torch.ones(2)})
    writer.submit(lambda: release.wait(10), step=0)
    try:
        with pytest.raises(RuntimeError, match="still being written"):
            writer.stage({"w": torch.zeros(2)})
    finally:
        release.set()
        writer.wait()
    assert torch.equal(writer.stage({"w": torch.zeros(2)})["w"], torch.zeros(2))
