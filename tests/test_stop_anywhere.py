"""A stop wherever the signal lands (issue 14): the sanity check, checkpoint loading, validation mid-epoch and at an
epoch's end (interrupted, then redone exactly), a validation's end-of-epoch work, an epoch's start while its
DataLoader workers start, and an epoch's end work.

One run per configuration, one place per attempt (each launch pays seconds of imports): the example job
signals itself (a real SIGUSR1 to its own process, on every rank or on rank 1 only) at the exact place
(``--signal-at``, see ``preemptible.tools.tracing.SignalAtStep``). For every attempt the journal says where the
stop was taken (``stop_agreed``: place, step, batch), counted from the batch the signal landed in; the whole
run's training losses, validation losses, logged validation metrics and final weights are bitwise those of an
uninterrupted run, and the validations that were interrupted and redone gave bitwise the same losses both times.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_redone_validations_agree, assert_same_as_reference, example_command, stops

from preemptible.core.schema import Event, Place, read_events
from preemptible.tools.testing import assert_resumed_on_same_step, run_preempted

#: 16 training batches per epoch and rank, validation every 8 (mid-epoch, then at the epoch's end), 4 batches each.
CONFIG = {"max_steps": 40, "val_every": 8, "val_batches": 4, "sanity_steps": 2, "num_workers": 2}
#: Attempt by attempt: where the signal lands.
POINTS = ["sanity",   # 0: the sanity check of a fresh run: nothing trained, nothing saved
          "v8:1",     # 1: validation batch 1 of the mid-epoch validation at step 8: saved owing that validation
          "load",     # 2: while the resumed trainer restores that checkpoint: nothing new to save, nothing lost
          "v8:0",     # 3: the first batch of the redone validation: still nothing new
          "v16:2",    # 4: the end-of-epoch validation at step 16, batch 2: saved owing it
          "v16:end",  # 5: on_validation_epoch_end of that redone validation
          "e1",       # 6: epoch 1 starts, its two DataLoader workers start
          "e1:end"]   # 7: on_train_epoch_end of epoch 1
SCENARIOS = [pytest.param(1, None, id="1proc"),
             pytest.param(2, None, id="ddp2-all-ranks", marks=pytest.mark.ddp),
             pytest.param(2, 1, id="ddp2-rank1-only", marks=pytest.mark.ddp)]


@pytest.mark.parametrize("devices,signal_rank", SCENARIOS)
def test_stop_wherever_the_signal_lands(tmp_path: Path, devices: int, signal_rank: int | None, reference_run) -> None:
    config = {**CONFIG, "samples": 256 * devices}  # the same 16 batches per epoch on every rank
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, devices=devices, signal_at=POINTS, signal_rank=signal_rank, **config)
    summary = run_preempted(cmd, run_dir=tmp_path / "run", timeout=240, log=tmp_path / "log.txt", max_restarts=len(POINTS) + 1)
    log = (tmp_path / "log.txt").read_text()[-4000:]
    assert [a.exit_code for a in summary.attempts][-1] == 0 and len(summary.attempts) == len(POINTS) + 1, log
    assert_resumed_on_same_step(summary, min_preemptions=len(POINTS))
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    places = [stops(events, attempt) for attempt in range(len(POINTS))]
    saved = [bool(a.checkpoint) and any(e["event"] == Event.CHECKPOINT and e["restart_count"] == a.index for e in events)
             for a in summary.attempts[:-1]]
    owed = {e["restart_count"]: (e["step"], e["batch"]) for e in events if e["event"] == Event.VALIDATION_OWED}
    redone = [e["restart_count"] for e in events if e["event"] == Event.VALIDATION_REDONE]
    # 0: in the sanity check, at the batch the signal landed in; nothing to save.
    assert places[0] == [(Place.SANITY_CHECK, 0, 0)] and not saved[0]
    # 1: inside the mid-epoch validation, at the end of the batch the signal landed in (all ranks agree there).
    assert places[1] == [(Place.VALIDATION, 8, 1)] and saved[1] and owed[1] == (8, 1)
    # 2: during checkpoint loading: stopped before the first step, the checkpoint neither rewritten nor quarantined.
    assert places[2] == [(Place.BEFORE_TRAINING, 8, None)] and not saved[2]
    assert not list((tmp_path / "run" / "checkpoints").glob("quarantine/*"))
    # 3: the redone validation ran (it was owed) and stopped at its first batch; nothing new to save.
    assert places[3] == [(Place.VALIDATION, 8, 0)] and not saved[3] and 3 in redone
    # 4: the end-of-epoch validation, at the batch the signal landed in.
    assert places[4] == [(Place.VALIDATION, 16, 2)] and saved[4] and owed[4] == (16, 2)
    # 5: after the last validation batch (on_validation_epoch_end work): right there.
    assert places[5] == [(Place.VALIDATION_END, 16, None)] and 5 in redone and not saved[5]
    # 6: at an epoch's start while its workers start: the epoch's first step (a second one under DDP, whose stop
    # vote of a boundary is reduced during the next batch).
    assert places[6][0][0] == Place.TRAINING and 17 <= places[6][0][1] <= 17 + (devices > 1) and saved[6]
    # 7: during on_train_epoch_end work: voted on when the next epoch starts, taken at its first step.
    assert places[7] == [(Place.TRAINING, 33, 33)] and saved[7]
    signalled = {e["rank"] for e in events if e["event"] == Event.SIGNAL}
    assert signalled == ({signal_rank} if signal_rank is not None else set(range(devices)))
    assert assert_redone_validations_agree(record), "no validation was recorded twice: none was redone"
    assert_same_as_reference(record, reference_run(devices=devices, **config))
