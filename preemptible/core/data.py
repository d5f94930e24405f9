"""Exact data position across a preemption, for an ordinary map-style ``DataLoader``.

A plain ``DataLoader(shuffle=True)`` has no memory: a restarted process draws a new shuffle and
starts the epoch from its first batch. :class:`ResumableBatches` wraps the loader's batch sampler
and remembers, per epoch, what is needed to replay the same sequence:

* the RNG state at the start of the epoch (a ``RandomSampler`` without its own generator draws
  its permutation seed from the global torch RNG on its first pull), so the same permutation is
  drawn again;
* how many batches were trained, so that many index lists are skipped without loading data;
* for in-process loading (``num_workers=0``), the RNG state just before each batch that was
  fetched ahead of training (``__getitem__`` augmentation draws from the global RNG), plus the
  state at the checkpoint, to be put back at the exact point the uninterrupted run reached it;
* for worker processes, a seed per batch derived from (epoch seed, batch position), applied in
  the worker just before the batch is loaded, so augmentation in workers does not depend on
  which worker loads a batch or on how many batches that worker loaded before.

The workers' own survival of the job's signals is :mod:`preemptible.core.workers`.

Nothing here imports Lightning; :mod:`preemptible.lightning` decides when to wrap and save.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections import deque
from typing import Any, Iterable, Iterator

import torch

from preemptible.core.rng import capture_rng, restore_rng
from preemptible.core.signals import DEFAULT_SIGNALS
from preemptible.core.workers import ShieldedWorkerInit

# Batches fetched ahead of training whose pre-fetch RNG we remember (Lightning prefetches one;
# a user's own prefetching fetcher may take a few more).
_MAX_AHEAD = 16


class TaggedBatch(list):  # type: ignore[type-arg]
    """A list of indices that carries the seed its worker should load it with."""

    seed: int = 0

    def __reduce__(self) -> Any:
        return (_tagged, (list(self), self.seed))


def _tagged(items: list[Any], seed: int) -> TaggedBatch:
    batch = TaggedBatch(items)
    batch.seed = seed
    return batch


def batch_seed(epoch_seed: int, position: int) -> int:
    """A 63-bit seed for the batch at ``position`` of the epoch whose seed is ``epoch_seed``."""
    digest = hashlib.blake2b(f"{epoch_seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_this_process(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (2**32))


class _SeedingGetItems:
    """Installed as ``dataset.__getitems__`` in each worker: seed, then load the batch as before."""

    def __init__(self, dataset: Any, original: Any) -> None:
        self.dataset = dataset
        self.original = original

    def __call__(self, indices: Any) -> Any:
        if isinstance(indices, TaggedBatch):
            seed_this_process(indices.seed)
            indices = list(indices)
        if self.original is not None:
            return self.original(indices)
        return [self.dataset[i] for i in indices]


class SeedingWorkerInit(ShieldedWorkerInit):
    """``worker_init_fn`` wrapper: the job's signals shielded (:mod:`preemptible.core.workers`), the per-batch
    seeding hook installed, then the user's function."""

    def extra_setup(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            dataset: Any = info.dataset
            original = getattr(dataset, "__getitems__", None)
            try:
                dataset.__getitems__ = _SeedingGetItems(dataset, original)
            except AttributeError:  # a dataset that forbids new attributes: no per-batch seeding
                pass


def seed_loader_workers(loader: Any, signals: Iterable[Any] = DEFAULT_SIGNALS) -> None:
    """Give ``loader`` (with workers) a :class:`SeedingWorkerInit` around its own ``worker_init_fn``, once."""
    current = loader.worker_init_fn
    if isinstance(current, SeedingWorkerInit):
        return
    if isinstance(current, ShieldedWorkerInit):  # shielded before: keep its signals, add the seeding
        loader.worker_init_fn = SeedingWorkerInit(current.user_fn, (*current.signals, *signals))
    else:
        loader.worker_init_fn = SeedingWorkerInit(current, signals)


class ResumableBatches:
    """A batch sampler wrapper with a ``state_dict`` that lets the next process continue the epoch.

    Args:
        inner: the loader's batch sampler (anything that yields lists of indices).
        in_process: ``True`` when batches are loaded in this process (``num_workers=0``).
    """

    def __init__(self, inner: Iterable[Any], in_process: bool) -> None:
        self.inner = inner
        self.in_process = in_process
        self.epoch_rng: dict[str, Any] | None = None
        self.epoch_seed = 0
        self.yielded = 0
        self.exhausted = False
        self.sampler_epoch: int | None = None
        self.trained = 0  # kept current by the trainer integration at every batch end
        self._ahead: deque[tuple[int, dict[str, Any]]] = deque(maxlen=_MAX_AHEAD)
        self._plan: dict[str, Any] | None = None

    # Attributes a DataLoader or Lightning may read from a batch sampler.
    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        plan, self._plan = self._plan, None
        sampler = getattr(self.inner, "sampler", None)
        # A state saved at a validation's start, when the validation is redone before training goes on: the
        # stream as it is now (after the redone validation) is the one the next batch must see.
        continue_at = plan.get("continue_stream_at") if plan is not None else None
        stream_now = capture_rng() if continue_at is not None else None
        if plan is not None:
            restore_rng(plan["epoch_rng"])
            # A DistributedSampler's order depends on its epoch. Loaders with workers pull indices as
            # soon as their iterator exists, which on resume is before Lightning calls set_epoch().
            set_epoch = getattr(sampler, "set_epoch", None)
            if plan.get("sampler_epoch") is not None and callable(set_epoch):
                set_epoch(plan["sampler_epoch"])
        self.sampler_epoch = getattr(sampler, "epoch", None)
        self.epoch_rng = capture_rng()
        self.epoch_seed = _seed_from_state(self.epoch_rng["torch"])
        self.yielded, self.exhausted = 0, False
        self.trained = 0
        self._ahead.clear()
        skip = plan["skip"] if plan else 0
        inject: dict[int, dict[str, Any]] = dict(plan["inject"]) if plan else {}
        if stream_now is not None and continue_at is not None:
            inject[int(continue_at)] = stream_now
        source = iter(self.inner)
        for _ in range(skip):
            if next(source, None) is None:
                break
            self.yielded += 1
        self.trained = self.yielded
        for batch in source:
            position = self.yielded
            if position in inject:
                restore_rng(inject.pop(position))
            if self.in_process and position > self.trained:
                # Fetched while an earlier batch is still untrained (a fetcher that looks ahead): a
                # checkpoint taken before this batch trains must give it back this exact RNG state.
                # Lightning's fetcher for sized loaders does not look ahead, so this is rare and the
                # usual per-batch cost is one comparison.
                self._ahead.append((position, capture_rng()))
            elif not self.in_process:
                # Only worker processes read the tag (in-process loading keeps the RNG stream itself).
                batch = _tagged(list(batch), batch_seed(self.epoch_seed, position))
            self.yielded += 1
            yield batch
        if self.yielded in inject:
            restore_rng(inject.pop(self.yielded))
        self.exhausted = True

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State after ``self.trained`` batches of the current epoch were trained (RNG captured now)."""
        inject: dict[int, dict[str, Any]] = {}
        if self.in_process:
            # Batches fetched ahead of training get their pre-fetch RNG back; the next fetch (or the end
            # of the epoch) gets the RNG as it is now, after the last trained step.
            inject = {pos: rng for pos, rng in self._ahead if self.trained <= pos < self.yielded}
            inject[max(self.yielded, self.trained)] = capture_rng()
        return {
            "format": 1,
            "epoch_rng": self.epoch_rng,
            "skip": self.trained,
            "inject": inject,
            "exhausted": self.exhausted and self.trained >= self.yielded,
            "sampler_epoch": self.sampler_epoch,
        }

    def state_dict_owing_validation(self) -> dict[str, Any]:
        """As :meth:`state_dict`, for a state that a resumed run continues after redoing a validation first.

        The RNG at the next fetch is then the one the redone validation leaves (``continue_stream_at``),
        not the one now; an epoch whose batches were all trained counts as finished.
        """
        state = self.state_dict()
        if self.in_process:
            position = max(self.yielded, self.trained)
            state["inject"].pop(position, None)
            state["continue_stream_at"] = position
        try:
            state["exhausted"] = state["exhausted"] or self.trained >= len(self)
        except TypeError:  # a batch sampler without a length
            pass
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != 1 or state.get("epoch_rng") is None:
            return
        self._plan = {"epoch_rng": state["epoch_rng"], "skip": int(state["skip"]), "sampler_epoch": state.get("sampler_epoch"),
                      "inject": {int(k): v for k, v in state["inject"].items()},
                      "continue_stream_at": state.get("continue_stream_at")}


def _seed_from_state(state: torch.Tensor) -> int:
    return int.from_bytes(hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest(), "little") >> 1
