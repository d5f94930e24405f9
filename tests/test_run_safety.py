"""Nothing is lost or silently mixed up: one job per run directory, checkpoints that do not fit the run
are refused by name, checkpoints load with weights_only=True, a finished run is not redone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import example_command

from preemptible.core.lock import RunLock, RunLockedError
from preemptible.core.rundir import read_progress


def _fit(run_dir: Path, steps: int = 6, hidden: int = 32, **cb_kwargs):
    import pytorch_lightning as pl

    from preemptible import PreemptionCallback
    from preemptible.examples.models import BlobsData, TinyModel

    pl.seed_everything(0, verbose=False)
    cb = PreemptionCallback(run_dir=run_dir, **cb_kwargs)
    trainer = pl.Trainer(max_steps=steps, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(TinyModel(hidden=hidden), datamodule=BlobsData(samples=64), ckpt_path=cb.resume_path())
    return trainer, cb


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    _fit(run_dir)
    return run_dir


def test_finished_run_restarted_resumes_at_its_end(finished_run: Path) -> None:
    from preemptible import latest_checkpoint
    from preemptible.core.schema import Event, read_events

    last = latest_checkpoint(finished_run)
    assert last is not None and last.name == "step-000000006.ckpt", "a last checkpoint is committed at the end"
    trainer, _ = _fit(finished_run)
    assert trainer.global_step == 6
    events = list(read_events(finished_run / "events.jsonl"))
    resumes = [e["checkpoint"] for e in events if e["event"] == Event.RESUME]
    assert len(resumes) == 1 and resumes[0].endswith("step-000000006.ckpt"), "the restart resumed from the end"
    assert [e["step"] for e in events if e["event"] == Event.CHECKPOINT] == [6], "nothing was trained (or saved) again"


def test_checkpoints_load_with_weights_only(finished_run: Path) -> None:
    import numpy  # noqa: F401 - numpy's RNG state is in the checkpoint when numpy is loaded

    from preemptible import latest_checkpoint

    ckpt = torch.load(latest_checkpoint(finished_run), weights_only=True)
    assert ckpt["global_step"] == 6 and "PreemptionCallback" in ckpt["callbacks"]


def test_checkpoint_of_a_different_model_is_refused_by_name(finished_run: Path, tmp_path: Path) -> None:
    from preemptible.lightning.compat import CheckpointMismatch

    with pytest.raises(CheckpointMismatch, match=r"step-000000006\.ckpt does not fit this model "
                                                 r"\(net\.0\.weight: checkpoint \(32, 16\), model \(64, 16\)"):
        _fit(finished_run, steps=8, hidden=64)
    assert (finished_run / "checkpoints" / "step-000000006.ckpt").exists(), "the old checkpoint is untouched"


def test_checkpoint_of_a_different_world_size_is_refused(finished_run: Path) -> None:
    from preemptible.examples.models import TinyModel
    from preemptible.lightning.compat import CheckpointMismatch, check_checkpoint_fits

    path = finished_run / "checkpoints" / "step-000000006.ckpt"
    record = path.with_name(path.name + ".commit.json")
    before = (path.read_bytes(), record.read_bytes())
    with pytest.raises(CheckpointMismatch, match="written by a run of 1 rank.*this run has 2.*allow_world_size_change"):
        check_checkpoint_fits(path, TinyModel(), world_size=2, allow_world_size_change=False)
    check_checkpoint_fits(path, TinyModel(), world_size=2, allow_world_size_change=True)  # allowed: no error
    assert (path.read_bytes(), record.read_bytes()) == before, "the refused checkpoint and its record are untouched"
    assert not (finished_run / "checkpoints" / "quarantine").exists(), "a refused checkpoint is not quarantined"


@pytest.mark.ddp
def test_two_rank_job_refuses_a_one_rank_checkpoint(tmp_path: Path) -> None:
    """Through a real 2-rank DDP resume: every rank fails with the message, nothing trains, nothing is moved."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PREEMPTIBLE_RUN_DIR": str(run_dir)}
    first = subprocess.run(example_command(tmp_path / "one.jsonl", max_steps=4, devices=1), env=env,
                           capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    path = run_dir / "checkpoints" / "step-000000004.ckpt"
    before = path.read_bytes()
    second = subprocess.run(example_command(tmp_path / "two.jsonl", max_steps=8, devices=2), env=env,
                            capture_output=True, text=True, timeout=240)
    assert second.returncode != 0
    assert "written by a run of 1 rank(s); this run has 2" in second.stderr, second.stderr[-3000:]
    assert "allow_world_size_change=True" in second.stderr
    assert not (tmp_path / "two.jsonl").exists() or "train" not in (tmp_path / "two.jsonl").read_text(), "nothing trained"
    assert path.read_bytes() == before and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000000004.ckpt", "step-000000004.ckpt.commit.json"], "the checkpoint is untouched and nothing was added"


def test_lock_stale_detection(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, job_id="10")
    assert lock.acquire() is None
    lock.release()
    assert not (tmp_path / "lock.json").exists()
    # a live holder on this host (pid 1 always exists) from another job
    (tmp_path / "lock.json").write_text(f'{{"host": "{socket.gethostname()}", "pid": 1, "job_id": "10"}}')
    with pytest.raises(RunLockedError, match="in use by another job.*delete .*lock.json"):
        RunLock(tmp_path, job_id="11").acquire()
    assert RunLock(tmp_path, job_id="10").acquire().startswith("it belongs to an earlier attempt of job 10")
    # a holder on this host whose pid is gone
    (tmp_path / "lock.json").write_text(f'{{"host": "{socket.gethostname()}", "pid": 999999999, "job_id": "12"}}')
    assert "is gone" in RunLock(tmp_path, job_id="13").acquire()
    # a holder elsewhere without a heartbeat for longer than stale_after
    (tmp_path / "lock.json").write_text('{"host": "far-away-node", "pid": 1, "job_id": "14"}')
    old = time.time() - 3600
    os.utime(tmp_path / "lock.json", (old, old))
    assert "no heartbeat" in RunLock(tmp_path, job_id="15", stale_after=900).acquire()


def test_second_job_on_the_same_run_dir_gets_a_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    release = tmp_path / "release"
    env = dict(os.environ, PREEMPTIBLE_RUN_DIR=str(run_dir), PREEMPTIBLE_PROGRESS_INTERVAL="0")
    # The first job holds after its first step until the test releases it: it holds the lock for as long
    # as the second job takes to start, however slow the machine is.
    first = subprocess.Popen(example_command(tmp_path / "a.jsonl", max_steps=6, hold_until_exists=release), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (read_progress(run_dir) or {}).get("step"):
            assert time.monotonic() < deadline and first.poll() is None, "the first job never started training"
            time.sleep(0.1)
        second = subprocess.run(example_command(tmp_path / "b.jsonl", max_steps=6), env=env, capture_output=True,
                                text=True, timeout=120)
        assert first.poll() is None, "the first job was still running while the second one tried"
        release.touch()
        assert second.returncode != 0
        assert "is in use by another job" in second.stderr and str(run_dir) in second.stderr
        assert first.wait(timeout=120) == 0, "the first job is undisturbed"
    finally:
        release.touch()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (run_dir / "lock.json").exists(), "released at the end"


def test_free_space_warning_names_the_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    import psutil

    from preemptible.core.store import CheckpointStore
    from preemptible.examples.models import TinyModel
    from preemptible.lightning.saving import warn_if_short_of_space

    usage = namedtuple("usage", "total used free percent")
    monkeypatch.setattr(psutil, "disk_usage", lambda path: usage(100, 100, 10, 90.0))  # the disk, not the code, is faked
    store = CheckpointStore(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="MiB free.*an emergency save may fail with a full disk") as caught:
        warn_if_short_of_space(store, TinyModel())
    assert str(store.directory) in str(caught[0].message), "the warning names the directory"
    # Room for exactly two checkpoints of the estimate (3 x the parameters) is enough: no warning.
    need = 3 * sum(p.numel() * p.element_size() for p in TinyModel().parameters())
    monkeypatch.setattr(psutil, "disk_usage", lambda path: usage(10 * need, 8 * need, 2 * need, 80.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_short_of_space(store, TinyModel())
    monkeypatch.setattr(psutil, "disk_usage", lambda path: usage(10 * need, 8 * need, 2 * need - 1, 80.0))
    with pytest.warns(UserWarning, match="MiB free"):
        warn_if_short_of_space(store, TinyModel())


def test_progress_bar_keeps_working_under_the_callback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    import pytorch_lightning as pl

    from preemptible import Preempted, PreemptionCallback
    from preemptible.examples.models import BlobsData, TinyModel
    from preemptible.tools.tracing import SignalAtStep

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)}
    cb = PreemptionCallback(run_dir=tmp_path / "run")
    trainer = pl.Trainer(max_steps=8, callbacks=[cb, SignalAtStep(["3"])], logger=False, enable_checkpointing=False,
                         enable_progress_bar=True, enable_model_summary=False, limit_val_batches=0)
    try:
        with pytest.raises(Preempted) as stopped:
            trainer.fit(TinyModel(), datamodule=BlobsData(samples=64), ckpt_path=cb.resume_path())
        # a preempted process ignores further preemption signals on its way out
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for signum, handler in before.items():  # this test shares its process with the others
            signal.signal(signum, handler)
    # noticed at step 4, the last batch of the 4-batch epoch: the stop moves to the next boundary
    assert stopped.value.step == 5 and stopped.value.code == 144
    shown = capsys.readouterr()
    assert "Epoch 1" in shown.out + shown.err, "the progress bar rendered up to the epoch it stopped in"


@pytest.mark.parametrize("signals, replaced", [(("USR1", "TERM"), True), (("USR1",), False)])
def test_lightning_per_step_sigterm_broadcast_is_replaced_only_while_sigterm_is_ours(
        tmp_path: Path, signals: tuple[str, ...], replaced: bool) -> None:
    """Lightning broadcasts its own SIGTERM flag with a blocking collective before every DDP batch. The
    flag is set only by Lightning's SIGTERM handler; when ours replaces it, the broadcast can only carry
    0, so the callback reduces its own votes in that slot for the fit (and puts Lightning's back after).
    When SIGTERM is not among the callback's signals, Lightning's handler and broadcast stay as they are."""
    import pytorch_lightning as pl

    seen: list[bool] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer: "pl.Trainer", *args: object) -> None:
            slot = trainer.fit_loop.epoch_loop.__dict__.get("_broadcast_sigterm_tensor")
            seen.append(getattr(slot, "_preemptible", False))

    import pytorch_lightning as pl

    from preemptible import PreemptionCallback
    from preemptible.examples.models import BlobsData, TinyModel

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    cb = PreemptionCallback(run_dir=tmp_path / "run", signals=signals, save_on_finish=False)
    trainer = pl.Trainer(max_steps=3, callbacks=[cb, Probe()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    try:
        trainer.fit(TinyModel(), datamodule=BlobsData(samples=64))
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert seen == [replaced] * 3
    assert "_broadcast_sigterm_tensor" not in trainer.fit_loop.epoch_loop.__dict__, "Lightning's method is back after fit"
