"""GRPO on a real model (issue #33): the small profile's SFT model (SmolLM2-135M-Instruct with its saved adapters)
practises on data/small/practice_templates.jsonl (templates SFT never saw), then both the SFT and the GRPO adapters
are graded with tools (R1 protocol: 4 sampled answers per problem) on data/small/heldout_templates.jsonl (the same
templates, other numbers) and on data/small/heldout.jsonl (SFT's own templates: nothing may be lost there).

    python bench/grpo_real_weights.py --adapters DIR --out bench/results/<date>-<gpu>-grpo.json
    python bench/grpo_real_weights.py --adapters DIR --max-steps 1 --limit 4 --completion 32   # a CPU dry run

The GRPO run is the library's (`llmhelpers.config.grpo`, `llmhelpers.training.grpo`, the small profile's recipe with
`--set key=value` changes). Records sft_accuracy_tools, grpo_accuracy_tools, held_out, rollout_tok_s, steps and the
reward curve; exits 1 when GRPO gains less than 5 points on the held-out templates.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRACTICE = "data/small/practice_templates.jsonl"
GRADED = {"held_out_templates": "data/small/heldout_templates.jsonl", "held_out": "data/small/heldout.jsonl"}
TARGET_GAIN = 0.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", required=True, help="the small profile's SFT adapters (a final/ folder)")
    parser.add_argument("--work", default="/tmp/grpo-rw")
    parser.add_argument("--out", default="")
    parser.add_argument("--max-steps", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--completion", type=int, default=0, help="max_completion_length (0: the recipe's)")
    parser.add_argument("--limit", type=int, default=0, help="graded problems per set (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a GRPOConfig or GRPO run setting (JSON value), e.g. --set learning_rate=5e-5")
    args = parser.parse_args()

    import torch

    from common import gpu_name, provenance
    from grpo_rollouts import time_rollouts
    from llmhelpers.config.grpo import make_grpo_config
    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import load_problem_file
    from llmhelpers.evaluation.protocol import evaluate, finetuned_for_evaluation
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.grpo import build_grpo_trainer, load_problems, reward_history, save_grpo_adapters
    from llmhelpers.training.rewards import rl_dataset
    from llmhelpers.training.run import run_training

    work = Path(args.work)
    cfg = make_config("small", output_dir=str(work / "outputs"))
    changes = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    changes.update({"max_steps": args.max_steps} if args.max_steps else {})
    changes.update({"max_completion_length": args.completion} if args.completion else {})
    rl_cfg = make_grpo_config(cfg, start_from=str(Path(args.adapters).resolve()), problems=PRACTICE, **changes)
    print(rl_cfg.summary(), flush=True)
    tokenizer = load_tokenizer(cfg)
    model = attach_lora(load_base_model(cfg), cfg)
    trainer = build_grpo_trainer(rl_cfg, model, tokenizer, rl_dataset(load_problems(rl_cfg), tokenizer))
    rollouts = time_rollouts(trainer)
    started = time.perf_counter()
    run_training(trainer, rl_cfg)
    train_seconds = time.perf_counter() - started
    grpo_adapters = save_grpo_adapters(trainer.model, tokenizer, rl_cfg)
    curve = reward_history(trainer)
    del trainer, model
    tokens, seconds = sum(r["tokens"] for r in rollouts), sum(r["seconds"] for r in rollouts)

    accuracy = {}
    for name, path in GRADED.items():
        problems = load_problem_file(path)[0]
        problems = problems[:args.limit] if args.limit else problems
        for label, folder in (("sft", Path(args.adapters)), ("grpo", grpo_adapters)):
            with finetuned_for_evaluation(cfg, adapter_dir=folder) as graded:
                result = evaluate(graded, tokenizer, problems, cfg, f"{label}-{name}", work / "eval", progress=False,
                                  tool_execution=True)
            accuracy[(label, name)] = result.accuracy
            print(f"{label} on {name}: {result.accuracy:.4f} ({len(problems)} problems)", flush=True)
    gain = accuracy[("grpo", "held_out_templates")] - accuracy[("sft", "held_out_templates")]
    out = {
        "gpu": gpu_name(), "model": "SmolLM2-135M-Instruct (small profile SFT adapters)",
        "held_out": {"file": GRADED["held_out_templates"], "problems": args.limit or 300,
                     "samples": cfg.eval_samples, "practice_file": PRACTICE},
        "sft_accuracy_tools": accuracy[("sft", "held_out_templates")],
        "grpo_accuracy_tools": accuracy[("grpo", "held_out_templates")],
        "gain": gain,
        "same_templates": {"file": GRADED["held_out"], "sft_accuracy_tools": accuracy[("sft", "held_out")],
                           "grpo_accuracy_tools": accuracy[("grpo", "held_out")]},
        "steps": len(curve["step"]), "train_seconds": round(train_seconds, 1),
        "rollout_tok_s": round(tokens / seconds, 1) if seconds else None,
        "reward_curve": curve, "grpo_settings": rl_cfg.to_dict()["grpo"], "run": rl_cfg.run_name,
        "verdict": {"passed": gain >= TARGET_GAIN, "rule": f"GRPO accuracy with tools on the held-out templates "
                                                            f">= SFT's + {TARGET_GAIN}"},
        "provenance": provenance(),
    }
    if torch.cuda.is_available():
        out["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("sft_accuracy_tools", "grpo_accuracy_tools", "gain", "rollout_tok_s",
                                          "steps")}))
    return 0 if out["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
