"""The full-profile pipeline on a GPU, end to end, on the R1-1.5B architecture with random weights:
train a few steps through the CLI's `run` (4-bit, Liger, accuracy callback), save, evaluate base
against fine-tuned on bf16 weights with the automatic batch size, then merge a perturbed copy of the
adapters into the bf16 base and check the logits (the bf16 merge tolerance).

    python bench/gpu_pipeline_check.py            # on a GPU
    python bench/gpu_pipeline_check.py --tiny     # the same steps on CPU with the tiny model
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--work", default="/tmp/gpu-check", help="the run's folder (removed first)")
    parser.add_argument("--out", default=None, help="the check's JSON (default: <work>/check.json)")
    args = parser.parse_args()

    import random

    import torch
    from safetensors.torch import load_file, save_file

    from common import finish_check, gpu_name, random_r1_model
    from synth_data import row
    from llmhelpers.data.chat import render_prompt
    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import demo_examples
    from llmhelpers.model.merging import merge_adapters
    from llmhelpers.model.loading import load_tokenizer
    from llmhelpers.cli import run

    rng = random.Random(0)
    data = Path("/tmp/synth_check.jsonl")
    data.write_text("".join(json.dumps(row(rng)) + "\n" for _ in range(400)))
    common = dict(math_dataset=str(data), science_dataset="data/samples/scibench.jsonl", math_samples=0,
                  max_steps=10, eval_steps=5, save_steps=5, logging_steps=1, eval_limit=32,
                  eval_max_new_tokens=128, accuracy_callback=True, accuracy_callback_size=8,
                  output_dir=args.work)
    if args.tiny:
        cfg = make_config("smoke", **common)
    else:
        cfg = make_config("full", model_id=str(random_r1_model()), **common)
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.time()
    result = run(cfg, evaluate_after=True)
    print("RUN", json.dumps(result), f"{time.time() - t0:.1f}s", flush=True)

    # Perturb the trained adapters (10 steps barely move them) so that the merge check has something to check.
    perturbed = Path(args.work) / "perturbed"
    shutil.copytree(cfg.final_dir, perturbed)
    weights = load_file(perturbed / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if "lora_B" in name:
            weights[name] = (w.float() + 0.02 * torch.randn(w.shape, generator=g)).to(w.dtype)
    save_file(weights, perturbed / "adapter_model.safetensors")
    tok = load_tokenizer(cfg)
    prompts = [render_prompt(e, tok) for e in demo_examples()]
    check = merge_adapters(cfg, tok, prompts, adapter_dir=perturbed, out_dir=Path(args.work) / "merged")
    print("MERGE", json.dumps({"gpu": gpu_name(), **check}), flush=True)
    rows = {}
    for label in ("base", "finetuned"):
        rows[label] = len((cfg.eval_dir / f"{label}.jsonl").read_text().splitlines())
        print("EVAL", label, rows[label], "rows", flush=True)
    passed = check["ok"] and result.get("global_step", 0) > 0 and all(rows.values())
    finish_check({"run": result, "merge": check, "eval_rows": rows}, args.out or str(Path(args.work) / "check.json"), passed,
                 "training ran, both evaluations wrote their rows, and the perturbed merge is within its tolerance")


if __name__ == "__main__":
    main()
