"""Making the fit loop's train loaders resumable mid-epoch, and putting RNG back at the right moment."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterable, Optional

from torch.utils.data import DataLoader, IterableDataset

from preemptible.core.data import ResumableBatches, seed_loader_workers
from preemptible.core.rng import restore_rng
from preemptible.core.signals import DEFAULT_SIGNALS
from preemptible.core.workers import shield_loader_workers
from preemptible.lightning import hooks

if TYPE_CHECKING:
    import pytorch_lightning as pl


class LoaderTracker:
    """Wraps map-style DataLoaders' batch samplers and carries their per-rank resume plan."""

    def __init__(self, enabled: bool = True, signals: Iterable[Any] = DEFAULT_SIGNALS) -> None:
        self.enabled = enabled
        self.signals = tuple(signals)  # the run's preemption signals: its loaders' workers must survive them
        self.wrappers: list[Optional[ResumableBatches]] = []
        self.stateful: list[Any] = []  # the user's own stateful loaders, by position (None elsewhere)
        self._plan: Optional[dict[str, Any]] = None
        self._stateful_pending: dict[int, Any] = {}
        self._rng_pending: Optional[dict[str, Any]] = None
        self._warned = False

    # -- at set-up --------------------------------------------------------------------------------
    def prepare(self, loaders: list[Any]) -> None:
        self.wrappers = [self._wrap(dl) if self.enabled else None for dl in loaders]
        self.shield_workers(loaders)
        self.stateful = [dl if self.enabled and _own_stateful(dl) else None for dl in loaders]
        plan, self._plan = self._plan, None
        if plan is None:
            return
        states = plan.get("loaders") or []
        rng = plan.get("rng")
        owes_validation = bool(plan.get("validation_owed"))
        in_process_resume = False
        epoch_finished = bool(states) and all(s is not None and s.get("exhausted") for s in states)
        for i, (wrapper, state) in enumerate(zip(self.wrappers, states)):
            if state is not None and "stateful" in state and self.stateful[i] is not None:
                self._stateful_pending[i] = state["stateful"]
            elif wrapper is not None and state is not None and not state.get("exhausted"):
                wrapper.load_state_dict(state)
                in_process_resume = in_process_resume or wrapper.in_process
        if rng is None:
            return
        if owes_validation:
            # The validation this state owes runs first: its stream starts from the RNG saved with it, put
            # back when training starts, before that validation's loader exists.
            self._rng_pending = rng
        elif epoch_finished:
            restore_rng(rng)  # before the next epoch's iterator draws its seeds, as in the uninterrupted run
        elif not in_process_resume:
            # Workers (or a loader of the user's own) load the data: the main process's stream resumes once
            # the loader's iterator exists and before the first batch is fetched, i.e. when training starts.
            self._rng_pending = rng

    def shield_workers(self, loaders: list[Any]) -> None:
        """Every loader with workers (exact data or not, train or validation): the workers outlive the job's signals."""
        for dl in loaders:
            shield_loader_workers(dl, self.signals)

    def after_lightning_load(self, loaders: list[Any]) -> None:
        """Lightning gives every rank rank 0's loader state; give each rank its own instead."""
        pending, self._stateful_pending = self._stateful_pending, {}
        for i, state in pending.items():
            if i < len(loaders) and loaders[i] is self.stateful[i]:
                loaders[i].load_state_dict(state)

    def _wrap(self, dl: Any) -> Optional[ResumableBatches]:
        if not isinstance(dl, DataLoader):
            self._warn_inexact(f"a {type(dl).__name__} that is not a DataLoader")
            return None
        if isinstance(dl.dataset, IterableDataset) or dl.batch_sampler is None:
            if not (hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict")):
                self._warn_inexact("an IterableDataset (or batch_size=None) without state_dict()")
            return None
        if _own_stateful(dl):
            return None  # a stateful loader of the user's own (e.g. torchdata's StatefulDataLoader)
        if isinstance(dl.batch_sampler, ResumableBatches):
            return dl.batch_sampler
        wrapper = ResumableBatches(dl.batch_sampler, in_process=dl.num_workers == 0)
        hooks.replace_batch_sampler(dl, wrapper)
        if dl.num_workers > 0:
            seed_loader_workers(dl, self.signals)
        # Lightning asks whether the loader is resumable to decide whether to warn; the real state is per
        # rank and travels in the callback's state.
        hooks.mark_loader_resumable(dl)
        return wrapper

    def _warn_inexact(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"preemptible: the training data comes from {what}; its position cannot be restored, so after a "
                "mid-epoch preemption the resumed epoch starts its data from the beginning (the batches already "
                "trained in that epoch are seen again, the last ones of the epoch are not). Give the loader a "
                "state_dict()/load_state_dict() (e.g. torchdata's StatefulDataLoader) for exact resume.",
                stacklevel=3,
            )

    def note_trained(self, batches_this_epoch: int) -> None:
        """Called at every train batch end: lets the wrappers tell a fetch-ahead from an ordinary fetch."""
        for wrapper in self.wrappers:
            if wrapper is not None:
                wrapper.trained = batches_this_epoch

    # -- saving -------------------------------------------------------------------------------------
    def state(self, trainer: Optional["pl.Trainer"], owing_validation: bool = False) -> list[Optional[dict[str, Any]]]:
        """Every train loader's position; ``owing_validation``: for a state that resumes by redoing a validation."""
        trained = _batches_trained_this_epoch(trainer) if trainer is not None else None
        out: list[Optional[dict[str, Any]]] = []
        for i, wrapper in enumerate(self.wrappers):
            if i < len(self.stateful) and self.stateful[i] is not None:
                out.append({"stateful": self.stateful[i].state_dict()})
                continue
            if wrapper is None:
                out.append(None)
                continue
            if trained is not None:
                wrapper.trained = trained
            out.append(wrapper.state_dict_owing_validation() if owing_validation else wrapper.state_dict())
        return out

    # -- resuming -----------------------------------------------------------------------------------
    def set_resume(self, rank_state: Optional[dict[str, Any]]) -> None:
        self._plan = rank_state

    def at_train_start(self) -> None:
        if self._rng_pending is not None:
            rng, self._rng_pending = self._rng_pending, None
            restore_rng(rng)


def _batches_trained_this_epoch(trainer: "pl.Trainer") -> int:
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.ready)


def _own_stateful(dl: Any) -> bool:
    """A loader class that implements ``state_dict``/``load_state_dict`` itself (not our placeholders)."""
    return callable(getattr(type(dl), "state_dict", None)) and callable(getattr(type(dl), "load_state_dict", None))
