"""Compatibility import path: ``preemptible.checking`` is documented; the code lives in ``preemptible.tools.checking``."""

from preemptible.tools.checking import *  # noqa: F401,F403
from preemptible.tools.checking import __all__  # noqa: F401
