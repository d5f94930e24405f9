"""Compatibility import path: ``preemptible.testing`` is documented; the code lives in ``preemptible.tools.testing``."""

from preemptible.tools.testing import *  # noqa: F401,F403
from preemptible.tools.testing import __all__  # noqa: F401
