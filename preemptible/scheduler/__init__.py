"""Scheduler integrations: SLURM (sbatch templates and their rendering) and submitit."""
