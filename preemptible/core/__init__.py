"""The trainer-neutral core: signals, agreement, store, session, run directory, requeue, environment.

Nothing under ``preemptible.core`` imports Lightning; the framework adapters (``preemptible.lightning``)
and a hand-written loop drive the same :class:`~preemptible.core.session.PreemptionSession`.
"""
