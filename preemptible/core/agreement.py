"""Agreeing across ranks on the step at which everyone stops.

A signal may reach one rank, all ranks, or all ranks at different steps. If each rank acted on
its own, one would enter the checkpoint's collectives while the others entered the next
forward pass's, and the job would hang until the hard kill. Instead every rank contributes its
local flag at every optimizer-step boundary and all ranks act on the same reduced value.

The vote cast at step ``k`` is read at step ``k + 1``, never at ``k``: the reduction is started
without waiting at ``k`` (or, in *deferred* mode, run at a point every rank reaches between the two
boundaries where the ranks already meet, see :meth:`DistributedStopAgreement.reduce_pending`), so no
rank waits at a boundary for a slower one. The price is one step of latency between the signal and
the stop, which is small next to SLURM's warning lead. Every rank issues exactly one reduction per
boundary, so the collectives stay in lockstep.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class StopAgreement:
    """Single-process agreement: the local flag is the decision. Base class of the distributed one.

    ``vote`` values are small non-negative integers: 0 means "keep going", anything else "stop"
    (callers pass the signal number so that the reason travels with the decision).
    """

    #: Whether votes are reduced by :meth:`reduce_pending` between boundaries (distributed only).
    deferred: bool = False

    def step(self, vote: int) -> int:
        """Called at every step boundary on every rank; returns the agreed value (max of votes)."""
        return vote

    def now(self, vote: int) -> int:
        """Blocking agreement, for points that are not step boundaries (the start of training)."""
        return vote

    def any(self, flag: bool) -> bool:
        """Blocking: whether ``flag`` holds on any rank. The stop vote in flight is left alone."""
        return flag

    def gather(self, obj: Any) -> list[Any]:
        """Blocking: every rank's ``obj`` (picklable), in rank order. The stop vote in flight is left alone."""
        return [obj]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Blocking: rank ``src``'s ``obj`` on every rank."""
        return obj

    def reduce_pending(self) -> None:
        """Deferred mode: reduce the vote cast at the last boundary now (see the distributed class)."""

    def close(self) -> None:
        """Finish any reduction in flight (every rank calls it at the same point)."""


class DistributedStopAgreement(StopAgreement):
    """Non-blocking max-reduction of the votes over a ``torch.distributed`` group.

    Args:
        group: the process group to reduce over. ``None`` picks the default group when its
            backend is gloo, and otherwise creates a dedicated gloo group, so that the flag is a
            CPU tensor and reading it never synchronizes a CUDA stream. Creating a group is itself
            a collective: construct this object at the same point on every rank.
        every: reduce only at every ``every``-th boundary.

    Set :attr:`deferred` to have the vote reduced by :meth:`reduce_pending`, called by every rank at
    one point between two boundaries (the Lightning layer uses the slot of Lightning's own per-batch
    SIGTERM broadcast, which it replaces): one blocking collective per step in place of one that
    the trainer already makes, instead of one more running alongside training. With all cores busy
    (CPU training), an asynchronous collective has to wait for a core anyway, and then costs more.
    """

    def __init__(self, group: Optional[Any] = None, every: int = 1) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedStopAgreement needs an initialized torch.distributed process group")
        if group is None and dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo")
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self._dist = dist
        self._group = group
        # Reduce only at every `every`-th boundary: issuing a gloo all-reduce costs ~0.1 ms, which
        # matters for millisecond steps. Every rank counts boundaries the same way, so they stay in step.
        self.every = every
        self._boundaries = 0
        self._pending: Optional[Any] = None
        self._pending_tensor: Optional[torch.Tensor] = None
        self.deferred = False
        self._deferred_vote: Optional[int] = None  # cast at the last boundary, not reduced yet
        self._deferred_decided = 0  # reduced, not read yet

    def reduce_pending(self) -> None:
        if self._deferred_vote is None:
            return
        tensor = torch.tensor([self._deferred_vote], dtype=torch.int64)
        self._deferred_vote = None
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self._group)
        self._deferred_decided = max(self._deferred_decided, int(tensor.item()))

    def _collect(self) -> int:
        if self.deferred:
            # A vote still only cast (the reduction point was skipped, as when a loop ends, or this is
            # not a boundary): reduce it now, on every rank alike, so none is lost.
            self.reduce_pending()
            decided, self._deferred_decided = self._deferred_decided, 0
            return decided
        if self._pending is None:
            return 0
        self._pending.wait()
        assert self._pending_tensor is not None
        value = int(self._pending_tensor.item())
        self._pending, self._pending_tensor = None, None
        return value

    def step(self, vote: int) -> int:
        self._boundaries += 1
        if self._boundaries % self.every:
            return 0
        decided = self._collect()
        if self.deferred:
            self._deferred_vote = vote
            return decided
        tensor = torch.tensor([vote], dtype=torch.int64)
        self._pending = self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending_tensor = tensor
        return decided

    def now(self, vote: int) -> int:
        if self.deferred:  # fold the vote not reduced yet into this reduction (the max is the same)
            earlier = max(self._deferred_vote or 0, self._deferred_decided)
            self._deferred_vote, self._deferred_decided = None, 0
        else:
            earlier = self._collect()
        tensor = torch.tensor([max(vote, earlier)], dtype=torch.int64)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self._group)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        # Issued after the vote in flight on every rank, so the group sees the same order everywhere.
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self._group)
        return bool(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        # Issued after the vote in flight on every rank, over the same CPU group, so the order matches everywhere.
        out: list[Any] = [None] * self._dist.get_world_size(group=self._group)
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src, group=self._group)
        return box[0]

    def close(self) -> None:
        if self.deferred:
            # Training is over: a vote not reduced yet decides nothing any more, and issuing a collective
            # here could wait forever for a rank that left by another path.
            self._deferred_vote, self._deferred_decided = None, 0
            return
        self._collect()


def make_agreement(world_size: int, every: int = 1) -> StopAgreement:
    """The agreement for this process: distributed when several ranks are running."""
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        return DistributedStopAgreement(every=every)
    if world_size > 1:
        raise RuntimeError(f"preemptible: world_size={world_size} but torch.distributed has no process group: "
                           "call torch.distributed.init_process_group() on every rank before the session opens")
    return StopAgreement()
