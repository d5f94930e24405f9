"""Compatibility import path: ``preemptible.submitit`` is documented; the code lives in ``preemptible.scheduler.submitit``."""

from preemptible.scheduler.submitit import *  # noqa: F401,F403
from preemptible.scheduler.submitit import __all__  # noqa: F401
