"""The Hydra face of preemptible: a run directory that is the same for every restart of a run.

Hydra gives every launch a new output directory (``outputs/${now:...}``), so a relaunched job
would start a new, empty run. The Hydra app in :mod:`preemptible.examples.hydra_app` ties the
output directory to the run instead:

* ``hydra.run.dir: ${preemptible.run_dir:DEFAULT}`` resolves to ``$PREEMPTIBLE_RUN_DIR`` (exported
  by ``preemptible run``, the ``preemptible sbatch`` templates and :class:`~preemptible.scheduler.submitit.PreemptibleTask`),
  else to ``DEFAULT``, else, under SLURM, to ``runs/<job id>`` (the callback's own default);
* under hydra-submitit-launcher, ``hydra.sweep.subdir: ${hydra.job.id}`` (the submitit job id, which
  SLURM keeps when it requeues a job).

Call :func:`register_resolvers` at import time of the module that holds ``@hydra.main``: the
resolver must exist before Hydra composes the config.
"""

from __future__ import annotations

from typing import Optional

from preemptible.core.environment import JobEnvironment
from preemptible.core.rundir import RunDirError, resolve_run_dir

__all__ = ["RUN_DIR_RESOLVER", "register_resolvers", "run_dir_for_config"]

#: ``${preemptible.run_dir:DEFAULT}`` in a Hydra/OmegaConf config.
RUN_DIR_RESOLVER = "preemptible.run_dir"


def run_dir_for_config(default: Optional[str] = None, env: Optional[JobEnvironment] = None) -> str:
    """The run directory a config should use: the launcher's, else ``default``, else ``runs/<SLURM job id>``.

    Raises:
        RunDirError: none of them is known (not started by a preemptible launcher, no default, not under SLURM).
    """
    env = env or JobEnvironment.from_env()
    if env.run_dir:
        return env.run_dir
    if default:
        return str(default)
    try:
        return str(resolve_run_dir(None, env))
    except RunDirError:
        raise RunDirError(
            f"${{{RUN_DIR_RESOLVER}:}} has no run directory: this process was not started by `preemptible run`/"
            f"`preemptible sbatch` (PREEMPTIBLE_RUN_DIR) nor under SLURM. Give a default, e.g. "
            f"hydra.run.dir: ${{{RUN_DIR_RESOLVER}:runs/my-experiment}}") from None


def register_resolvers() -> None:
    """Register ``${preemptible.run_dir:...}`` with OmegaConf (once; calling it again does nothing)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RUN_DIR_RESOLVER):
        OmegaConf.register_new_resolver(RUN_DIR_RESOLVER, run_dir_for_config)
