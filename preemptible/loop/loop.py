"""``PreemptibleLoop``: a hand-written training loop on the trainer-neutral session, as a context manager.

The loop registers what it trains in one dict (``state``: modules, optimizers, schedulers, anything
with ``state_dict``/``load_state_dict``, and plain values such as its own counters), enters the
context (which resumes the newest valid checkpoint into that dict, in place), and calls
:meth:`PreemptibleLoop.after_step` after every optimizer step. Everything else is the session's:
signals only recorded, one agreed step for all ranks, the two-phase atomic save, requeue, the
journal, periodic and background checkpoints, the deadline. :mod:`preemptible.fabric` is the same
loop for Lightning Fabric.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from preemptible.core.checkpointing import rank_state_in
from preemptible.core.config import SessionConfig
from preemptible.core.environment import JobEnvironment
from preemptible.core.mapped import copy_out_of, load_mapped, span_of
from preemptible.core.rng import capture_rng, restore_rng
from preemptible.core.schema import STATE_FORMAT, STATE_KEY
from preemptible.core.session import PreemptionSession
from preemptible.loop.data import ResumableLoader

#: Where the loop's own counters sit inside preemptible's entry of the checkpoint.
LOOP_KEY = "loop"


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class LoopSnapshot:
    """The :class:`~preemptible.core.checkpointing.Snapshot` of a registered ``state`` dict.

    The checkpoint is ``{name: obj.state_dict() or the value}`` for every entry of ``state`` (what
    ``fabric.save(path, state)`` writes), plus preemptible's entry under
    :data:`~preemptible.core.schema.STATE_KEY`: every rank's RNG and data position, and the loop's step.
    """

    streams = True

    def __init__(self, loop: "PreemptibleLoop") -> None:
        self.loop = loop

    def rank_state(self) -> dict[str, Any]:
        return {"rng": capture_rng(), "loaders": [loader.state() for loader in self.loop.loaders]}

    def packed(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "ranks": rank_states, "gathered": True,
                LOOP_KEY: {"step": self.loop.step, "epoch": self.loop.epoch}}

    def dump(self, rank_states: list[dict[str, Any]]) -> Any:
        state = {name: obj.state_dict() if _stateful(obj) else obj for name, obj in self.loop.state.items()}
        return {**state, STATE_KEY: self.packed(rank_states)}

    def write(self, checkpoint: Any, path: str) -> None:
        raise NotImplementedError("a LoopSnapshot is streamed by the store")

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for obj in self.loop.state.values()
                   if isinstance(obj, torch.nn.Module) for p in obj.parameters())


class PreemptibleLoop:
    """A hand-written (``torch.distributed``) training loop that survives preemption and resumes bitwise.

    Args:
        state: what the loop trains, by name: modules, optimizers, LR schedulers, gradient scalers
            (anything with ``state_dict``/``load_state_dict`` is restored in place) and plain values
            (ints, floats, lists, tensors: replaced in the dict on resume, so keep counters there and
            update them as ``state["seen"] += n``).
        rank, world_size: this process's place in the group; by default ``torch.distributed``'s
            when a process group is initialized, else rank 0 of 1.
        config, **settings: the :class:`~preemptible.core.config.SessionConfig` (or its fields as
            keyword arguments: ``run_dir``, ``requeue``, ``every_n_steps``, ``deadline``...).

    Every rank creates one (signals are recorded from then on), after ``init_process_group``, and enters it::

        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        with PreemptibleLoop(state, run_dir="runs/exp1") as loop:   # resumes into state (and the RNG)
            loader = loop.dataloader(loader)                         # optional: exact data position
            while loop.step < max_steps:
                for batch in loader:                                 # a resumed epoch continues where it stopped
                    train_step(batch)
                    loop.after_step()                                # may checkpoint and raise Preempted
                    if loop.step == max_steps:
                        break

    Leaving the ``with`` block normally means training is finished (final checkpoint, run marked
    finished); an exception leaves it unfinished. :class:`~preemptible.Preempted` (exit code 144) is
    a ``SystemExit``: let it end the process.
    """

    def __init__(self, state: dict[str, Any], *, rank: Optional[int] = None, world_size: Optional[int] = None,
                 config: Optional[SessionConfig] = None, env: Optional[JobEnvironment] = None, **settings: Any) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"PreemptibleLoop: state must be a dict of name -> object, got {type(state).__name__}")
        if STATE_KEY in state:
            raise ValueError(f"PreemptibleLoop: the state name {STATE_KEY!r} is preemptible's own; rename that entry")
        self.state = state
        self.session = PreemptionSession(config, env, **settings)  # records signals from here on
        self.step = 0
        self.loaders: list[ResumableLoader] = []
        self.resumed_from: Optional[str] = None
        self._rank, self._world_size = rank, world_size
        self._epoch = 0
        self._plan: Optional[dict[str, Any]] = None  # this rank's own state from the checkpoint
        self._entered = False

    # -- what an adapter may change ---------------------------------------------------------------------
    def place(self) -> tuple[int, int]:
        """(global rank, world size) of this process."""
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        rank = self._rank if self._rank is not None else (dist.get_rank() if initialized else 0)
        world = self._world_size if self._world_size is not None else (dist.get_world_size() if initialized else 1)
        return rank, world

    def load(self, path: str) -> dict[str, Any]:
        """Restore ``self.state`` in place from the checkpoint at ``path``; return what is left (preemptible's entry)."""
        # Memory-mapped: the ranks of a node share the file's pages, and a module's load_state_dict copies straight
        # from them; what would stay backed by the file (optimizer state, plain values, our own entry) is copied out.
        checkpoint = load_mapped(path)
        span = span_of(checkpoint)
        missing = sorted(name for name in self.state if name not in checkpoint)
        if missing:
            raise KeyError(f"preemptible: checkpoint {path} has no entry for {missing} of the registered state "
                           f"(it holds {sorted(k for k in checkpoint if k != STATE_KEY)}); register the same names "
                           "as the run that wrote it")
        for name, obj in list(self.state.items()):
            entry = checkpoint.pop(name)
            if _stateful(obj):
                # A module's load copies into its own tensors; anything else (an optimizer, a scheduler, a user's
                # Stateful) may keep what it is given, so it is given tensors of their own.
                obj.load_state_dict(entry if isinstance(obj, torch.nn.Module) else copy_out_of(entry, span))
            else:
                self.state[name] = copy_out_of(entry, span)
        return copy_out_of(checkpoint, span)

    def snapshot(self) -> LoopSnapshot:
        return LoopSnapshot(self)

    def before_exit(self) -> None:
        """Runs on every rank right before :class:`~preemptible.Preempted` leaves :meth:`after_step`."""

    def inner_loader(self, loader: Any) -> Any:
        """The ``torch.utils.data.DataLoader`` behind ``loader`` (itself here)."""
        return loader

    #: Whether the loop, not the user, sets a ``DistributedSampler``'s epoch (Fabric's loaders do).
    sets_sampler_epoch = False

    # -- the loop ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch of the first loader given to :meth:`dataloader` (else the last one passed to :meth:`after_step`)."""
        return self.loaders[0].epoch if self.loaders else self._epoch

    def __enter__(self) -> "PreemptibleLoop":
        if self._entered:
            raise RuntimeError("PreemptibleLoop: entered twice; make one per training run")
        self._entered = True
        self._snapshot = self.snapshot()
        session = self.session
        try:
            rank, world = self.place()
            resume = session.resume_path()
            if resume:
                self._resume(resume, rank, world)
            session.open(rank=rank, world_size=world)
            if not session.signals.installed:
                warnings.warn("preemptible: the loop is not running in the main thread, so no signal handler could "
                              "be installed; preemption signals will not be noticed", stacklevel=2)
            session.start(checkpoint=resume)
            if self._plan is not None and not self._plan.get("loaders"):
                restore_rng(self._plan["rng"])  # no loader to hand the stream to: it continues from here
            self.resumed_from = resume
            if session.training_started(self.step, self.epoch, loaded=resume):
                self._leave()
        except BaseException as exc:
            session.abandon(exc)
            raise
        return self

    def __exit__(self, kind: Any, exc: Optional[BaseException], traceback: Any) -> None:
        if exc is not None:
            self.session.abandon(exc)
            return
        self.session.training_ended(self.step, self.epoch, self._snapshot)
        self.session.finished(self.step)
        self.session.end()

    def dataloader(self, loader: Any) -> ResumableLoader:
        """Wrap a map-style train ``DataLoader`` (shuffled or not, ``DistributedSampler``, workers or not) for exact resume.

        Iterate what this returns instead of ``loader``. Call it inside the ``with`` block, once per
        loader, in the same order on every attempt.
        """
        if not self._entered:
            raise RuntimeError("PreemptibleLoop.dataloader(): call it inside the `with` block (after the resume)")
        wrapped = ResumableLoader(loader, self.inner_loader(loader), fabric_epochs=self.sets_sampler_epoch,
                                  signals=self.session.config.signals)
        index = len(self.loaders)
        self.loaders.append(wrapped)
        if self._plan is not None:
            states = self._plan.get("loaders") or []
            # The first loader hands the main RNG back at the right moment; the others only their position.
            wrapped.restore(states[index] if index < len(states) else None, self._plan["rng"] if index == 0 else None)
        return wrapped

    def after_step(self, epoch: Optional[int] = None) -> int:
        """Every rank, after each optimizer step and anything else that step does (logging, validation).

        Counts the step, votes, and when all ranks agreed to stop: writes the checkpoint and raises
        :class:`~preemptible.Preempted` on every rank. Returns the new step count. ``epoch`` is only
        needed without :meth:`dataloader` (for the journal and ``preemptible status``).
        """
        self.step += 1
        if epoch is not None:
            self._epoch = epoch
        # A stop on an epoch's last batch waits one step: the loop's own end-of-epoch code then runs
        # before the checkpoint, as it did in the uninterrupted run.
        ending = bool(self.loaders) and self.loaders[0].epoch_ending
        self.session.boundary(self.step, self.epoch, self._snapshot, epoch_ends=ending)
        if self.session.stopping:
            self._leave()
        return self.step

    # -- internals ---------------------------------------------------------------------------------------
    def _resume(self, path: str, rank: int, world: int) -> None:
        remainder = self.load(path)
        ours = remainder.get(STATE_KEY) or {}
        ranks = ours.get("ranks") or []
        if len(ranks) != world and not self.session.config.allow_world_size_change:
            raise ValueError(f"preemptible: checkpoint {path} was written by a run of {len(ranks)} rank(s); this run "
                             f"has {world}. Resume with {len(ranks)} rank(s), or pass allow_world_size_change=True "
                             "to resume anyway (inexactly)")
        counters = ours.get(LOOP_KEY) or {}
        self.step, self._epoch = int(counters.get("step", 0)), int(counters.get("epoch", 0))
        self._plan = rank_state_in(remainder, rank)

    def _leave(self) -> None:
        self.session.leave(before_exit=self.before_exit)


def checkpoint_step(path: str | Path) -> int:
    """The loop step a checkpoint written by a :class:`PreemptibleLoop` was taken at."""
    checkpoint = load_mapped(path)  # the counters only: no tensor's data is read
    return int(((checkpoint.get(STATE_KEY) or {}).get(LOOP_KEY) or {}).get("step", 0))
