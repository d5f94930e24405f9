"""Resume cost that does not grow with the ranks (issue 15, point 7): each rank maps the checkpoint, none reads it whole.

Real 2-process gloo DDP with a real Lightning Trainer (``tests/scripts/resume_reads.py``): a run preempts itself
and a second one resumes it. What each rank did is read from the kernel, not from our own code: the bytes
it passed through ``read()`` while Lightning loaded the checkpoint (the 8 MB file, had a rank read it,
plainly, as a ``torch.load`` of an open file does, or twice, as the fit check and Lightning's load each
opening it would), whether the file was memory-mapped then (its pages shared by the ranks of a node), and
that at the first training step nothing maps it any more (optimizer state copied out: rotating the file
away later is safe on any filesystem). The resumed weights and momentum buffers equal the file's; bitwise
resume as a whole is tests/test_exact_resume.py's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import finish_ranks

SCRIPT = Path(__file__).parent / "scripts" / "resume_reads.py"
TIMEOUT = 180.0


def _run(run_dir: Path, mode: str, reports: Path) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "NODE_RANK": "0",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), mode, str(reports)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes, outputs = finish_ranks(procs, TIMEOUT)
    for code, out in zip(codes, outputs):
        if code not in (0, 144):
            print(out[-4000:])
    return codes


def test_each_ddp_rank_maps_the_checkpoint_once_and_reads_none_of_it_whole(tmp_path: Path) -> None:
    run_dir, reports = tmp_path / "run", tmp_path / "reports"
    assert _run(run_dir, "preempt", reports) == [144, 144]
    assert _run(run_dir, "resume", reports) == [0, 0]
    for rank in range(2):
        report = json.loads((reports / f"rank{rank}.json").read_text())
        size = report["checkpoint_bytes"]
        assert size > 8 << 20
        # the file's pickle and zip directory are read (kilobytes); its tensors come through the mapping
        assert report["read_bytes"] < size // 8, (rank, report)
        assert report["mapped_while_loading"], (rank, report)
        assert not report["mapped_at_first_step"], (rank, report)
        assert report["weights_equal"] and report["momentum_equal"], (rank, report)
