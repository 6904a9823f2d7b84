"""GRPO rollouts: the project's engine (ProjectRollouts over a merged copy of the policy) against TRL's default
generation (model.generate on the 4-bit model with LoRA), inside real GRPO steps on the R1-1.5B architecture with
random weights (issue #33: "Rollouts fast").

Each mode runs in its own process: the NF4 base from random bf16 weights, LoRA on every linear layer, the GRPO
recipe (8 answers per problem, 4 problems per step: 32 answers) with `--completion` tokens per answer (random
weights never stop early, so every answer is that long), tools off. After one warm-up step, `--steps` steps are
timed: the step time, and the rollout time and generated tokens per second of TRL's `_generate` call within them.

    python bench/grpo_rollouts.py --out bench/results/<date>-<gpu>-grpo-rollouts.json
    python bench/grpo_rollouts.py --tiny --steps 1 --completion 8      # a dry run on the CPU (the smoke model)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("engine", "trl")


def run_mode(mode: str, steps: int, completion: int, tiny: bool) -> dict:
    import torch

    from common import gpu_name, random_r1_model
    from llmhelpers.config.grpo import make_grpo_config
    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import load_problem_file
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.grpo import ProjectRollouts, ResumableGRPOTrainer
    from llmhelpers.training.rewards import reward_functions, rl_dataset
    from llmhelpers.training.run import run_training

    out = f"/tmp/grpo-bench-{mode}"
    if tiny:
        cfg = make_config("smoke", output_dir=out, accuracy_callback=False)
    else:
        cfg = make_config("full", model_id=str(random_r1_model()), output_dir=out)
    rl_cfg = make_grpo_config(cfg, start_from="base", problems="data/small/heldout.jsonl", max_problems=64,
                              tool_rollouts=False, engine_rollouts="on" if mode == "engine" else "off",
                              max_completion_length=completion, max_steps=1 + steps, save_strategy="no",
                              report_to="none", warmup_steps=0, **({"num_generations": 8,
                                                                    "per_device_train_batch_size": 8,
                                                                    "gradient_accumulation_steps": 4} if tiny else {}))
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = attach_lora(load_base_model(cfg), cfg)
    trainer = ResumableGRPOTrainer(model=model, args=rl_cfg.trainer_args(), reward_funcs=reward_functions(),
                                   train_dataset=rl_dataset(load_problem_file(rl_cfg.problems)[0][:64], tokenizer),
                                   processing_class=tokenizer,
                                   rollout_func=ProjectRollouts(tokenizer, rl_cfg) if mode == "engine" else None)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rollouts, step_ends = time_rollouts(trainer), []

    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            step_ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    started = time.perf_counter()
    run_training(trainer, rl_cfg)
    timed = [r for r in rollouts if r["step"] >= 1]  # after the warm-up step (graph capture, autotuning)
    step_seconds = [b - a for a, b in zip(step_ends, step_ends[1:])]
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    return {"mode": mode, "gpu": gpu_name(), "architecture": "smoke tiny" if tiny else "R1-1.5B (random weights)",
            "answers_per_step": timed[0]["answers"] if timed else None, "completion_tokens": completion,
            "steps_timed": len(step_seconds), "step_s": round(sum(step_seconds) / max(len(step_seconds), 1), 2),
            "rollout_s_per_step": round(seconds / max(len(timed), 1), 2),
            "rollout_tok_s": round(tokens / seconds, 1) if seconds else None,
            "first_step_s": round(step_ends[0] - started, 1) if step_ends else None,
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def time_rollouts(trainer) -> list[dict]:
    """Time each of the trainer's rollout calls (TRL's `_generate`, which calls the rollout_func or its own
    generation): the list it returns fills with {step, seconds, tokens, answers} per call."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rollouts, generate = [], trainer._generate

    def timed_generate(prompts):
        sync()
        started = time.perf_counter()
        result = generate(prompts)
        sync()
        seconds = time.perf_counter() - started
        tokens = trainer._metrics["train"]["completions/mean_length"][-1] * len(prompts)
        rollouts.append({"step": trainer.state.global_step, "seconds": seconds, "tokens": tokens,
                         "answers": len(prompts)})
        return result

    trainer._generate = timed_generate
    return rollouts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # one mode, in this process
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--completion", type=int, default=512)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args.mode, args.steps, args.completion, args.tiny)), flush=True)
        return 0
    from common import provenance

    runs = []
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                   "--completion", str(args.completion)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        runs.append(json.loads(line[7:]) if line else {"mode": mode, "error": (done.stderr or done.stdout)[-2000:]})
        print(json.dumps(runs[-1]), flush=True)
        result = {"runs": runs, "provenance": provenance()}
        if args.out:  # after every mode: a call cut off keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1))
    speed = {r["mode"]: r.get("rollout_tok_s") for r in runs}
    if speed.get("engine") and speed.get("trl"):
        print(f"engine / TRL default: {speed['engine'] / speed['trl']:.1f}x rollout tokens per second")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
