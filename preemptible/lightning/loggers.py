"""Logger continuity across requeues: one TensorBoard/CSV version directory, one W&B run.

Left alone, every restart of a run picks the next ``version_N`` directory (TensorBoard, CSV) or a
new W&B run, and a preempted run's curves end up scattered. The first start records each logger's
version (W&B: run id) in ``run.json``; later starts continue there:

* W&B reads ``WANDB_RUN_ID``/``WANDB_RESUME`` when its run is created, which Lightning does just
  before the first callback hook; the callback exports them when it is constructed.
* TensorBoard and CSV have already made their new, empty ``version_N`` directory by the first
  callback hook; the writer is closed, the files it just made are removed (only those, and only
  when nothing else is in the directory), and the logger is pointed back at the recorded version,
  where the CSV writer appends to the earlier ``metrics.csv`` instead of deleting it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from preemptible.core.rundir import RunDirectory
from preemptible.core.schema import RunRecordKey
from preemptible.lightning import hooks, namespace

if TYPE_CHECKING:
    import pytorch_lightning as pl


def _key(index: int, logger: Any) -> str:
    return f"{index}:{type(logger).__name__}"


def export_wandb_run_id(run: RunDirectory) -> None:
    """Before the Trainer creates a W&B run: continue the recorded one, or fix the id of a new one."""
    if os.environ.get("WANDB_RUN_ID"):
        return  # the user's own choice
    saved = [v for k, v in (run.read_record().get(RunRecordKey.LOGGERS) or {}).items() if k.endswith(":WandbLogger")]
    os.environ["WANDB_RUN_ID"] = str(saved[0]) if saved else uuid.uuid4().hex[:8]
    os.environ.setdefault("WANDB_RESUME", "allow")


def keep_logger_versions(trainer: "pl.Trainer", run: RunDirectory) -> dict[str, Any]:
    """Every rank calls this at set-up; rank 0 decides and records, the others follow. Returns the mapping."""
    package = namespace.of(trainer)  # the loggers of the trainer's own package
    TensorBoardLogger, CSVLogger, WandbLogger = (package.load("loggers", name)
                                                 for name in ("TensorBoardLogger", "CSVLogger", "WandbLogger"))
    loggers = [(i, lg) for i, lg in enumerate(trainer.loggers) if isinstance(lg, (TensorBoardLogger, CSVLogger, WandbLogger))]
    if not loggers:
        return {}
    decided: dict[str, Any] = {}
    if trainer.is_global_zero:
        saved = run.read_record().get(RunRecordKey.LOGGERS) or {}
        for i, logger in loggers:
            key = _key(i, logger)
            if key in saved and not isinstance(logger, WandbLogger) and logger.version != saved[key]:
                _move_back(logger, saved[key])
            decided[key] = logger.version
        if decided != saved:
            run.update_record(**{RunRecordKey.LOGGERS: {**saved, **decided}})
    decided = trainer.strategy.broadcast(decided)
    for i, logger in loggers:
        key = _key(i, logger)
        if not isinstance(logger, WandbLogger) and key in decided and not hooks.logger_experiment_created(logger):
            hooks.set_logger_version(logger, decided[key])
    return decided


def _move_back(logger: Any, version: Any) -> None:
    fresh = Path(logger.log_dir)
    hooks.close_logger_experiment(logger)
    hooks.set_logger_version(logger, version)
    _remove_if_just_made(fresh)
    if isinstance(logger, namespace.of(logger).load("loggers", "CSVLogger")):
        # A new CSV writer deletes an existing metrics.csv ("previous log files will be deleted"):
        # create it with the file moved aside, then put the file back; the writer appends to it.
        metrics = Path(logger.log_dir) / "metrics.csv"
        aside = metrics.with_name(".metrics.csv.preemptible")
        if metrics.exists():
            os.replace(metrics, aside)
        try:
            _ = logger.experiment
        finally:
            if aside.exists():
                os.replace(aside, metrics)


def _remove_if_just_made(directory: Path) -> None:
    """Remove ``directory`` if every file in it was created by this process (the logger's fresh start)."""
    if not directory.is_dir():
        return
    born = psutil.Process().create_time()
    files = [p for p in directory.rglob("*") if p.is_file()]
    if all(p.stat().st_mtime >= born and p.stat().st_size < 1 << 20 for p in files):
        shutil.rmtree(directory, ignore_errors=True)
