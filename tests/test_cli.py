"""The ``preemptible`` command line as a user runs it: real processes, exit codes, output, run directories.

Each process that trains pays Lightning's import (seconds), so the launches are few: one ``run`` that is
preempted and relaunched, one successful ``check``, the failing ``check``s that start at most one run,
and one short ``demo``. The errors that need no training (a missing run directory, an unknown signal,
a malformed factory) start nothing and take well under a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from helpers import PYTHON, load_record

from preemptible.core.exit import REQUEUE_EXIT_CODE
from preemptible.core.schema import Event, read_events
from preemptible.tools.testing import Attempt, RunSummary, assert_resumed_on_same_step

_SCRIPT = Path(sys.executable).parent / "preemptible"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "preemptible.cli"]


def preemptible(*args: str, cwd: Path, timeout: float = 240, env: Optional[dict[str, str]] = None
                ) -> subprocess.CompletedProcess[str]:
    """``preemptible ARGS...`` in ``cwd``; wide enough a terminal that rich does not wrap messages."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PREEMPTIBLE_RUN_DIR", "SLURM_JOB_ID")}
    full_env.update(COLUMNS="200", **(env or {}))
    return subprocess.run([*CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text``, as lists of stripped cells."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.lstrip().startswith("│")]


def events(run_dir: Path) -> list[dict]:
    return list(read_events(run_dir / "events.jsonl"))


def of(evts: list[dict], name: str, rank: int = 0) -> list[dict]:
    return [e for e in evts if e["event"] == name and e["rank"] == rank]


# --- preemptible run ------------------------------------------------------------------------------
def test_run_preempts_at_the_step_relaunches_and_summarises_the_attempts(tmp_path: Path) -> None:
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    # 0.2 s a step until the first resume: after step 5, 5 s of training left for the signal to land in
    proc = preemptible("run", "--run-dir", str(run_dir), "--preempt-at-step", "5", "--signal", "TERM", "--",
                       PYTHON, "-m", "preemptible.examples.train", "--max-steps", "30", "--step-sleep", "0.2",
                       "--slow-until-resumed", "--record", str(record), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "attempt 0: SIGTERM to tree at step 5, done by the rank itself" in proc.stderr  # lands exactly (issue 15)
    assert f"attempt 0 exited with {REQUEUE_EXIT_CODE} (requeue): relaunching" in proc.stderr
    assert "attempt 1: exit code 0" in proc.stderr and "attempt 2" not in proc.stderr

    evts = events(run_dir)
    stops = [e["step"] for e in of(evts, Event.STOP_AGREED)]
    assert len(stops) == 1 and stops[0] >= 5, stops
    assert [e["step"] for e in of(evts, Event.TRAIN_START)] == [0, stops[0]]
    assert [e["signal"] for e in of(evts, Event.SIGNAL)] == ["SIGTERM"]
    assert [e["code"] for e in of(evts, Event.EXIT)] == [REQUEUE_EXIT_CODE]
    assert [e["step"] for e in of(evts, Event.FINISH)] == [30]
    assert [e["step"] for e in of(evts, Event.CHECKPOINT) if e["reason"] == "SIGTERM"] == stops

    # the summary: one row per attempt, with what the journal says
    assert "preemptible run: summary" in proc.stderr
    rows = {row[0]: row for row in table_rows(proc.stderr)}
    assert set(rows) == {"0", "1"}, rows
    # attempt, exit, signal, sent at step, stopped at step, resumed from, signal→commit s, restart s
    first, second = rows["0"], rows["1"]
    assert first[1:3] == [str(REQUEUE_EXIT_CODE), "SIGTERM"]
    assert 5 <= int(first[3]) <= stops[0] and first[4] == first[5] == str(stops[0]), first
    assert float(first[6]) > 0
    assert second[1:6] == ["0", "-", "-", "-", "-"] and float(second[7]) > 0, second
    assert first[8] == "requested" and second[8] == "-", (first, second)  # the stop's cause, as journaled

    # every training batch trained exactly once across the two attempts
    losses, duplicates, final = load_record(record)
    assert not duplicates and sorted(k[4] for k in losses if k[0] == "train") == list(range(1, 31)) and final


def test_run_with_a_step_plan_and_no_run_directory_names_the_fix_and_starts_nothing(tmp_path: Path) -> None:
    proc = preemptible("run", "--preempt-at-step", "3", "--", "touch", "started", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("preemptible run: error: --preempt-at-step needs the run directory to follow training progress: "
            "pass --run-dir or export PREEMPTIBLE_RUN_DIR") in proc.stderr
    assert "Traceback" not in proc.stderr and "started pid" not in proc.stderr
    assert not (tmp_path / "started").exists()


@pytest.mark.parametrize("args, message", [
    pytest.param(["--signal", "FOO"], "unknown signal 'FOO': use a name such as USR1, TERM or USR2", id="signal"),
    pytest.param(["--signal", "FOO", "--preempt-at-step", "3"], "unknown signal 'FOO'", id="signal-with-plan"),
    pytest.param(["--target", "node:1", "--preempt-after", "1"], "unknown --target 'node:1': use 'tree' or 'rank:N'",
                 id="target"),
])
def test_run_refuses_an_unknown_signal_or_target_before_starting(tmp_path: Path, args: list[str], message: str) -> None:
    proc = preemptible("run", "--run-dir", str(tmp_path / "run"), *args, "--", "touch", "started", cwd=tmp_path,
                       timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"preemptible run: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and "started pid" not in proc.stderr
    assert not (tmp_path / "started").exists()


# --- preemptible check ----------------------------------------------------------------------------
def test_check_of_the_example_factory_is_identical(tmp_path: Path) -> None:
    work = tmp_path / "check"
    proc = preemptible("check", "preemptible.examples.models:example_factory", "--steps", "6", "--preempt-at", "2",
                       "--workdir", str(work), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evts = events(work / "preempted")
    stops = [e["step"] for e in of(evts, Event.STOP_AGREED)]
    assert len(stops) == 1 and [e["step"] for e in of(evts, Event.TRAIN_START)] == [0, stops[0]], evts
    assert f"signal after step 2; all ranks stopped at step {stops[0]}; resumed at step {stops[0]}" in proc.stdout
    assert "identical: all 6 losses, every step's weights and the final tensors match bit for bit" in proc.stdout
    rows = [r for r in table_rows(proc.stdout) if len(r) == 8]
    assert [r[3] for r in rows] == ["1", "2", "3", "4", "5", "6"] and {r[7] for r in rows} == {"yes"}, rows
    assert [e["step"] for e in of(events(work / "reference"), Event.STOP_AGREED)] == []


@pytest.mark.parametrize("factory, messages, launched", [
    pytest.param("nocolon", ["preemptible check: error: factory 'nocolon' is not MODULE:FACTORY"], False, id="no-colon"),
    pytest.param("a.b:c:d", ["preemptible check: error: factory 'a.b:c:d' is not MODULE:FACTORY"], False, id="two-colons"),
    pytest.param("no_such_module_xyz:make", ["preemptible check: error: factory 'no_such_module_xyz:make': "
                                             "no module named 'no_such_module_xyz'"], False, id="no-module"),
    pytest.param("preemptible.examples.models:no_such_factory",
                 ["check of preemptible.examples.models:no_such_factory could not compare: the reference run failed",
                  "ValueError: module 'preemptible.examples.models' has no attribute 'no_such_factory'"], True,
                 id="no-attribute"),
    pytest.param("badfactory:make", ["check of badfactory:make could not compare: the reference run failed",
                                     "RuntimeError: the factory [broken] raised"], True, id="raises"),
])
def test_check_of_a_failing_factory_names_it(tmp_path: Path, factory: str, messages: list[str], launched: bool) -> None:
    # a module in the current directory, as a user's own module would be
    (tmp_path / "badfactory.py").write_text("def make():\n    raise RuntimeError('the factory [broken] raised')\n")
    work = tmp_path / "check"
    proc = preemptible("check", factory, "--steps", "4", "--workdir", str(work), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    for message in messages:
        assert message in out, out[-3000:]
    assert "Traceback" not in out
    assert work.exists() == launched
    if launched:  # it stopped at the failed reference run
        assert not (work / "preempted.log").exists()


# --- preemptible demo -----------------------------------------------------------------------------
def test_demo_short_on_one_rank_gives_its_verdict(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = preemptible("demo", "--devices", "1", "--steps", "60", "--out", str(out), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "1 CPU rank(s)" in text and "60 steps" in text
    assert "batches replayed: 0   batches skipped: 0   final weights bitwise equal on every rank: yes" in text
    assert "(3 attempts, each pays process start-up)" in text
    assert "The preempted run is the same run: every loss and the final weights match bit for bit." in text

    evts = events(out / "preempted")
    stops = [e["step"] for e in of(evts, Event.STOP_AGREED)]
    assert [e["signal"] for e in of(evts, Event.SIGNAL)] == ["SIGUSR1", "SIGTERM"]
    assert len(stops) == 2 and [e["step"] for e in of(evts, Event.TRAIN_START)] == [0, *stops], evts
    assert [e["step"] for e in of(evts, Event.FINISH)] == [60]
    # the table: one row per preemption, stopped where the journal says, nothing lost, every loss equal
    rows = [r for r in table_rows(text) if len(r) == 8]
    assert [r[1] for r in rows] == ["SIGUSR1", "SIGTERM"], rows
    assert [int(r[3]) for r in rows] == stops and [int(r[5]) for r in rows] == stops
    for row in rows:
        equal, total = row[7].split("/")
        assert row[6] == "0" and equal == total and int(total) > 0, row
    assert of(events(out / "reference"), Event.STOP_AGREED) == []


def test_demo_refuses_to_empty_a_directory_that_is_not_an_earlier_demos(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "reference.log").write_text("an earlier demo's log")
    proc = preemptible("demo", "--devices", "1", "--steps", "20", "--out", str(out), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"preemptible demo: error: --out {out} holds files that are not an earlier demo's (notes.txt)" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep me" and (out / "reference.log").exists()
    assert not (out / "reference").exists(), "nothing was run"


# --- preemptible.tools.testing.assert_resumed_on_same_step (the pytest side of `preemptible run`) ----------------
def _attempt(index: int, exit_code: Optional[int], stop: Optional[int] = None, checkpoint: Optional[str] = "ckpt",
             resumed: Optional[int] = None, timed_out: bool = False) -> Attempt:
    return Attempt(index=index, command=["train"], exit_code=exit_code, stop_step=stop,
                   checkpoint=checkpoint if stop is not None else None, resumed_from_step=resumed, timed_out=timed_out)


def _summary(*attempts: Attempt) -> RunSummary:
    return RunSummary(attempts=list(attempts))


P = REQUEUE_EXIT_CODE


def test_assert_resumed_on_same_step_passes_a_preempted_resumed_finished_run() -> None:
    assert_resumed_on_same_step(_summary(_attempt(0, P, stop=6, resumed=0), _attempt(1, P, stop=9, resumed=6),
                                         _attempt(2, 0, resumed=9)))
    assert_resumed_on_same_step(_summary(_attempt(0, 0, resumed=0)), min_preemptions=0)
    # stopped before training any step (a signal during set-up): nothing new to save, so no checkpoint
    assert_resumed_on_same_step(_summary(_attempt(0, P, stop=0, checkpoint=None, resumed=0), _attempt(1, P, stop=6, resumed=0),
                                         _attempt(2, P, stop=6, checkpoint=None, resumed=6), _attempt(3, 0, resumed=6)))


@pytest.mark.parametrize("summary, message", [
    pytest.param(_summary(), "the run has no attempts", id="empty"),
    pytest.param(_summary(_attempt(0, 0, resumed=0)), "relaunched 0 time(s), expected at least 1: nothing was resumed",
                 id="never-preempted"),
    pytest.param(_summary(_attempt(0, P, stop=None, resumed=0), _attempt(1, 0, resumed=0)),
                 "attempt 0 exited with the requeue exit code without an agreed stop", id="no-stop"),
    pytest.param(_summary(_attempt(0, P, stop=6, checkpoint=None, resumed=0), _attempt(1, 0, resumed=0)),
                 "attempt 0 stopped at step 6 but committed no checkpoint", id="no-checkpoint"),
    pytest.param(_summary(_attempt(0, P, stop=6, resumed=0), _attempt(1, P, stop=7, checkpoint=None, resumed=6),
                          _attempt(2, 0, resumed=7)),
                 "attempt 1 stopped at step 7 but committed no checkpoint", id="no-checkpoint-after-resume"),
    pytest.param(_summary(_attempt(0, P, stop=6, resumed=0), _attempt(1, 0, resumed=None)),
                 "attempt 1 never started training", id="no-train-start"),
    pytest.param(_summary(_attempt(0, P, stop=6, resumed=0), _attempt(1, 0, resumed=4)),
                 "attempt 1 resumed from step 4, but attempt 0 stopped and checkpointed at step 6", id="wrong-step"),
    pytest.param(_summary(_attempt(0, P, stop=6, resumed=0), _attempt(1, P, stop=9, resumed=6)),
                 f"the last attempt (1) exited with code {P}, not 0 (it asked to be requeued", id="last-requeued"),
    pytest.param(_summary(_attempt(0, P, stop=6, resumed=0), _attempt(1, 1, resumed=6)),
                 "the last attempt (1) exited with code 1, not 0", id="last-failed"),
    pytest.param(_summary(_attempt(0, P, stop=6, resumed=0), _attempt(1, -9, resumed=6, timed_out=True)),
                 "the last attempt (1) hung and was killed", id="last-hung"),
    pytest.param(_summary(_attempt(0, 1, stop=6, resumed=0), _attempt(1, 0, resumed=6)),
                 "attempt 0 exited with code 1, not the requeue exit code", id="relaunched-after-a-failure"),
])
def test_assert_resumed_on_same_step_names_the_attempt_and_what_is_missing(summary: RunSummary, message: str) -> None:
    with pytest.raises(AssertionError) as info:
        assert_resumed_on_same_step(summary)
    assert message in str(info.value)
