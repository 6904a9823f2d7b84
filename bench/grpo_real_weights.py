"""GRPO on a real model (issue #33): the small profile's SFT model (SmolLM2-135M-Instruct with its saved adapters)
practises on data/small/practice_templates.jsonl (templates SFT never saw), then both the SFT and the GRPO adapters
are graded with tools (R1 protocol: 4 sampled answers per problem) on data/small/heldout_templates.jsonl (the same
templates, other numbers) and on data/small/heldout.jsonl (SFT's own templates: nothing may be lost there).

    python bench/grpo_real_weights.py --adapters DIR --out run.json [--set learning_rate=1e-4]
    python bench/grpo_real_weights.py --select run-*.json --out bench/results/<date>-<gpu>-grpo.json
    python bench/grpo_real_weights.py --adapters DIR --max-steps 1 --limit 4 --completion 32   # a CPU dry run

Every 5th practice problem is kept out of practice as a validation set: when several settings are tried (one run
each), --select keeps the one with the highest gain there, never looking at the held-out sets, and lists them all.

The GRPO run is the library's (`llmhelpers.config.grpo`, `llmhelpers.training.grpo`, the small profile's recipe with
`--set key=value` changes). Records sft_accuracy_tools, grpo_accuracy_tools, held_out, rollout_tok_s, steps and the
reward curve; exits 1 when GRPO gains less than 5 points on the held-out templates (--select: the selected run).
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
VALIDATION_EVERY = 5  # every 5th practice problem is kept out of practice: it picks among settings (--select)
TARGET_GAIN = 0.05


def split_practice(work: Path) -> tuple[str, str]:
    """The practice file without its validation rows, and the validation rows: written under `work`."""
    rows = Path(PRACTICE).read_text().splitlines()
    practice, validation = work / "practice.jsonl", work / "validation.jsonl"
    practice.write_text("\n".join(r for i, r in enumerate(rows) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1) + "\n")
    validation.write_text("\n".join(r for i, r in enumerate(rows) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1)
                          + "\n")
    return str(practice), str(validation)


def select(paths: list[str], out: str) -> int:
    """The settings (the run id) of the run with the highest validation gain, never a held-out one, and a run of those
    settings graded on the held-out sets (the same run, or the same settings run again when the first was cut before
    its grading) become the record; every run is listed under `settings_tried`."""
    runs = [json.loads(Path(p).read_text()) for p in paths if Path(p).is_file()]
    validated = [r for r in runs if "grpo_accuracy_tools" in r.get("validation", {})]
    if not validated:
        print("no run was graded on the validation problems")
        return 1
    best = max(validated, key=lambda r: r["validation"]["grpo_accuracy_tools"] - r["validation"]["sft_accuracy_tools"])
    graded = [r for r in runs if r["run"] == best["run"] and "grpo_accuracy_tools" in r]
    if not graded:
        print(f"the settings best on validation ({best['run']}) were not graded on the held-out sets: run them again")
        return 1
    record = dict(graded[-1], selected_by="validation gain (practice-template problems kept out of practice)",
                  settings_tried=[{k: r.get(k) for k in ("run", "learning_rate", "validation", "held_out", "gain", "steps",
                                                          "train_seconds", "rollout_tok_s")} for r in runs])
    Path(out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("run", "sft_accuracy_tools", "grpo_accuracy_tools", "gain")}))
    return 0 if record["verdict"]["passed"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", help="the small profile's SFT adapters (a final/ folder)")
    parser.add_argument("--work", default="/tmp/grpo-rw")
    parser.add_argument("--out", default="")
    parser.add_argument("--max-steps", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--completion", type=int, default=0, help="max_completion_length (0: the recipe's)")
    parser.add_argument("--limit", type=int, default=0, help="graded problems per set (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a GRPOConfig or GRPO run setting (JSON value), e.g. --set learning_rate=5e-5")
    parser.add_argument("--select", nargs="+", metavar="RUN_JSON",
                        help="instead of a run: the run with the highest validation gain among these, into --out")
    args = parser.parse_args()
    if args.select:
        return select(args.select, args.out)
    if not args.adapters:
        parser.error("--adapters is required")

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
    work.mkdir(parents=True, exist_ok=True)
    practice, validation = split_practice(work)
    cfg = make_config("small", output_dir=str(work / "outputs"))
    changes = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    changes.update({"max_steps": args.max_steps} if args.max_steps else {})
    changes.update({"max_completion_length": args.completion} if args.completion else {})
    rl_cfg = make_grpo_config(cfg, start_from=str(Path(args.adapters).resolve()), problems=practice, **changes)
    print(rl_cfg.summary(), flush=True)
    record = {"gpu": gpu_name(), "model": "SmolLM2-135M-Instruct (small profile SFT adapters)",
              "run": rl_cfg.run_name, "learning_rate": rl_cfg.grpo.learning_rate,
              "grpo_settings": rl_cfg.to_dict()["grpo"], "provenance": provenance()}
    # the same command again (one device call was too short) goes on where its record stops: a trained run is not
    # trained again, a graded set is not graded again
    previous = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).is_file() else {}
    trained = previous.get("run") == rl_cfg.run_name and "reward_curve" in previous and rl_cfg.final_dir.is_dir()
    record = previous if trained else record

    def save():  # after each stage: a run cut by a time limit still leaves what it measured
        if torch.cuda.is_available():
            record["peak_alloc_gib"] = max(record.get("peak_alloc_gib", 0),
                                           round(torch.cuda.max_memory_allocated() / 2**30, 2))
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=1))

    save()
    tokenizer = load_tokenizer(cfg)
    grpo_adapters = rl_cfg.final_dir
    if trained:
        print(f"trained already: {grpo_adapters}", flush=True)
    else:
        model = attach_lora(load_base_model(cfg), cfg)
        trainer = build_grpo_trainer(rl_cfg, model, tokenizer, rl_dataset(load_problems(rl_cfg), tokenizer))
        rollouts = time_rollouts(trainer)
        started = time.perf_counter()
        run_training(trainer, rl_cfg)
        grpo_adapters = save_grpo_adapters(trainer.model, tokenizer, rl_cfg)
        curve = reward_history(trainer)
        tokens, seconds = sum(r["tokens"] for r in rollouts), sum(r["seconds"] for r in rollouts)
        record.update({"steps": len(curve["step"]), "train_seconds": round(time.perf_counter() - started, 1),
                       "rollout_tok_s": round(tokens / seconds, 1) if seconds else None, "reward_curve": curve})
        save()
        del trainer, model

    # record keys: held_out = the held-out templates (the templates GRPO practised, other numbers), as the issue names
    # it; same_templates = the SFT run's own held-out problems (nothing may be lost there)
    graded = {"validation": validation, "held_out": GRADED["held_out_templates"], "same_templates": GRADED["held_out"]}
    for name, path in graded.items():
        problems = load_problem_file(path)[0]
        problems = problems[:args.limit] if args.limit else problems
        record.setdefault(name, {"file": path, "problems": len(problems), "samples": cfg.eval_samples})
        for label, folder in (("sft", Path(args.adapters)), ("grpo", grpo_adapters)):
            if f"{label}_accuracy_tools" in record[name]:  # graded before this run was cut
                continue
            with finetuned_for_evaluation(cfg, adapter_dir=folder) as model:
                result = evaluate(model, tokenizer, problems, cfg, f"{label}-{name}", work / "eval", progress=False,
                                  tool_execution=True)
            record[name][f"{label}_accuracy_tools"] = result.accuracy
            print(f"{label} on {name}: {result.accuracy:.4f} ({len(problems)} problems)", flush=True)
            save()
    record["held_out"]["practice_file"] = PRACTICE
    record["sft_accuracy_tools"] = record["held_out"]["sft_accuracy_tools"]
    record["grpo_accuracy_tools"] = record["held_out"]["grpo_accuracy_tools"]
    record["gain"] = record["grpo_accuracy_tools"] - record["sft_accuracy_tools"]
    record["verdict"] = {"passed": record["gain"] >= TARGET_GAIN,
                         "rule": f"GRPO accuracy with tools on the held-out templates >= SFT's + {TARGET_GAIN}"}
    save()
    print(json.dumps({k: record[k] for k in ("sft_accuracy_tools", "grpo_accuracy_tools", "gain", "rollout_tok_s",
                                             "steps")}))
    return 0 if record["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
