"""Fault injection against real processes: the harness behind ``make faults`` and ``tests/test_faults.py``.

Every trial injects a real fault (SIGKILL mid-write, damaged files, full disks, signals at awkward
moments) into a real process, then plays "the next start" and checks, independently of the store's
own bookkeeping, that the run resumes from the newest *complete* checkpoint, that no partial or
damaged file is handed out, that no committed checkpoint is lost and that nothing hangs.

* :mod:`~preemptible.tools.faults.harness`: starting and driving one attempt (:func:`run_attempt`,
  :class:`Control`), the outcome counts (:class:`Tally`);
* :mod:`~preemptible.tools.faults.children`: the child processes (``python -m preemptible.tools.faults.children``);
* :mod:`~preemptible.tools.faults.oracle`: deterministic payloads and the independent checks;
* :mod:`~preemptible.tools.faults.scripts`: the faults (scripts against a live attempt, file damage, full disks);
* :mod:`~preemptible.tools.faults.trials`: trial runners that repeat a fault and count the outcomes.

The campaigns (how many trials of what), the report (``benchmarks/FAULTS.md``) and the CLI are
``benchmarks/faults.py``. The children module is not imported here, so that ``python -m`` runs it
as a fresh ``__main__``.
"""

from __future__ import annotations

from preemptible.tools.faults.harness import (
    WAIT,
    AttemptResult,
    Control,
    MiB,
    Tally,
    child_command,
    describe_exit,
    final_error,
    last_line,
    run_attempt,
    train_command,
)
from preemptible.tools.faults.oracle import (
    Inventory,
    commit_payload,
    compare_to_reference,
    expected_sha,
    inventory,
    load_losses,
    merged_losses,
    payload_chunks,
    recorded_checksum_holds,
    sha256_of,
)
from preemptible.tools.faults.scripts import (
    DATA_DAMAGE,
    RECORD_DAMAGE,
    FaultScript,
    classify_kill,
    damage,
    fault_early_second,
    fault_kill_after_signal,
    fault_kill_during_training,
    fault_kill_when,
    fault_plain_preemption,
    fault_storm,
    fault_term_during_save,
    fill_until_free,
    fsize_limit,
    tmpfs,
)
from preemptible.tools.faults.trials import (
    damage_trials,
    lightning_chain,
    rlimit_store_trials,
    store_kill_trials,
    tmpfs_store_trials,
)

__all__ = [
    "MiB", "WAIT", "AttemptResult", "Control", "Tally", "child_command", "describe_exit", "final_error", "last_line",
    "run_attempt", "train_command",
    "Inventory", "commit_payload", "compare_to_reference", "expected_sha", "inventory", "load_losses", "merged_losses",
    "payload_chunks", "recorded_checksum_holds", "sha256_of",
    "DATA_DAMAGE", "RECORD_DAMAGE", "FaultScript", "classify_kill", "damage", "fault_early_second",
    "fault_kill_after_signal", "fault_kill_during_training", "fault_kill_when", "fault_plain_preemption", "fault_storm",
    "fault_term_during_save", "fill_until_free", "fsize_limit", "tmpfs",
    "damage_trials", "lightning_chain", "rlimit_store_trials", "store_kill_trials", "tmpfs_store_trials",
]
