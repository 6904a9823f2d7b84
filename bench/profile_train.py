"""Where a training step of the project's default recipe spends its time (issue #13: profile first, then attack the
top of the table): torch.profiler over a few optimizer steps after warm-up, kernels sorted by GPU time.

    python bench/profile_train.py --out bench/results/<date>-<gpu>-train-profile.txt
    python bench/profile_train.py --dry-run          # tiny model, smoke settings, on the CPU

Same model, rows and trainer as bench/train_throughput.py (R1-1.5B architecture, random weights, NF4 + LoRA).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import random_r1_model, synthetic_rows  # noqa: E402
from train_throughput import bench_trainer  # noqa: E402


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
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import ast

    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.dry_run:
        from llmhelpers.model.tiny import build_tiny_r1

        model_dir, profile_name, vocab = build_tiny_r1(Path("/tmp/bench-profile/tiny-r1")), "smoke", 1020
    else:
        model_dir, profile_name, vocab = random_r1_model(), "full", 151000
    cfg = make_config(profile_name, model_id=str(model_dir), output_dir="/tmp/bench-profile/run", report_to="none",
                      max_steps=args.warmup + args.steps, save_steps=10_000, eval_steps=10_000, warmup_steps=0,
                      **overrides)
    trainer = bench_trainer(cfg, synthetic_rows(16 * (args.warmup + args.steps + 2), vocab=vocab))
    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    window = {}

    class Window(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step == args.warmup:
                prof.__enter__()
                window["start"] = time.perf_counter()
            if state.global_step == args.warmup + args.steps:
                window["seconds"] = time.perf_counter() - window["start"]

    trainer.add_callback(Window())
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40)
    # wall time of the profiled steps (profiler overhead included) against the GPU time in the table: a step whose
    # wall time is well above its GPU time waits on the CPU (launches, Python, synchronisations)
    steps = f"profiled {args.steps} optimizer steps: {window['seconds']:.3f} s wall, " \
            f"{window['seconds'] / args.steps:.3f} s per step (gpu: {torch.cuda.get_device_name() if cuda else 'none'})"
    print(table, steps, sep="\n")
    if args.out:
        Path(args.out).write_text(f"{cfg.summary()}\n{overrides}\n{steps}\n\n{table}\n")


if __name__ == "__main__":
    main()
