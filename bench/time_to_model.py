"""Time to a trained, evaluated and merged model, as one timed run (issue #31): the CLI's own `run` with the full
profile's recipe (4-bit base, LoRA on every linear layer, packed rows, its epochs), then what a user's command does
after training: the adapters saved, base and fine-tuned graded with the R1 protocol (200 problems x 4 samples, with
tools and, for the fine-tuned model, without), the bf16 merge with its logit check. One wall clock from the start of
`run` to its return; the phases' own wall times are in the run's result (`run.seconds`: loading, training, saving,
evaluation, merge).

    python bench/time_to_model.py --out /tmp/ttm.json              # on a GPU: ~15 minutes on an H200 (3 epochs)
    python bench/time_to_model.py --epochs 1 --out /tmp/ttm.json   # one epoch: fits a 10-minute device call
    python bench/time_to_model.py --tiny                            # the same steps on the CPU, tiny model and data

The GPU machines have no network: the R1-1.5B architecture with random weights, and synthetic MathCodeInstruct-schema
rows (bench/synth_data.py) sized so that an epoch holds `--epoch-tokens` tokens through the tokenizer the run uses
(default 7.6M: the guide's estimate for the default mix of real rows). A random model never stops early, so every
answer runs to `eval_max_new_tokens`, set to the bench workload's mean answer of 2,475 tokens (the same token count as
real answers of that mean, without their long tail). What it does not include: downloading the model and datasets.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MEAN_ANSWER_TOKENS = 2475  # bench/eval_engine.py's workload: lognormal median 2,000, sigma 0.7, cap 8,192


def rows_for_tokens(row_tokens, target: int, sample: int = 200, cap: int = 2048) -> int:
    """How many synthetic rows make `target` training tokens: the mean of `row_tokens(i)` over the first `sample`
    rows that fit `cap` (longer ones are dropped by the data step), times the share that fit."""
    lengths = [row_tokens(i) for i in range(sample)]
    kept = [n for n in lengths if n <= cap]
    if not kept:
        raise ValueError(f"no synthetic row fits {cap} tokens")
    return round(target / (sum(kept) / len(kept)) / (len(kept) / len(lengths)))


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    from synth_data import row

    rng = random.Random(seed)
    path.write_text("".join(json.dumps(row(rng)) + "\n" for _ in range(n)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the smoke profile's tiny model on the CPU")
    parser.add_argument("--epochs", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--epoch-tokens", type=int, default=7_600_000)
    parser.add_argument("--work", default="/tmp/time-to-model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from common import gpu_name, provenance, random_r1_model
    from llmhelpers.cli import run
    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.chat import encode
    from llmhelpers.data.sources import from_mathcodeinstruct
    from llmhelpers.model.loading import load_tokenizer

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    epoch_tokens = 20_000 if args.tiny else args.epoch_tokens
    overrides = dict(science_dataset="data/samples/scibench.jsonl", math_samples=0, output_dir=str(work / "outputs"),
                     eval_max_new_tokens=24 if args.tiny else MEAN_ANSWER_TOKENS, merge_after_training=True)
    if args.tiny:
        overrides.update(eval_limit=4, eval_samples=2)
    if args.epochs is not None:
        overrides["num_train_epochs"] = args.epochs
    profile = "smoke" if args.tiny else "full"
    model_args = {} if args.tiny else {"model_id": str(random_r1_model())}
    base = make_config(profile, **model_args)
    tokenizer = load_tokenizer(base)
    from synth_data import row

    sample_rng = random.Random(0)
    sample = [row(sample_rng) for _ in range(200)]
    n_rows = rows_for_tokens(lambda i: len(encode(from_mathcodeinstruct(sample[i]), tokenizer)["input_ids"]),
                             epoch_tokens, cap=base.max_example_tokens)
    data = work / "synth_mci.jsonl"
    write_rows(data, n_rows)
    cfg = make_config(profile, **model_args, math_dataset=str(data), **overrides)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = run(cfg, evaluate_after=True)
    seconds = time.perf_counter() - started
    record = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds, 1),
              "minutes": round(seconds / 60, 1), "synthetic_rows": n_rows, "epoch_tokens_target": epoch_tokens,
              "epochs": cfg.sft.num_train_epochs, "eval_max_new_tokens": cfg.eval_max_new_tokens,
              "eval_limit": cfg.eval_limit, "eval_samples": cfg.eval_samples,
              "eval_without_tools": cfg.eval_without_tools, "run": result, "provenance": provenance()}
    print(json.dumps(record, default=str), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
