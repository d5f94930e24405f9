"""``preemptible status`` and ``preemptible report`` (issue 8, items 2 and 3).

One real preempted-and-resumed run directory is produced per session and shared; the definitions of
steps lost, time lost and goodput are checked exactly on hand-written journals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from preemptible.cli import main
from preemptible.core.schema import (
    CHECKPOINT_DIR,
    JOURNAL_FILE,
    PROGRESS_FILE,
    REASON_FINISHED,
    Event,
    RequeueOutcomeName,
    read_events,
)
from preemptible.core.store import CheckpointStore, CommitRecord
from preemptible.tools.runinfo import RunInfoError, summarize
from preemptible.tools.testing import run_preempted

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 20


@pytest.fixture(scope="session")
def preempted_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real run: preempted with SIGUSR1 around step 8, relaunched, finished at step 20."""
    base = tmp_path_factory.mktemp("status_report")
    cmd = [sys.executable, "-m", "preemptible.examples.train", "--max-steps", str(STEPS), "--step-sleep", "0.05"]
    summary = run_preempted(cmd, run_dir=base / "run", at_step=8, timeout=180, log=base / "log.txt",
                            env={"PREEMPTIBLE_PROGRESS_EVENT_SECONDS": "0"})
    log = (base / "log.txt").read_text()
    assert summary.exit_code == 0 and len(summary.attempts) == 2, log[-3000:]
    assert summary.attempts[0].stop_step is not None, log[-3000:]
    return {"run_dir": base / "run", "stop_step": summary.attempts[0].stop_step}


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "220")  # rich would wrap cells at 80 columns under capture


