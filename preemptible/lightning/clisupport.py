"""LightningCLI relaunches: the config a requeued job finds in its (stable) log directory.

LightningCLI's ``SaveConfigCallback`` refuses to start when ``config.yaml`` already exists in the
log directory, to protect a previous run's results. Once preemptible keeps the log directory of a
run stable across requeues, every relaunch finds the file its first start wrote. Before that
callback's ``setup`` (ours comes first in the trainer's list), the relaunch's config is compared
with the saved one:

* the same settings: it is written again (identical content: nothing is lost);
* different settings: the saved file is left as it is, the relaunch's config goes next to it as
  ``config.relaunch-N.yaml``, and a warning names the settings that differ.

Only public attributes of ``SaveConfigCallback`` are used (``parser``, ``config``, ``config_filename``,
``overwrite``, ``save_to_log_dir``, ``already_saved``). ``lightning.pytorch.cli``/``pytorch_lightning.cli``
is looked at only when the process imported it (a LightningCLI app did).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from preemptible.lightning import namespace

if TYPE_CHECKING:
    import pytorch_lightning as pl


def keep_saved_cli_config(trainer: "pl.Trainer") -> None:
    """Every rank at set-up (the decision is rank 0's, broadcast)."""
    cli = sys.modules.get(namespace.of(trainer).module + ".cli")
    save_config = getattr(cli, "SaveConfigCallback", None)
    if save_config is None:
        return
    for callback in getattr(trainer, "callbacks", []):  # the public list (typed as a property mypy misses)
        if (not isinstance(callback, save_config) or callback.already_saved or callback.overwrite
                or not callback.save_to_log_dir):
            continue
        log_dir = trainer.log_dir  # broadcast by Lightning
        if log_dir is None:
            continue
        saved = Path(log_dir) / callback.config_filename
        verdict = _compare(saved, callback) if trainer.is_global_zero else None
        verdict = trainer.strategy.broadcast(verdict)
        if verdict is None:
            continue
        if verdict == "same":
            callback.overwrite = True
            continue
        relaunch_name, differing = verdict
        callback.config_filename = relaunch_name
        if trainer.is_global_zero:
            warnings.warn(
                f"preemptible: this relaunch's LightningCLI config differs from the one the run started with ({saved}) "
                f"in {', '.join(differing)}. The saved config is kept as it is; this relaunch's is written to "
                f"{saved.with_name(relaunch_name)}. To run different settings as a new experiment, give it its own "
                "run_dir and log directory.", stacklevel=2)


def _compare(saved: Path, callback: Any) -> Optional[Any]:
    """``None`` (no saved config), ``"same"``, or ``(file name for this relaunch's config, differing keys)``."""
    if not saved.is_file():
        return None
    import yaml  # type: ignore[import-untyped]

    try:
        before = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        before = None
    now = yaml.safe_load(callback.parser.dump(callback.config, skip_none=False))
    if before == now:
        return "same"
    old, new = _flatten(before), _flatten(now)
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING))
    n = 1
    while saved.with_name(f"{saved.stem}.relaunch-{n}{saved.suffix}").exists():
        n += 1
    shown = differing[:5] + ([f"and {len(differing) - 5} more"] if len(differing) > 5 else [])
    return f"{saved.stem}.relaunch-{n}{saved.suffix}", shown or ["its layout"]


_MISSING = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix or "(the whole file)": value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out
