"""The code sandbox where evaluation runs: its containment on this machine's kernel, and what a sandbox's life costs.

    python bench/sandbox_check.py --out result.json            # the checks, then 256 lifecycles on 16 threads
    python bench/sandbox_check.py --lifecycle-only --out x.json  # only the cost (also runs against an older checkout)

Checks (each as tests/test_sandbox.py has it, here on whatever machine evaluates: a GPU machine's container may allow
other syscalls than the CPU machine's): the seccomp filter is in place; clone(CLONE_PARENT), setsid and signals to
the keeper are refused; a timeout leaves no process of the code running; a SIGCONT/fork chain cannot hold a timeout;
an 8 MB forged reply is refused at once; code that lifts its own CPU limit is stopped. The lifecycle is what the
evaluation does per answer (`ToolRunner`): start a sandbox, run a block, close it, on `--workers` threads at once.
Exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmhelpers.inference.sandbox import Sandbox  # noqa: E402


def live_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split() if entry.isdigit() else None
        except OSError:
            continue
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def checks() -> dict[str, dict]:
    results = {}

    def record(name, ok, **detail):
        results[name] = {"ok": bool(ok), **detail}
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)

    clone = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
    with Sandbox(timeout=5, cpu_seconds=5) as box:
        record("seccomp filter in place", box.confined)
        if clone:
            out = box.run(f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                          f"pid = libc.syscall({clone}, 0x8000 | 17, 0, 0, 0, 0)\n"
                          "import os\nif pid == 0: os._exit(0)\n(pid, ctypes.get_errno())").output
            record("clone(CLONE_PARENT) refused", out == "(-1, 1)", output=out)
        out = box.run("import os\nos.setsid()").output
        record("setsid refused", out.startswith("PermissionError"), output=out)
        out = box.run("import os\nos.kill(os.getppid(), 9)").output
        record("signal to the keeper refused", out.startswith("PermissionError"), output=out)
    with Sandbox(timeout=2, cpu_seconds=2) as box:
        group = box.interpreter_pid
        started = time.monotonic()
        r = box.run("import subprocess, time\nsubprocess.Popen(['sleep', '600'])\nwhile True: time.sleep(0.1)")
        took = time.monotonic() - started
        time.sleep(0.3)
        record("timeout kills every process of the code", r.timed_out and not live_in_group(group),
               seconds=round(took, 2))
        box.run("1")  # a fresh interpreter after the timeout
        group = box.interpreter_pid
        chain = ("import os, signal, time\nme = os.getpid()\n"
                 "def chain():\n    while True:\n        if os.fork() == 0:\n"
                 "            try: os.kill(me, signal.SIGCONT)\n            except OSError: pass\n"
                 "            continue\n        os._exit(0)\n"
                 "if os.fork() == 0: chain()\nwhile True: time.sleep(0.01)")
        started = time.monotonic()
        r = box.run(chain)
        took = time.monotonic() - started
        time.sleep(0.5)
        record("a SIGCONT/fork chain cannot hold a timeout", r.timed_out and took < 7 and not live_in_group(group),
               seconds=round(took, 2))
    with Sandbox(timeout=5, cpu_seconds=5, max_output_chars=2000) as box:
        forge = ("import sys\nworker = sys._getframe(1).f_locals\nworker['send']({'tag': worker['request']['tag'], "
                 "'output': 'x' * 8_000_000, 'ok': True, 'timed_out': False, 'truncated': False})")
        started = time.monotonic()
        r = box.run(forge)
        took = time.monotonic() - started
        record("an 8 MB forged reply is refused at once", "garbled" in r.output and took < 3, seconds=round(took, 2))
    with Sandbox(timeout=30, cpu_seconds=1) as box:
        started = time.monotonic()
        r = box.run("import resource, signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                    "resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
                    "while True: pass")
        took = time.monotonic() - started
        record("a lifted CPU limit is enforced by the parent", r.output.startswith("CPUTimeLimit") and took < 10,
               seconds=round(took, 2))
    return results


def lifecycles(n: int, workers: int) -> dict:
    """n answers' sandboxes, `workers` at a time: start, one block, close (what ToolRunner does per answer)."""

    def one(i):
        started = time.perf_counter()
        box = Sandbox(timeout=10, cpu_seconds=12, max_output_chars=2000)
        try:
            output = box.run(f"x = {i} * 7\nprint(x)").output
        finally:
            box.close()
        return time.perf_counter() - started, output == str(i * 7)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    seconds = sorted(s for s, _ in done)
    return {"sandboxes": n, "workers": workers, "wall_seconds": round(wall, 2),
            "sandboxes_per_second": round(n / wall, 1), "p50_ms": round(1000 * statistics.median(seconds), 1),
            "p95_ms": round(1000 * seconds[int(0.95 * (n - 1))], 1), "all_correct": all(ok for _, ok in done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lifecycles", type=int, default=256)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--lifecycle-only", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"machine": platform.machine(), "cpus": os.cpu_count(), "euid": os.geteuid()}
    if not args.lifecycle_only:
        result["checks"] = checks()
    result["lifecycle"] = lifecycles(args.lifecycles, args.workers)
    print(result["lifecycle"], flush=True)
    passed = all(c["ok"] for c in result.get("checks", {}).values()) and result["lifecycle"]["all_correct"]
    if args.lifecycle_only:  # may run against an older checkout, which has no finish_check
        import json

        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return
    from common import finish_check

    finish_check(result, args.out, passed, "every containment check holds and every sandbox's output is right")


if __name__ == "__main__":
    main()
