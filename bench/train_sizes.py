"""The bigger R1 distills under the project's recipe (only the architecture changes): per card size, the speed and
memory the memory policy gives, for the size table in BENCHMARKS.md and the guide's "which GPU" section (issues #13,
#31).

    python bench/train_sizes.py --models 1.5b,7b --out bench/results/<date>-<gpu>-sizes.json     # the default recipe
    python bench/train_sizes.py --recipe padded --micro-batches 1,4,16                           # the old recipe
    python bench/train_sizes.py --dry-run      # the same code path on the CPU with a tiny architecture

Random weights, quantized to NF4 through transformers' own loading path from an in-memory state dict
(`common.random_nf4_loader`), LoRA r=16 on every linear layer, TRL's SFTTrainer.

- `packed` (the default recipe): one packed row of 16,384 tokens per optimizer step; for each card size the run's
  `memory_limit_gib` is the card less ~1 GiB of CUDA context, and the memory policy chooses, before step 1, whether
  the base stays dequantized and how many layers recompute. A packed row always holds 16,384 tokens, so the measured
  steps' peak is the worst case (also measured: `worst_case_peak_reserved_gib`). A limit the model cannot fit is
  recorded as its error. Rows: the synthetic rows of median 490 (the real MathCodeInstruct rows' median).
- `padded` (the recipe before packing): 16 sequences per optimizer step (micro-batch x accumulation), speed on rows
  of median 700, memory with every row at the 2,048-token cap.

Epoch time: the default mix's ~7.6 million tokens per epoch (the real rows' lengths through the R1 tokenizer, guide
"Time to a trained and evaluated model") over the measured useful tokens/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ARCHITECTURES, gpu_name, random_nf4_loader, random_r1_model, synthetic_rows  # noqa: E402
from train_throughput import run_config  # noqa: E402

CARDS_GB = (16, 24, 32, 80)
EPOCH_TOKENS = 7.6e6  # the default mix's tokens per epoch (real row lengths)
CONTEXT_GIB = 1.0  # CUDA context and allocator slack outside PyTorch's own counters
EPOCH_EXAMPLES = 15_000 + 112  # default math_samples + SciBench rows with a worked solution

# The same code on the CPU: a tiny Qwen2 (vocabulary above the tiny tokenizer's 1,026 ids) in the smoke settings.
TINY = dict(ARCHITECTURES["1.5b"], vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def measure(name, arch, model_dir, micro, rows, worst_rows, warmup, steps, extra):
    spec = dict(extra, per_device_train_batch_size=micro, gradient_accumulation_steps=max(1, 16 // micro))
    load = random_nf4_loader(arch)
    speed = run_config(f"{name}-mb{micro}", spec, model_dir, rows, warmup, steps, load_model=load, arch=arch)
    worst = run_config(f"{name}-mb{micro}-worst", spec, model_dir, worst_rows, 1, 2, load_model=load, arch=arch)
    fits = [gb for gb in CARDS_GB if worst["peak_reserved_gib"] + CONTEXT_GIB <= gb * 1e9 / 2**30]
    mean_len = sum(map(len, rows["input_ids"])) / len(rows["input_ids"])
    return {"model": name, "micro_batch": micro, "accumulation": spec["gradient_accumulation_steps"],
            "useful_tok_s": speed["useful_tok_s"], "tokens_per_step": speed["tokens_per_step"], "mfu": speed["mfu"],
            "peak_alloc_gib": speed["peak_alloc_gib"], "worst_case_peak_alloc_gib": worst["peak_alloc_gib"],
            "worst_case_peak_reserved_gib": worst["peak_reserved_gib"], "fits_gb": fits,
            "epoch_hours_estimate": round(EPOCH_EXAMPLES * mean_len / max(speed["useful_tok_s"], 1) / 3600, 2)}


def measure_packed(name, arch, model_dir, card_gb, rows, warmup, steps, extra):
    """The default recipe on a card of `card_gb`: the memory policy under that card's limit; where a row of 16,384
    does not fit even with every layer recomputing (the policy's error), the half rows with twice the accumulation
    that the error names (memory.smaller_batch, the guide's recipe for a 16 GB card)."""
    card_gib = card_gb * 1e9 / 2**30
    limit = int(card_gib - CONTEXT_GIB)
    spec = dict(extra, memory_limit_gib=float(limit))
    try:
        run = run_config(f"{name}-{card_gb}gb", spec, model_dir, rows, warmup, steps,
                         load_model=random_nf4_loader(arch), arch=arch)
    except RuntimeError as err:
        if "does not fit" not in str(err) or "max_length" in extra:
            raise
        from llmhelpers.config.profiles import make_config
        from llmhelpers.training.memory import smaller_batch

        spec.update(smaller_batch(make_config("full", **spec)))  # what the policy's error tells the user to set
        try:
            run = run_config(f"{name}-{card_gb}gb-8k", spec, model_dir, rows, warmup, steps,
                             load_model=random_nf4_loader(arch), arch=arch)
        except RuntimeError as half_err:  # the record says both row lengths were tried
            raise RuntimeError(f"rows of {spec['max_length']:,} (half rows, after 16,384 did not fit) do not fit "
                               f"either: {half_err}") from err
        run["half_rows_because"] = str(err)[:200]
    worst = max(run["peak_reserved_gib"], run["worst_case_peak_reserved_gib"])
    return {"model": name, "card_gb": card_gb, "memory_limit_gib": limit, "row_tokens": spec.get("max_length", 16384),
            **{k: run[k] for k in ("half_rows_because",) if k in run}, "useful_tok_s": run["useful_tok_s"],
            "tokens_per_step": run["tokens_per_step"], "mfu": run["mfu"], "checkpointing": run["checkpointing"],
            "peak_reserved_gib": run["peak_reserved_gib"], "worst_case_peak_reserved_gib": worst,
            "fits": worst + CONTEXT_GIB <= card_gib, "warmup_seconds": run["warmup_seconds"],
            "epoch_hours": round(EPOCH_TOKENS / max(run["useful_tok_s"], 1) / 3600, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.5b,7b,14b,32b")
    parser.add_argument("--recipe", choices=("packed", "padded"), default="packed")
    parser.add_argument("--cards", default="16,24,32,80", help="card sizes in GB (packed)")
    parser.add_argument("--micro-batches", default="1,4,16", help="micro-batches (padded)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dry-run", action="store_true", help="tiny architecture on the CPU, smoke settings")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.dry_run:
        from llmhelpers.model.tiny import build_tiny_r1

        model_dir = build_tiny_r1(Path("/tmp/bench-sizes/tiny-r1"))
        archs, extra = {"tiny": TINY}, dict(profile="smoke", max_example_tokens=2048)
        if args.recipe == "packed":  # the smoke profile pads; its packed form in rows of 4,096
            extra.update(packing=True, max_length=4096, pad_to_multiple_of=4096, per_device_train_batch_size=1,
                         gradient_accumulation_steps=1)
        else:  # rows up to the 2,048-token cap
            extra.update(max_length=2048)
        vocab = TINY["vocab_size"]
    else:
        model_dir = random_r1_model()  # its tokenizer; the weights come from random_nf4_loader
        archs, extra, vocab = {m: ARCHITECTURES[m] for m in args.models.split(",")}, {}, 151000
        if args.recipe == "padded":  # the recipe before packing: padded micro-batches of up to 2,048 tokens
            extra = dict(packing=False, max_length=2048, pad_to_multiple_of=None,
                         train_sampling_strategy="group_by_length")
    per_run = 16 * (args.warmup + args.steps + 2) * (2 if args.recipe == "padded" else 4)
    rows = synthetic_rows(per_run, vocab=vocab, median=700 if args.recipe == "padded" else 490)
    worst_rows = synthetic_rows(16 * 4 * 2, median=2048, sigma=0.0, vocab=vocab)
    results = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "recipe": args.recipe,
               "cards_gb": [int(c) for c in args.cards.split(",")] if args.recipe == "packed" else CARDS_GB,
               "runs": []}
    sizes = args.cards if args.recipe == "packed" else args.micro_batches
    for name, arch in archs.items():
        for size in map(int, sizes.split(",")):
            try:
                if args.recipe == "packed":
                    run = measure_packed(name, arch, model_dir, size, rows, args.warmup, args.steps, extra)
                else:
                    run = measure(name, arch, model_dir, size, rows, worst_rows, args.warmup, args.steps, extra)
            except Exception as err:  # an out-of-memory micro-batch is a result too
                run = {"model": name, "card_gb" if args.recipe == "packed" else "micro_batch": size,
                       "error": f"{type(err).__name__}: {str(err)[:300]}"}
                import gc

                import torch

                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            if args.out:  # after every run: a call cut short keeps what it measured
                Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
