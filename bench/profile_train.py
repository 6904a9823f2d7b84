"""Where a training step of the project's default recipe spends its time (issue #13: profile first, then attack the
top of the table; issue #22: where the CPU time of a step goes): torch.profiler over a few optimizer steps after
warm-up, then Python's cProfile over as many more.

    python bench/profile_train.py --out bench/results/<date>-<gpu>-train-profile.txt [--json SUMMARY.json]
    python bench/profile_train.py --dry-run          # tiny model, smoke settings, on the CPU

Same model, rows and trainer as bench/train_throughput.py (R1-1.5B architecture, random weights, NF4 + LoRA).
The profiled steps are split into phases (profiler ranges opened and closed by callbacks): `phase: forward+backward`
(on_step_begin to on_pre_optimizer_step, gradient clipping included), `phase: optimizer` (the optimizer step),
`phase: scheduler+zero_grad`, `phase: between steps` (logging, the next batch, collation). A phase whose CPU time is
well above its GPU time is where the CPU holds the GPU back.

With --syncs, a last window of as many steps runs under torch.cuda.set_sync_debug_mode("warn"): every operation
that makes the CPU wait for the GPU (.item(), a tensor's truth value, nonzero, a blocking copy) is counted with the
line of Python that asked for it. A wait at the end of a step drains the GPU's queue, and the GPU then idles while
the CPU prepares the next step (issue #31: a step's kernels took ~295 ms of a 365 ms step). --max-syncs N makes the
run exit non-zero when a step has more.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_name, random_r1_model, synthetic_rows  # noqa: E402
from train_throughput import bench_trainer  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


class Phases:
    """Profiler ranges from callback to callback (a range cannot wrap code the Trainer runs itself)."""

    def __init__(self):
        self.open = None

    def switch(self, name: str | None) -> None:
        from torch.autograd.profiler import record_function

        if self.open is not None:
            self.open.__exit__(None, None, None)
        self.open = record_function(f"phase: {name}") if name else None
        if self.open is not None:
            self.open.__enter__()


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from llmhelpers.config.profiles import make_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the project or a library config by its own name, e.g. --set "
                             "activation_checkpointing=False (values read as Python)")
    parser.add_argument("--no-cprofile", action="store_true", help="skip the cProfile window")
    parser.add_argument("--syncs", action="store_true", help="one more window: count the CPU's waits on the GPU")
    parser.add_argument("--max-syncs", type=float, default=None, help="exit 1 when a step waits more often (--syncs)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="write the per-step summary here")
    args = parser.parse_args()
    import ast

    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.dry_run:
        from llmhelpers.model.tiny import build_tiny_r1

        model_dir, profile_name, vocab = build_tiny_r1(Path("/tmp/bench-profile/tiny-r1")), "smoke", 1020
    else:
        model_dir, profile_name, vocab = random_r1_model(), "full", 151000
    windows = 1 if args.no_cprofile else 2
    total = args.warmup + (windows + args.syncs) * args.steps
    cfg = make_config(profile_name, model_id=str(model_dir), output_dir="/tmp/bench-profile/run", report_to="none",
                      max_steps=total, save_steps=10_000, eval_steps=10_000, warmup_steps=0, **overrides)
    trainer = bench_trainer(cfg, synthetic_rows(64 * (total + 2), vocab=vocab))
    from llmhelpers.training.run import TrainingRun

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    python_profile = cProfile.Profile()
    window, phases = {}, Phases()
    first, second = args.warmup, args.warmup + args.steps
    third = second + (windows - 1) * args.steps  # the syncs window starts here
    waits = SyncSites()

    class Window(TrainerCallback):
        def in_profile(self, state):
            return first <= state.global_step < second

        def on_step_begin(self, a, state, control, **kw):
            if self.in_profile(state):
                phases.switch("forward+backward")

        def on_pre_optimizer_step(self, a, state, control, **kw):
            if self.in_profile(state):
                phases.switch("optimizer")

        def on_optimizer_step(self, a, state, control, **kw):
            if self.in_profile(state):
                phases.switch("scheduler+zero_grad")

        def on_step_end(self, a, state, control, **kw):
            step = state.global_step
            if step == first:
                sync()
                prof.__enter__()
                window["start"] = time.perf_counter()
            elif step == second:
                phases.switch(None)
                sync()
                window["seconds"] = time.perf_counter() - window["start"]
                prof.__exit__(None, None, None)
                if windows == 2:
                    window["py_start"] = time.perf_counter()
                    python_profile.enable()
            elif step == third and windows == 2:
                sync()
                python_profile.disable()
                window["py_seconds"] = time.perf_counter() - window["py_start"]
            if args.syncs and step == third:
                sync()
                waits.start()
            elif args.syncs and step == total:
                waits.stop()
            if first <= step < second:
                phases.switch("between steps")

    trainer.add_callback(Window())
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run each time: an earlier one's records would resume
    with TrainingRun(trainer, cfg) as run:  # as the notebook trains: the memory policy decides before step 1
        trainer.train(resume_from_checkpoint=run.checkpoint)
    decided = run.memory
    averages = prof.key_averages()
    by_gpu = averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40)
    by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=50)
    steps = args.steps
    # a range appears twice: on the CPU (its CPU time) and as a GPU annotation (the GPU time it spans)
    phase_rows = {}
    for e in averages:
        if e.key.startswith("phase: "):
            row = phase_rows.setdefault(e.key.removeprefix("phase: "), {"cpu_s_per_step": 0.0, "gpu_s_per_step": 0.0})
            row["cpu_s_per_step"] = max(row["cpu_s_per_step"], round(e.cpu_time_total / 1e6 / steps, 4))
            row["gpu_s_per_step"] = max(row["gpu_s_per_step"],
                                        round(getattr(e, "device_time_total", 0) / 1e6 / steps, 4))
    summary = {
        "gpu": gpu_name() if cuda else "none", "profile": profile_name, "overrides": {k: str(v) for k, v in
                                                                                     overrides.items()},
        "tokens_per_row": cfg.sft.max_length, "steps": steps, "checkpointing": decided,
        "wall_s_per_step_profiled": round(window["seconds"] / steps, 4),
        # kernels only: an operator's self GPU time is its kernels' time again, and a range's GPU annotation (the
        # phases, the optimizer step) spans them (2026-12-04 this counted both: 0.76 s of a 0.47 s step)
        "gpu_busy_s_per_step": round(sum(e.self_device_time_total for e in averages
                                         if str(e.device_type).endswith("CUDA") and not e.is_user_annotation)
                                     / 1e6 / steps, 4),
        "cpu_self_s_per_step": round(sum(e.self_cpu_time_total for e in averages) / 1e6 / steps, 4),
        "kernel_launches_per_step": sum(e.count for e in averages if e.key in LAUNCHES) // steps,
        "phases": phase_rows,
    }
    text = [cfg.summary(), str(overrides), json.dumps(summary, indent=1), "", "== by GPU time", by_gpu, "",
            "== by self CPU time", by_cpu]
    if windows == 2:
        summary["wall_s_per_step_cprofile"] = round(window["py_seconds"] / steps, 4)
        for key in ("tottime", "cumulative"):
            stream = io.StringIO()
            pstats.Stats(python_profile, stream=stream).sort_stats(key).print_stats(45)
            text += ["", f"== cProfile over {steps} more steps, by {key}", stream.getvalue()]
    failed = False
    if args.syncs:
        summary["syncs"] = waits.summary(steps)
        text += ["", f"== waits on the GPU over {steps} more steps, by the line that asked", waits.table()]
        failed = args.max_syncs is not None and summary["syncs"]["per_step"] > args.max_syncs
        summary["syncs"]["verdict"] = {"max_per_step": args.max_syncs, "passed": not failed}
    print("\n".join(text[:3]))
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if failed:
        sys.exit(f"{summary['syncs']['per_step']} waits on the GPU per step, more than --max-syncs {args.max_syncs}")


class SyncSites:
    """Counts torch's "synchronizing CUDA operation" warnings by the Python line that caused each one: the innermost
    frame outside torch (and outside this file), with the nearest project, TRL or transformers frame beside it."""

    def __init__(self):
        self.sites = Counter()
        self.total = 0
        self._show = None

    def start(self) -> None:
        import torch

        self._show, self._filters = warnings.showwarning, warnings.filters[:]
        warnings.simplefilter("always")  # every wait counted, not the first from each line
        warnings.showwarning = self._record
        if torch.cuda.is_available():  # the CPU never waits on a device it does not have
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        warnings.filters[:] = self._filters

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not _ignored(f.filename)]
        inner = frames[-1] if frames else None
        owner = next((f for f in reversed(frames) if _owned(f.filename)), None)
        key = " <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in (inner, owner) if f is not None)
        self.sites[key] += 1
        self.total += 1

    def summary(self, steps: int) -> dict:
        return {"per_step": round(self.total / steps, 2), "total": self.total, "steps": steps,
                "sites": {k: v for k, v in self.sites.most_common()}}

    def table(self) -> str:
        return "\n".join(f"{count:6d}  {site}" for site, count in self.sites.most_common()) or "(none)"


def _ignored(path: str) -> bool:
    return "/torch/" in path or path.endswith(("profile_train.py", "warnings.py")) or "/contextlib.py" in path


OWNERS = ("/llmhelpers/", "/trl/", "/transformers/", "/accelerate/", "/peft/")  # whose line asked for a wait


def _owned(path: str) -> bool:
    return any(part in path for part in OWNERS)


def _short(path: str) -> str:
    for marker in (*OWNERS, "/liger_kernel/", "/site-packages/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


if __name__ == "__main__":
    main()
