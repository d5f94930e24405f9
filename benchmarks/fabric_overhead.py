"""1b. Per-step cost of ``preemptible.fabric.FabricLoop`` against the same Lightning Fabric loop without it.

Both arms run in one process, side by side (interleaved repetitions, A B, B A, ...), on the same
``Fabric``, model and optimizer: a tiny model, where any per-step cost shows most. The *FabricLoop*
arm is the README's loop: the registered state, ``loop.dataloader`` (exact data position) and
``loop.after_step()`` after every optimizer step; the *plain* arm is the same loop without them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from common import interleaved_order, median, paired_ratios, pct, read_spec, secs, spread, write_result

ARMS = ("plain", "fabric_loop")


def add_rows(table: Any, section_data: dict[str, Any], ws: int, res: dict[str, Any]) -> dict[str, Any]:
    """One row of the overhead section's Fabric table, from a worker's result."""
    plain, ours = res["per_step"]["plain"], res["per_step"]["fabric_loop"]
    ratios = paired_ratios(plain, ours)
    d = {"plain": median(plain), "fabric_loop": median(ours), "overhead": median(ratios) - 1,
         "range": [spread(ratios)[0] - 1, spread(ratios)[1] - 1], "reps": len(plain)}
    table.add(ws, secs(d["plain"]), secs(d["fabric_loop"]),
              f"{pct(d['overhead'])} [{pct(d['range'][0])}, {pct(d['range'][1])}]",
              secs(d["fabric_loop"] - d["plain"]))
    section_data[f"fabric_ws{ws}"] = d
    return d


def _timed_pass(arm: str, fabric: Any, model: Any, optimizer: Any, data: Any, steps: int, warmup: int,
                run_dir: Path) -> float:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from preemptible.fabric import FabricLoop

    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=16, shuffle=True))
    durations: list[float] = []

    def one_step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()

    total = steps + warmup
    if arm == "plain":
        done, last = 0, time.perf_counter()
        while done < total:
            for x, y in loader:
                one_step(x, y)
                done += 1
                now = time.perf_counter()
                durations.append(now - last)
                last = now
                if done == total:
                    break
    else:
        state = {"model": model, "optimizer": optimizer}
        with FabricLoop(fabric, state, run_dir=run_dir, requeue="none", deadline=False, save_on_finish=False) as loop:
            wrapped = loop.dataloader(loader)
            last = time.perf_counter()
            while loop.step < total:
                for x, y in wrapped:
                    one_step(x, y)
                    loop.after_step()
                    now = time.perf_counter()
                    durations.append(now - last)
                    last = now
                    if loop.step == total:
                        break
    return median(durations[warmup:])


def worker(spec: dict[str, Any]) -> None:
    import torch
    from lightning.fabric import Fabric

    from preemptible.examples.loop_data import NoisyBlobs

    torch.set_num_threads(1)
    ws = int(spec["devices"])
    fabric = Fabric(accelerator="cpu", devices=ws, strategy="ddp" if ws > 1 else "auto")
    fabric.launch()
    fabric.seed_everything(1234)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    data = NoisyBlobs(samples=1024)
    per_step: dict[str, list[float]] = {arm: [] for arm in ARMS}
    root = Path(spec["run_root"])
    for rep in range(int(spec["reps"])):
        for arm in interleaved_order(ARMS, rep):
            per_step[arm].append(_timed_pass(arm, fabric, model, optimizer, data, int(spec["steps"]),
                                             int(spec["warmup"]), root / f"rep{rep}"))
    if fabric.global_rank == 0:
        write_result(spec, {"per_step": per_step})


if __name__ == "__main__":
    worker(read_spec(sys.argv))