def _status_json(run_dir: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


# -- on a real preempted run ------------------------------------------------------------------------
def test_status_table_shows_state_checkpoints_and_attempts(preempted_run: dict[str, Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(preempted_run["run_dir"])]) == 0
    out = capsys.readouterr().out
    stop = preempted_run["stop_step"]
    assert "finished — finished at step 20" in out
    assert re.search(rf"last committed step\s*│\s*({stop}|{STEPS})\s", out), out
    assert f"step-{stop:09d}.ckpt" in out and "yes" in out
    assert "preempted (requested, SIGUSR1)" in out and "finished" in out
    assert "goodput" in out


def test_status_json_of_a_preempted_run(preempted_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    stop = preempted_run["stop_step"]
    doc = _status_json(preempted_run["run_dir"], "--verify", capsys=capsys)
    assert doc["state"] == "finished" and doc["current_step"] == STEPS
    assert len(doc["attempts"]) == 2 and doc["preemptions"] == 1
    assert [a["outcome"] for a in doc["attempts"]] == ["preempted", "finished"]
    assert doc["checkpoints"] and all(c["valid"] and c["checksum"] and c["bytes"] > 0 for c in doc["checkpoints"])
    by_step = {c["step"]: c for c in doc["checkpoints"]}
    assert by_step[stop]["reason"] == "SIGUSR1", "the emergency checkpoint at the stop step is kept"
    # the newest valid one: the stop step, or the end of training when a last checkpoint is saved on finish
    assert doc["last_committed_step"] == max(by_step) and doc["last_committed_step"] in (stop, STEPS)
    (cut,) = doc["interruptions"]
    assert cut["signal"] == cut["reason"] == "SIGUSR1"
    assert cut["stop_step"] == cut["checkpoint_step"] == cut["resumed_from_step"] == stop
    assert cut["steps_lost"] == 0 and doc["steps_lost"] == 0, "the stop step was checkpointed: nothing is redone"
    assert cut["queue_seconds"] > 0 and doc["time_lost_seconds"] == pytest.approx(cut["time_lost_seconds"], abs=1e-3)
    assert doc["attempts"][1]["resumed_from_step"] == stop
    assert len(doc["attempts"][0]["points"]) > 5, "dense progress events give a step series"


def test_goodput_is_a_fraction_and_its_parts_add_up(preempted_run: dict[str, Any]) -> None:
    info = summarize(preempted_run["run_dir"])
    g = info.goodput
    assert g.goodput is not None and 0 < g.goodput < 1
    parts = g.components()
    assert all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(g.wall_seconds, abs=1e-6)
    assert g.useful_seconds == pytest.approx(sum(a.training_seconds for a in info.attempts))
    openers = [e for e in read_events(preempted_run["run_dir"]) if e["event"] in (Event.START, Event.RESUME)]
    assert len(openers) == len(info.attempts) == 2
    for a, opener in zip(info.attempts, openers):
        # Start-up counts from the process's own start (interpreter, imports), not from the trainer's set-up.
        assert a.started_at == opener["process_started"] < opener["time"] < a.train_started_at
        assert a.startup_seconds == pytest.approx(a.train_started_at - opener["process_started"])
    assert g.queue_seconds == pytest.approx(info.attempts[1].started_at - info.attempts[0].ended_at)
    assert g.save_seconds > 0 and g.redone_seconds == 0
    cut = info.interruptions[0]
    assert cut.time_lost_seconds == pytest.approx(cut.redone_seconds + cut.stopping_seconds + cut.queue_seconds
                                                  + cut.restart_seconds)


def test_report_prints_goodput_and_writes_a_png(preempted_run: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "out" / "timeline.png"
    assert main(["report", str(preempted_run["run_dir"]), "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert "goodput" in out and "waiting in the queue" in out and "preempted (requested, SIGUSR1)" in out
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 500 and height > 300


def test_report_without_matplotlib_says_how_to_install_it(preempted_run: dict[str, Any], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes 'import matplotlib' raise ImportError
    png = tmp_path / "timeline.png"
    assert main(["report", str(preempted_run["run_dir"]), "-o", str(png)]) == 2
    assert "pip install 'preemptible[report]'" in capsys.readouterr().err
    assert not png.exists()
    assert main(["report", str(preempted_run["run_dir"])]) == 0, "the printed report needs no matplotlib"


def test_a_torn_last_line_and_a_garbled_line_are_tolerated(preempted_run: dict[str, Any], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(preempted_run["run_dir"], run_dir)
    journal = run_dir / JOURNAL_FILE
    lines = journal.read_bytes().splitlines(keepends=True)
    lines.insert(3, b'{"event": "progress", "time": "not a number"}\n')
    lines.insert(5, b"\x00\x00garbage\n")
    journal.write_bytes(b"".join(lines) + b'{"event": "progress", "time": 17960701')  # killed mid-write
    before = summarize(preempted_run["run_dir"])
    doc = _status_json(run_dir, capsys=capsys)
    assert doc["state"] == before.state == "finished"
    assert len(doc["attempts"]) == 2 and doc["preemptions"] == 1
    assert doc["last_committed_step"] == before.last_committed_step
    assert doc["goodput"]["goodput"] == pytest.approx(before.goodput.goodput, abs=1e-3)


def test_missing_or_empty_run_dir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    for command in ("status", "report"):
        assert main([command, str(missing)]) == 2
        err = capsys.readouterr().err
        assert f"preemptible {command}: error: run directory {missing} does not exist" in err
        assert "PREEMPTIBLE_RUN_DIR" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["status", str(empty), "--json"]) == 2
    assert "not a preemptible run directory" in capsys.readouterr().err
    with pytest.raises(RunInfoError, match="not a preemptible run directory"):
        summarize(empty)


def test_status_while_the_job_runs_then_after_it_is_killed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, PREEMPTIBLE_RUN_DIR=str(run_dir), PREEMPTIBLE_PROGRESS_INTERVAL="0")
    cmd = [sys.executable, "-m", "preemptible.examples.train", "--max-steps", "400", "--step-sleep", "0.3"]
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not _progress_step(run_dir) >= 2:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job never reported progress"
            time.sleep(0.2)
        doc = _status_json(run_dir, capsys=capsys)
        assert doc["state"] == "running", doc["state_detail"]
        assert len(doc["attempts"]) == 1 and doc["attempts"][0]["pid"] == proc.pid
        assert doc["current_step"] >= 2 and doc["preemptions"] == 0 and doc["steps_lost"] == 0
        assert doc["goodput"]["goodput"] is not None and 0 < doc["goodput"]["goodput"] <= 1
        assert f"pid {proc.pid}" in doc["state_detail"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard kill: no journal record of the end
        proc.wait(timeout=60)
    info = summarize(run_dir)
    assert info.state == "failed" and info.attempts[-1].outcome == "crashed"
    assert "without an exit record" in info.state_detail
    assert info.steps_lost == info.current_step, "no checkpoint: a restart retrains every step"


# -- exact definitions on hand-written journals -----------------------------------------------------------
def _journal(run_dir: Path, events: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / JOURNAL_FILE, "w") as f:
        for e in events:
            full = {"job_id": "77", "restart_count": 0, "host": "node-elsewhere", "rank": 0, "pid": 4242}
            full.update(e)
            f.write(json.dumps(full) + "\n")


def _ev(event: str, t: float, restart: int = 0, **fields: Any) -> dict[str, Any]:
    return {"event": event, "time": t, "restart_count": restart, **fields}


def test_steps_lost_time_lost_and_goodput_follow_their_definitions(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _journal(run_dir, [
        # attempt 0: a safety checkpoint at step 5, then killed at step 10 without a record
        _ev(Event.START, 1000), _ev(Event.TRAIN_START, 1001, step=0),
        _ev(Event.CHECKPOINT, 1006.5, step=5, seconds=0.5), _ev(Event.PROGRESS, 1011, step=10),
        # attempt 1: resumed at 5, signalled, stopped and checkpointed at 15, requeued
        _ev(Event.START, 1020, 1), _ev(Event.TRAIN_START, 1022, 1, step=5),
        _ev(Event.SIGNAL, 1031.9, 1, signal="SIGTERM", received_at=1031.8, step=15),
        _ev(Event.STOP_AGREED, 1032, 1, step=15, reason="SIGTERM"), _ev(Event.CHECKPOINT, 1033, 1, step=15, seconds=1.0),
        _ev(Event.REQUEUE, 1033.1, 1, outcome=RequeueOutcomeName.REQUESTED, step=15),
        _ev(Event.EXIT, 1033.2, 1, code=144, step=15), _ev(Event.EXIT, 1033.15, 1, code=144, step=15, rank=1),
        # attempt 2: resumed at 15, a background save (overlaps training), a last save, finished at 25
        _ev(Event.START, 1050, 2), _ev(Event.TRAIN_START, 1053, 2, step=15),
        _ev(Event.CHECKPOINT, 1058, 2, step=20, seconds=2.0, background=True), _ev(Event.PROGRESS, 1063, 2, step=25),
        _ev(Event.CHECKPOINT, 1063, 2, step=25, seconds=0.1, reason=REASON_FINISHED), _ev(Event.FINISH, 1063, 2, step=25),
    ])
    info = summarize(run_dir)
    assert [a.outcome for a in info.attempts] == ["crashed", "preempted", "finished"]
    assert info.state == "finished" and info.current_step == 25
    assert [a.steps_lost for a in info.attempts] == [5, 0, 0] and info.steps_lost == 5
    a0 = info.attempts[0]
    assert a0.training_seconds == pytest.approx(9.5)  # 1001 → 1011 minus the 0.5 s save
    assert a0.redone_seconds == pytest.approx(5.0)  # step 5 reached at 1006 (interpolated), trained until 1011
    assert [i.cause for i in info.interruptions] == ["crashed", "preempted"] and info.preemptions == 1
    assert [i.reason for i in info.interruptions] == [None, "SIGTERM"]
    crash, preemption = info.interruptions
    assert crash.time_lost_seconds == pytest.approx(5 + 0 + 9 + 2)  # redone + stopping + queue + restart
    assert preemption.time_lost_seconds == pytest.approx(0 + 1.2 + 16.8 + 3)
    assert info.time_lost_seconds == pytest.approx(37.0)
    g = info.goodput
    assert g.wall_seconds == pytest.approx(63)
    assert (g.useful_seconds, g.redone_seconds, g.save_seconds) == pytest.approx((24.4, 5.0, 1.6))
    assert (g.startup_seconds, g.restart_seconds, g.queue_seconds, g.other_seconds) == pytest.approx((1, 5, 25.8, 0.2))
    assert g.goodput == pytest.approx(24.4 / 63)


def _fake_checkpoint(run_dir: Path, step: int, payload: bytes = b"x" * 100) -> Path:
    store = CheckpointStore(run_dir / CHECKPOINT_DIR)
    pending = store.begin(step)
    store.write(pending, lambda f: f.write(payload))
    return store.commit(pending, CommitRecord(file="", step=step, bytes=0, checksum="", reason="SIGUSR1")).path


def test_an_unfinished_last_attempt_is_running_crashed_or_unknown(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt = _fake_checkpoint(run_dir, 4)
    other_host = [_ev(Event.START, 2000), _ev(Event.TRAIN_START, 2001, step=4), _ev(Event.PROGRESS, 2011, step=14)]
    _journal(run_dir, other_host)
    fresh = summarize(run_dir, now=2020)
    assert fresh.state == "running" and fresh.steps_lost == 0
    stale = summarize(run_dir, now=2011 + 3600)
    assert stale.state == "unknown" and "squeue" in stale.state_detail

    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid, want in ((os.getpid(), "running"), (dead.pid, "failed")):
        start = time.time()
        _journal(run_dir, [_ev(Event.START, start, host=here, pid=pid),
                           _ev(Event.TRAIN_START, start + 1, host=here, pid=pid, step=4),
                           _ev(Event.PROGRESS, start + 2, host=here, pid=pid, step=9)])
        info = summarize(run_dir, now=start + 3)
        assert info.state == want, info.state_detail
    assert info.attempts[-1].outcome == "crashed" and info.steps_lost == 5, "steps beyond the checkpoint at 4 are lost"
    assert "a restart resumes from step 4" in info.state_detail

    # checkpoint validity: size check by default, the checksum on request; nothing is moved
    ckpt.write_bytes(b"y" * 100)
    assert summarize(run_dir).checkpoints[0].valid
    bad = summarize(run_dir, checksum=True).checkpoints[0]
    assert not bad.valid and "crc32 checksum" in (bad.problem or "")
    ckpt.write_bytes(b"y" * 10)
    info = summarize(run_dir)
    assert not info.checkpoints[0].valid and info.last_committed_step is None
    assert ckpt.exists(), "status never quarantines"


def _progress_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / PROGRESS_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def test_startup_counts_from_the_process_start_and_queue_wait_ends_there(tmp_path: Path) -> None:
    """Issue 15, point 9: an attempt whose process started 6 s before the trainer's set-up took 7 s to start,
    not 1 s; the queue wait ends when the next process starts, not at its set-up."""
    run_dir = tmp_path / "run"
    _journal(run_dir, [
        _ev(Event.START, 1000, process_started=994.0), _ev(Event.TRAIN_START, 1001, step=0),
        _ev(Event.STOP_AGREED, 1010, step=9, reason="SIGUSR1"), _ev(Event.EXIT, 1011, code=144, step=9),
        _ev(Event.RESUME, 1030, 1, process_started=1025.0), _ev(Event.TRAIN_START, 1032, 1, step=9),
        _ev(Event.FINISH, 1040, 1, step=20),
    ])
    info = summarize(run_dir)
    assert [a.started_at for a in info.attempts] == [994.0, 1025.0]
    assert [a.startup_seconds for a in info.attempts] == pytest.approx([7.0, 7.0])
    g = info.goodput
    assert (g.startup_seconds, g.restart_seconds, g.queue_seconds) == pytest.approx((7.0, 7.0, 14.0))
    assert g.wall_seconds == pytest.approx(1040 - 994)
    cut = info.interruptions[0]
    assert (cut.queue_seconds, cut.restart_seconds) == pytest.approx((14.0, 7.0))
