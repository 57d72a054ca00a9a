"""Run under torchrun (tests/test_distributed.py): `pipeline.distributed.on_main` runs a function on rank 0 alone, gives
every rank its result, and raises its StageFailed on every rank.

    torchrun --nproc-per-node 2 tests/scripts/on_main.py OUT_DIR"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.distributed import init, on_main, world
from pipeline.errors import StageFailed


def main(out: str) -> None:
    init("cpu")
    w = world()
    calls = []

    def ok():
        calls.append(w.rank)
        return {"from": w.rank}

    def bad():
        calls.append(w.rank)
        raise StageFailed("judge command exited with 3")

    got = on_main(ok)
    try:
        on_main(bad)
        error = None
    except StageFailed as e:
        error = str(e)
    Path(out, f"rank{w.rank}.json").write_text(json.dumps({"got": got, "error": error, "calls": calls}))


if __name__ == "__main__":
    main(sys.argv[1])
