"""Exact data position for a hand-written loop: :class:`ResumableLoader` around a map-style ``DataLoader``.

The mechanics are those of the Trainer path (:mod:`preemptible.core.data`): the loader's batch sampler
is wrapped in a :class:`~preemptible.core.data.ResumableBatches`, which remembers the RNG at the start
of the epoch, how many batches were trained, and the RNG each batch was loaded with, so a resumed
process draws the same shuffle, skips the trained batches without loading them, and loads the next
one with the same randomness. What the Trainer's progress counters say there, this wrapper counts
itself: the batches it handed to the loop in the current epoch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset

from preemptible.core.data import ResumableBatches, seed_loader_workers
from preemptible.core.rng import restore_rng
from preemptible.core.signals import DEFAULT_SIGNALS

#: Version of one loader's entry in a rank's state.
LOADER_FORMAT = 1


class _EpochBatches(ResumableBatches):
    """A ``ResumableBatches`` that can also set the sampler's epoch right before each epoch's indices are drawn.

    Lightning Fabric sets a ``DistributedSampler``'s epoch to the number of times *its* loader wrapper was
    iterated, a count that starts again at 0 in a resumed process; ``epoch_of`` gives the count that
    survives the preemption instead (the same numbers as an uninterrupted Fabric run).
    """

    def __init__(self, inner: Any, in_process: bool, epoch_of: Optional[Callable[[], int]]) -> None:
        super().__init__(inner, in_process)
        self.epoch_of = epoch_of

    def __iter__(self) -> Iterator[Any]:
        set_epoch = getattr(getattr(self.inner, "sampler", None), "set_epoch", None)
        if self.epoch_of is not None and callable(set_epoch):
            set_epoch(self.epoch_of())
        yield from super().__iter__()


class ResumableLoader:
    """Iterate this instead of the loader it wraps: a preempted epoch continues at its next batch.

    Made by :meth:`preemptible.loop.PreemptibleLoop.dataloader`; it yields exactly what the wrapped
    loader yields (a Fabric loader still moves batches to the device). Each ``iter()`` is one epoch.

    Attributes:
        epoch: the epoch being iterated (0-based); between two passes, and after a resume, the one the
            next ``iter()`` is (a resumed epoch continues at its next batch).
        batches_this_epoch: batches handed to the loop so far in the current epoch.
    """

    def __init__(self, loader: Any, inner: DataLoader[Any], *, fabric_epochs: bool = False,
                 signals: Iterable[Any] = DEFAULT_SIGNALS) -> None:
        if isinstance(inner.dataset, IterableDataset) or inner.batch_sampler is None:
            raise ValueError("preemptible: exact data position needs a map-style DataLoader with a batch size "
                             "(not an IterableDataset, not batch_size=None); iterate such a loader directly, and "
                             "give it a state_dict()/load_state_dict() of your own registered in the loop's state")
        if isinstance(inner.batch_sampler, ResumableBatches):
            raise ValueError("preemptible: this DataLoader is already wrapped by a ResumableLoader; wrap it once")
        self.loader = loader
        self._inner = inner
        self._batches = _EpochBatches(inner.batch_sampler, in_process=inner.num_workers == 0,
                                      epoch_of=(lambda: self.epoch) if fabric_epochs else None)
        # DataLoader.__setattr__ refuses a new batch sampler after construction (checked: torch 2.13); the
        # wrapper yields the same index lists, so bypassing that guard changes nothing the loader sees.
        object.__setattr__(inner, "batch_sampler", self._batches)
        if inner.num_workers > 0:  # per-batch seeds, and workers that outlive the job's signals (core/workers.py)
            seed_loader_workers(inner, signals)
        self.epoch = 0
        self._ended = False  # the last pass ran to its end (and `epoch` already counts the next one)
        self.batches_this_epoch = 0
        self._rng_after_first_batch: Optional[dict[str, Any]] = None
        self._planned_skip = 0  # batches of the resumed epoch that were trained before the preemption

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self._ended = False
        skip, self._planned_skip = self._planned_skip, 0
        self.batches_this_epoch = self._batches.trained = skip
        for batch in self.loader:
            if self._rng_after_first_batch is not None:
                # Workers load the data: the main process's stream continues from the checkpoint once the
                # iterator exists and the batch is fetched, which is where the uninterrupted run took it.
                self._restore_pending_rng()
            self.batches_this_epoch += 1
            self._batches.trained = self.batches_this_epoch
            yield batch
        self._restore_pending_rng()  # a resumed epoch with no batch left
        # The epoch counts up when its last batch is through, so that between two passes `epoch` already
        # names the next one (what a DistributedSampler's set_epoch() wants before the next pass).
        self.epoch += 1
        self._ended = True

    @property
    def epoch_ending(self) -> bool:
        """Whether the batch just handed out is the last of the epoch."""
        return self.batches_this_epoch >= len(self._batches)

    # -- the checkpoint -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This rank's position, as of the batches handed out (every one of them trained)."""
        self._batches.trained = self.batches_this_epoch
        return {"format": LOADER_FORMAT, "epoch": self.epoch, "ended": self._ended, "batches": self._batches.state_dict()}

    def restore(self, state: Optional[dict[str, Any]], rng: Optional[dict[str, Any]]) -> None:
        """Continue from ``state`` (this rank's, from the checkpoint); ``rng`` is the main process's stream then.

        The RNG is given back at the point the uninterrupted run had it: when the next batch is loaded
        in this process, once the first batch came from the workers, or now between two epochs.
        """
        if state is None or state.get("format") != LOADER_FORMAT:
            if rng is not None:
                restore_rng(rng)
            return
        self.epoch = int(state["epoch"])
        if state.get("ended"):
            if rng is not None:
                restore_rng(rng)  # between two epochs: before the next one draws its shuffle
            return
        self._batches.load_state_dict(state["batches"])  # the next iter() continues this epoch
        self._planned_skip = int(state["batches"]["skip"])
        if not self._batches.in_process:
            self._rng_after_first_batch = rng
        # In-process loading: the batch wrapper puts the RNG back when the next batch is loaded.

    def _restore_pending_rng(self) -> None:
        if self._rng_after_first_batch is not None:
            rng, self._rng_after_first_batch = self._rng_after_first_batch, None
            restore_rng(rng)
