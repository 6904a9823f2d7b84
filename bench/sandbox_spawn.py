"""How long starting a code sandbox stalls the process that starts it (issue #32: tools on must stay near tools off).

    python -m bench sandbox-spawn --hold-gib 8 --out bench/results/<date>-cpu-sandbox-spawn.json

Evaluation with tools starts one `Sandbox` (a fresh interpreter process) per answer from the engine's own process,
on the tool runner's threads, while the decode loop runs on the main thread. The loop needs the GIL between GPU
steps, so whatever holds it while a sandbox starts stalls the loop. This script holds `--hold-gib` of touched memory
(a GPU process holds many GiB of host memory: the fork of a preexec_fn copies its page tables), runs a pure-Python
ticker thread (the decode loop's stand-in), and starts `--spawns` sandboxes one after another (each runs one block
and closes). It records the ticker's stalls: the longest, and the sum of those over 2 ms per sandbox. For
comparison, the same number of `python -c pass` processes started with and without a (no-op) preexec_fn: how the
sandbox was started before (its limits set in a preexec_fn) and how it is started now (the worker sets them).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_result, provenance  # noqa: E402


def stalls(start_one, spawns: int) -> dict:
    """The ticker's gaps (ms) while `start_one` runs `spawns` times."""
    gaps, stop = [], threading.Event()

    def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            sum(range(200))  # pure-Python work: it needs the GIL, as the scheduler does

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.2)
    gaps.clear()
    t0 = time.perf_counter()
    for _ in range(spawns):
        start_one()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    return {"seconds": round(seconds, 3), "longest_stall_ms": round(max(gaps) * 1e3, 2),
            "stalls_over_2ms_per_spawn_ms": round(sum(g for g in gaps if g > 0.002) * 1e3 / spawns, 2)}


def main():
    import numpy as np

    from llmhelpers.inference.sandbox import Sandbox

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold-gib", type=float, default=8.0, help="touched memory this process holds")
    parser.add_argument("--spawns", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    held = np.ones(int(args.hold_gib * 2**30) // 8)  # touched: its page tables are what a fork copies

    def sandbox():
        with Sandbox(timeout=30) as box:
            assert box.run("1 + 1").output == "2"

    def process(preexec):
        subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True,
                         preexec_fn=(lambda: None) if preexec else None).wait()

    result = {"hold_gib": args.hold_gib, "held_bytes": held.nbytes, "spawns": args.spawns,
              "sandbox": stalls(sandbox, args.spawns),
              "process_with_preexec_fn": stalls(lambda: process(True), args.spawns),
              "process_without_preexec_fn": stalls(lambda: process(False), args.spawns),
              "provenance": provenance()}
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
