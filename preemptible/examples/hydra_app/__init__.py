"""A Hydra app in the shape of the common Lightning+Hydra project templates, made preemptible.

``python -m preemptible.examples.hydra_app.train`` (config in ``conf/``): data, model, callbacks,
loggers and trainer are instantiated from config with ``hydra.utils.instantiate``; the preemption
callback is one entry of ``conf/callbacks/default.yaml``. Hydra's output directory *is* the run
directory, and it is tied to the run, not to the launch time, so every restart continues in it:

* locally and under ``preemptible run`` / ``preemptible sbatch``: ``hydra.run.dir`` comes from
  ``${preemptible.run_dir:...}`` (``$PREEMPTIBLE_RUN_DIR``, which those commands set, else the given default);
* under hydra-submitit-launcher (``-m``): ``hydra.sweep.subdir`` is the submitit job id, which a
  requeue keeps (see ``conf/hydra/launcher/preemptible_slurm.yaml`` for the launcher settings).
"""
