"""torchrun's elastic agent between the scheduler and the ranks: which stop requests reach them.

``srun torchrun ...`` makes SLURM's task the elastic agent, and the ranks its children. The agent
handles only the signals in ``--signals-to-handle`` (default ``SIGTERM,SIGINT,SIGHUP,SIGQUIT``):

* a handled signal makes it send the same signal to every worker, wait ``--shutdown-timeout``
  seconds (default 30) and then SIGKILL the workers still running;
* any other signal takes its default action in the agent. For SIGUSR1 and SIGUSR2 (what
  ``sbatch --signal``, preemption with ``preempt_send_user_signal`` and submitit send) that is
  death: the agent dies at once, the job step ends with it, and SLURM kills what is left of the
  step, workers included, whether or not they have finished their checkpoint.

torchrun versions that have ``--signals-to-handle`` (torch 2.13 here) export it to the workers as
``TORCHELASTIC_SIGNALS_TO_HANDLE``; older ones handle the default set and export nothing. The
workers cannot see ``--shutdown-timeout``, so the warning names it instead of checking it.
"""

from __future__ import annotations

import signal
import warnings
from typing import Iterable

from preemptible.core.environment import JobEnvironment

#: torchrun's ``--signals-to-handle`` default.
AGENT_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
#: The signal list to give torchrun so that every stop request of SLURM and submitit is passed on.
AGENT_SIGNALS_FIX = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def agent_signals(env: JobEnvironment) -> frozenset[signal.Signals]:
    """The signals the elastic agent of this rank handles (and passes on to its workers)."""
    names = env.torchelastic_signals if env.torchelastic_signals is not None else AGENT_DEFAULT_SIGNALS
    handled: set[signal.Signals] = set()
    for name in names.split(","):
        try:
            handled.add(signal.Signals[name.strip().upper()])
        except KeyError:
            continue  # torchrun itself ignores (and logs) a name it cannot register
    return frozenset(handled)


def signals_the_agent_drops(env: JobEnvironment, signals: Iterable[signal.Signals]) -> list[signal.Signals]:
    """The stop signals this run listens to that torchrun's agent would die of instead of passing on."""
    if not env.under_elastic_agent:
        return []
    handled = agent_signals(env)
    return [s for s in signals if s not in handled]


def elastic_agent_warning(env: JobEnvironment, signals: Iterable[signal.Signals]) -> str | None:
    """The start-up warning for a rank under torchrun whose agent does not handle every stop signal, else ``None``."""
    dropped = signals_the_agent_drops(env, signals)
    if not dropped:
        return None
    names = ", ".join(s.name for s in dropped)
    return (f"preemptible: this rank was started by torchrun, whose elastic agent does not handle {names} "
            f"(it handles {','.join(sorted(s.name for s in agent_signals(env)))}): such a stop request kills the agent "
            f"and, under srun, the whole job step with it, before the ranks have saved. Fix: "
            f"torchrun --signals-to-handle={AGENT_SIGNALS_FIX} --shutdown-timeout=<more seconds than a checkpoint "
            f"takes> (the agent SIGKILLs its workers that long after passing a signal on; default 30), or start the "
            f"ranks with plain srun, one task per device (preemptible sbatch --template ddp). If {names} can never "
            f"come, leave {'it' if len(dropped) == 1 else 'them'} out of the callback's signals.")


def warn_if_agent_drops_signals(env: JobEnvironment, signals: Iterable[signal.Signals]) -> None:
    message = elastic_agent_warning(env, signals)
    if message is not None:
        warnings.warn(message, stacklevel=3)
