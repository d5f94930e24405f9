"""``python -m preemptible.examples.hydra_app.train [overrides]``: the Hydra app (see the package docstring).

Examples::

    # locally, preempted at step 20 and relaunched by the simulator (Hydra's output dir = the run dir)
    preemptible run --run-dir runs/hydra1 --preempt-at-step 20 -- python -m preemptible.examples.hydra_app.train

    # on SLURM through hydra-submitit-launcher; every requeue continues in <sweep dir>/<job id>
    python -m preemptible.examples.hydra_app.train -m hydra/launcher=preemptible_slurm hydra.launcher.partition=low
"""

from __future__ import annotations

import os
from typing import Any

import hydra
from omegaconf import DictConfig

from preemptible.scheduler.hydra import register_resolvers

register_resolvers()  # before @hydra.main composes the config: ${preemptible.run_dir:...}


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every entry of a config group that has a ``_target_`` (as the templates' ``instantiate_callbacks``)."""
    if not group:
        return []
    return [hydra.utils.instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate everything from ``cfg``, fit (start or resume), return a summary."""
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    import pytorch_lightning as pl

    from preemptible import PreemptionCallback
    from preemptible.core.environment import JobEnvironment
    from preemptible.tools.tracing import state_digest

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = instantiate_all(cfg.get("callbacks"))  # first: the preemption callback fixes the W&B run id
    preemption = next((c for c in callbacks if isinstance(c, PreemptionCallback)), None)
    if preemption is None:
        raise ValueError("no PreemptionCallback among cfg.callbacks: add conf/callbacks/default.yaml's "
                         "'preemption' entry (_target_: preemptible.PreemptionCallback)")
    slow = cfg.get("slow_attempts")  # testing: slow steps only in the first N attempts
    step_sleep = {} if slow is None or JobEnvironment.from_env().restart_count < slow else {"step_sleep": 0.0}
    model = hydra.utils.instantiate(cfg.model, **step_sleep)
    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # No ckpt_path: the attached callback resumes the run's newest valid checkpoint by itself.
    trainer.fit(model, datamodule=datamodule)
    if trainer.is_global_zero:
        print(f"training finished at global step {trainer.global_step} in {preemption.run_dir}", flush=True)
    return {"global_step": trainer.global_step, "rank": trainer.global_rank, "weights": state_digest(model)}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    return train(cfg)


if __name__ == "__main__":
    main()
