"""Loading a checkpoint memory-mapped, so that resume cost does not grow with the ranks of a node.

Why: a plain ``torch.load`` reads the whole file into fresh memory on every rank (one ``read`` of
every byte, a page fault for every 4 KiB page of the new memory), then ``load_state_dict`` copies it
once more into the model. With 1 GB of state and two ranks on this machine's two cores that was
1.4-2.2 s per rank against 0.46 s for one rank alone (``benchmarks/RESULTS.md``, growth). Mapped
(``torch.load(..., mmap=True)``), the file's pages come from the page cache, which all ranks of a
node share: the file is read from the (shared) filesystem once per node, and each rank copies the
tensors straight from the cache into its model, one copy instead of two.

What stays mapped: ``load_state_dict`` of a module copies into the module's own tensors, but
``Optimizer.load_state_dict`` keeps the loaded tensors when their device and dtype already fit, so an
optimizer's state would still be backed by the file. The mapping is private (copy-on-write: the file
is never changed), yet pages never written are read from the file later, and a checkpoint may be
deleted (``keep`` rotation, by rank 0 on another node) while they are: on a filesystem without
cross-client delete-on-last-close (NFS) that read fails. So :func:`copy_out_of` gives such tensors
their own memory once the restore is done, and the Lightning adapter copies out, before the restore,
everything but the weights and the optimizer states (Lightning's ``ModelCheckpoint`` and ``EarlyStopping``
keep their score tensors as given); after it nothing of preemptible's, Lightning's or the optimizers'
refers to the file. Tensors a user's own ``on_load_checkpoint`` keeps from the dict stay mapped (the same
as any ``torch.load(mmap=True)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

#: (first byte, one past the last byte) of the memory a mapped checkpoint's tensors live in.
Span = tuple[int, int]


def load_mapped(path: Union[str, Path], weights_only: Optional[bool] = True,
                map_location: Union[str, Callable[..., Any], None] = "cpu") -> Any:
    """``torch.load`` of the file at ``path`` with its tensors memory-mapped (private: the file is never written)."""
    return torch.load(str(path), map_location=map_location, weights_only=weights_only, mmap=True)


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def span_of(checkpoint: Any) -> Optional[Span]:
    """The address range the tensors of a loaded checkpoint occupy (all slices of one mapping), or ``None``."""
    lo, hi = None, None
    for tensor in _tensors(checkpoint):
        storage = tensor.untyped_storage()
        if storage.device.type != "cpu" or storage.nbytes() == 0:
            continue
        start = storage.data_ptr()
        lo = start if lo is None else min(lo, start)
        hi = start + storage.nbytes() if hi is None else max(hi, start + storage.nbytes())
    return (lo, hi) if lo is not None and hi is not None else None


def _inside(tensor: torch.Tensor, span: Span) -> bool:
    storage = tensor.untyped_storage()
    return storage.device.type == "cpu" and storage.nbytes() > 0 and span[0] <= storage.data_ptr() < span[1]


def copy_out_of(obj: Any, span: Optional[Span]) -> Any:
    """``obj`` with every tensor that lies in ``span`` replaced by a copy in memory of its own (containers rebuilt
    only where something changed; other tensors and values are returned as they are)."""
    if span is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.clone() if _inside(obj, span) else obj
    if isinstance(obj, dict):
        changed = {k: copy_out_of(v, span) for k, v in obj.items()}
        if all(changed[k] is obj[k] for k in obj):
            return obj
        if type(obj) is dict:
            return changed
        obj.update(changed)  # a dict subclass (an optimizer's defaultdict): in place, keeping its type
        return obj
    if isinstance(obj, list):
        items = [copy_out_of(v, span) for v in obj]
        return items if any(a is not b for a, b in zip(items, obj)) else obj
    if isinstance(obj, tuple):
        items = [copy_out_of(v, span) for v in obj]
        return type(obj)(items) if any(a is not b for a, b in zip(items, obj)) and type(obj) is tuple else obj
    return obj


def copy_optimizers_out_of(optimizers: Iterable[Any], span: Optional[Span]) -> int:
    """Give every optimizer state tensor that still lies in the checkpoint's mapping its own memory; the bytes copied."""
    if span is None:
        return 0
    copied = 0
    for optimizer in optimizers:
        state = getattr(optimizer, "state", None)
        if not isinstance(state, dict):
            continue
        for param, per_param in state.items():
            if not isinstance(per_param, dict):
                continue
            for key, value in list(per_param.items()):
                if isinstance(value, torch.Tensor) and _inside(value, span):
                    per_param[key] = value.clone()
                    copied += value.untyped_storage().nbytes()
            state[param] = per_param
    return copied
