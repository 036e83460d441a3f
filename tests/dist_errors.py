"""torchrun script: which ranks print a UserError through `logs.exit_status` (the runner of every entry script).

`python -m torch.distributed.run --nproc_per_node 2 tests/dist_errors.py MODE`, MODE one of
  all    every rank raises the same error (not marked shared): it is printed once;
  rank1  only rank 1 raises (rank 0 finishes normally): rank 1 prints it.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_llm.errors import UserError  # noqa: E402
from mindspeed_llm.logs import exit_status  # noqa: E402


def main(mode: str) -> None:
    rank = int(os.environ["RANK"])
    if mode == "all":
        raise UserError("--data-path /nonexistent/prefix: no dataset files")
    if mode == "rank1" and rank == 1:
        raise UserError("rank 1: its own shard is missing")
    time.sleep(2)                     # rank 0 outlives rank 1's report


if __name__ == "__main__":
    sys.exit(exit_status(lambda: main(sys.argv[1])))
