"""The fastest attention launch of a `bench/profile_engine.py` record, as the JSON `--attention-launch` takes.

    python bench/best_attention_launch.py profile-fp8.json     # e.g. {"block_n": 128, "num_warps": 4}

Launches are named n<block_n>_w<warps>_s<stages|default>. Exits 1 when the record has no timed launch.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def best_launch(record: dict) -> dict | None:
    timed = {name: row["ms"] for name, row in record.get("attention_tuning", {}).items() if "ms" in row}
    if not timed:
        return None
    name = min(timed, key=timed.get)
    block_n, warps, stages = re.fullmatch(r"n(\d+)_w(\d+)_s(\w+)", name).groups()
    launch = {"block_n": int(block_n), "num_warps": int(warps)}
    if stages != "default":
        launch["num_stages"] = int(stages)
    return launch


if __name__ == "__main__":
    found = best_launch(json.loads(Path(sys.argv[1]).read_text()))
    if found is None:
        sys.exit(1)
    print(json.dumps(found))
