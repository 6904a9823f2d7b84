"""Unsloth beside the project (issue #13): the same model, data and measurement as `bench/train_throughput.py`,
trained by Unsloth's own path. Run it in its own process (importing unsloth patches transformers for the whole
process) with Unsloth's packages on the path, in the same session as `train_throughput.py`:

    PYTHONPATH=/tmp/unsloth-site python bench/train_unsloth.py --configs mb8x2,mb16x1 --out bench/results/<...>.json

Packages that ran together on the GPU machine (issue #13): unsloth and unsloth-zoo 2026.10.9, trl 1.15.0,
datasets 4.8.4, tyro, docstring-parser, shtab, typeguard, cut-cross-entropy, torchao 0.18.0, msgspec, hf-transfer,
peft 0.21.2, bitsandbytes 0.50.2, on the image's transformers 5.17.

Model: the R1-1.5B architecture with random weights (`common.random_r1_model`), NF4 4-bit, LoRA r=16 / alpha 32 on
q,k,v,o,gate,up,down, Unsloth's gradient checkpointing, bf16; data: `common.synthetic_rows` (lognormal lengths,
median 700, cap 2,048, prompt masked), 16 sequences per optimizer step, length-grouped batches. Useful tokens/s is
counted exactly as train_throughput.py counts it (every non-pad token of the measured steps' sequences).
Run on the GPU machine on 2026-11-30 (../shared/measurements) and again in issue #20's session.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import unsloth  # noqa: F401  (first: it patches transformers and TRL before they are imported)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_name, random_r1_model, synthetic_rows  # noqa: E402
from train_throughput import measure_after_warmup, model_flops, second_half_rate  # noqa: E402

# name -> (micro-batch, accumulation, packed row length or 0 for padded micro-batches of 2,048, Unsloth's checkpointing)
CONFIGS = {
    "mb2x8": (2, 8, 0, "unsloth"), "mb8x2": (8, 2, 0, "unsloth"), "mb16x1": (16, 1, 0, "unsloth"),
    # issue #31's peer at its best exact configuration: TRL's packing (bfd, padding-free, per-sequence positions) in
    # rows of the project's default length, one row per optimizer step, without and with Unsloth's checkpointing
    "packed": (1, 1, 16384, False), "packed-gc": (1, 1, 16384, "unsloth"),
    "packed32k": (1, 1, 32768, False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(name: str, micro: int, accumulation: int, row: int, checkpointing, model_dir: Path, rows, warmup: int,
        steps: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from common import peak_bf16_flops

    max_length = row or 2048
    model, tok = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=max_length,
                                                   load_in_4bit=True, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             use_gradient_checkpointing=checkpointing, random_state=0)
    layout = dict(packing=True, padding_free=True) if row else dict(group_by_length=True)
    args = SFTConfig(output_dir=f"/tmp/bench-unsloth/{name}", per_device_train_batch_size=micro,
                     gradient_accumulation_steps=accumulation, max_steps=warmup + steps, learning_rate=2e-4,
                     lr_scheduler_type="cosine", warmup_ratio=0.0, logging_steps=1, save_strategy="no",
                     eval_strategy="no", report_to="none", bf16=True, optim="adamw_8bit", **layout,
                     max_length=max_length, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok)
    counter, marks = measure_after_warmup(trainer, warmup)
    trainer.train()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - marks["t0"]
    lengths = [n for batch in counter.batches[marks["n0"]:marks["n0"] + steps * accumulation] for n in batch]
    peak_alloc, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    # the worst micro-batch it can meet: every sequence at the 2,048 cap, padded, or a full packed row of them (as its
    # padding-free collator gives it: position ids restarting at each sequence, no attention mask; until 2026-12-04
    # the packed row was measured as one 16,384-token sequence with a mask of ones, a path packed training never
    # takes, which recorded 28.2 GiB for packed-gc)
    ids = torch.randint(1000, 150000, (micro, max_length), device="cuda")
    layout = {"position_ids": (torch.arange(max_length, device="cuda") % 2048)[None].expand(micro, -1)} if row \
        else {"attention_mask": torch.ones_like(ids)}
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        trainer.training_step(trainer.model, {"input_ids": ids, "labels": ids, **layout})
        trainer.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"config": f"unsloth-{name}", "micro_batch": micro, "accumulation": accumulation, "steps": steps,
            "packed_row": row, "checkpointing": checkpointing or "none",
            "sequences_per_step": round(len(lengths) / steps, 1),
            "peak_reserved_gib": round(peak_reserved / 2**30, 2),
            "worst_case_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "seconds": round(elapsed, 2), "tokens_per_step": round(sum(lengths) / steps),
            "useful_tok_s": round(sum(lengths) / elapsed),
            "peak_alloc_gib": round(peak_alloc / 2**30, 2),
            "mfu": round(model_flops(lengths) / elapsed / peak_bf16_flops(), 4),
            "unsloth": getattr(__import__("unsloth"), "__version__", "?"),
            **second_half_rate(marks, counter.batches, accumulation, steps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="mb8x2,mb16x1")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--median", type=int, default=700)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_dir = random_r1_model()
    # the same rows as train_throughput.py
    rows = synthetic_rows(16 * (args.warmup + args.steps + 2) * 4, median=args.median)
    results = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "median": args.median, "runs": []}
    for name in args.configs.split(","):
        results["runs"].append(run(name, *CONFIGS[name], model_dir, rows, args.warmup, args.steps))
        print(json.dumps(results["runs"][-1]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
