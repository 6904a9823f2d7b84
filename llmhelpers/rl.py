"""Reinforcement learning after SFT from the command line: the notebook's GRPO section (llmhelpers.training.grpo).

    python -m llmhelpers.rl --profile small                      # GRPO from the small profile's SFT run's adapters
    python -m llmhelpers.rl --config outputs/small/runs/<sft run>/finetune_config.json --learning_rate 1e-5
    python -m llmhelpers.rl --profile small --problems data/small/heldout_templates.jsonl --evaluate

The SFT run it starts from is --profile's recipe or --config (a saved FinetuneConfig: its model, 4-bit loading, LoRA
layout, tool settings and output folder). Every GRPOConfig field is a flag of its own name (--learning_rate,
--num_generations, --max_completion_length, --beta, --reward_weights 1.0 0.1), as are the GRPO run's own settings
(--start_from, --problems, --max_problems, --tool_rollouts); defaults come from the GRPO recipe
(llmhelpers.config.grpo.GRPO_RECIPE) for that profile. Re-running the command resumes the run (one writer at a time);
--fresh starts it over. With --evaluate, the starting adapters and the GRPO adapters are graded with tools on the SFT
run's evaluation set (its eval_set, R1 protocol; never the problems GRPO practised on) and the table printed.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

from llmhelpers.config.arguments import _fail, _negative_values_attached, _suggestion, field_comments

PROG = "llmhelpers.rl"


@dataclass
class RLArguments:
    profile: str = field(default="full", metadata={"help": "the SFT run's profile (configs/<profile>.yaml)"})
    config: str | None = field(default=None, metadata={"help": "the SFT run's saved finetune_config.json instead"})
    fresh: bool = field(default=False, metadata={"help": "start over: move this GRPO run's folder aside first"})
    evaluate: bool = field(default=False, metadata={"help": "grade the starting and the GRPO adapters afterwards"})


def _run_arguments():
    from llmhelpers.config.grpo import GRPORunConfig

    comments = field_comments(GRPORunConfig)
    hints = {"start_from": str, "problems": str, "max_problems": int, "tool_rollouts": bool, "engine_rollouts": str}
    return dataclasses.make_dataclass("GRPORunArguments", [
        (f.name, hints[f.name], field(default=f.default, metadata={"help": comments.get(f.name, "")}))
        for f in dataclasses.fields(GRPORunConfig) if f.name in hints])


def parse(argv: list[str] | None):
    """(RLArguments, GRPORunConfig) from the command line; a bad flag or value exits with one line (code 2)."""
    import argparse

    from transformers import HfArgumentParser
    from trl import GRPOConfig

    from llmhelpers.config.grpo import GRPORunConfig, grpo_recipe
    from llmhelpers.config.library import keep_accelerator_state
    from llmhelpers.config.profiles import make_config
    from llmhelpers.config.project import FinetuneConfig

    argv = _negative_values_attached(sys.argv[1:] if argv is None else list(argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--profile", default="full")
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        sft_run = FinetuneConfig.load(known.config) if known.config else make_config(known.profile)
    except (TypeError, ValueError) as err:
        _fail(PROG, str(err))
    parser = HfArgumentParser((RLArguments, _run_arguments(), GRPOConfig), prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: _fail(PROG, message)
    parser.allow_abbrev = False
    import torch

    defaults = {**grpo_recipe(sft_run.profile), "output_dir": sft_run.output_dir, "seed": sft_run.seed,
                "use_cpu": not torch.cuda.is_available()}
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in dests})
    try:
        with keep_accelerator_state():
            args, own, grpo, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if rest:
            raise ValueError(f"unrecognized arguments: {' '.join(rest)}{_suggestion(rest[0], dests)}")
        rl_cfg = GRPORunConfig(sft_run=sft_run, grpo=grpo, **vars(own))
    except (TypeError, ValueError) as err:
        _fail(PROG, str(err))
    return args, rl_cfg


def run(rl_cfg, evaluate_after: bool = False) -> dict:
    """Load the SFT run's model with its LoRA layout, build the problems and the trainer, train in the run, save the
    adapters; with evaluate_after, grade the starting and the GRPO adapters on the SFT run's evaluation set."""
    from llmhelpers.data.sources import build_datasets, load_examples
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.grpo import build_grpo_trainer, load_problems, reward_history, save_grpo_adapters
    from llmhelpers.training.rewards import rl_dataset
    from llmhelpers.training.run import run_training

    sft_run = rl_cfg.sft_run
    tokenizer = load_tokenizer(sft_run)
    needs_data = not rl_cfg.problems or (evaluate_after and sft_run.eval_set == "heldout")
    data = build_datasets(sft_run, tokenizer, load_examples(sft_run)) if needs_data else None
    problems = load_problems(rl_cfg, data)  # bad data fails here, before the model is loaded
    model = attach_lora(load_base_model(sft_run), sft_run)
    trainer = build_grpo_trainer(rl_cfg, model, tokenizer, rl_dataset(problems, tokenizer))
    print(rl_cfg.summary())
    output = run_training(trainer, rl_cfg)
    result = {"global_step": output.global_step, "run_dir": str(rl_cfg.run_dir),
              "reward_curve": reward_history(trainer)}
    if getattr(trainer, "llm_already_finished", False) and rl_cfg.final_dir.exists():
        print(f"kept {rl_cfg.final_dir} (written when this run finished; start over with --fresh to replace it)")
        adapter_dir = rl_cfg.final_dir
    else:
        adapter_dir = save_grpo_adapters(trainer.model, tokenizer, rl_cfg)
    result["adapter_dir"] = str(adapter_dir)
    if evaluate_after:
        from llmhelpers.evaluation.protocol import evaluation_set

        del trainer, model
        result["accuracy"] = evaluate_policies(rl_cfg, tokenizer, evaluation_set(data, sft_run), adapter_dir)
    return result


def evaluate_policies(rl_cfg, tokenizer, problems, adapter_dir) -> dict:
    """Accuracy with tools (R1 protocol) of the adapters GRPO started from and of the GRPO adapters, on `problems`
    (the SFT run's evaluation set: never the problems GRPO practised on)."""
    from llmhelpers.evaluation.protocol import comparison_table, evaluate, finetuned_for_evaluation

    from llmhelpers.training.grpo import starting_adapters

    sft_run = rl_cfg.sft_run
    policies = {"grpo": adapter_dir}
    start = starting_adapters(rl_cfg)
    if start is not None:
        policies = {"sft" if rl_cfg.start_from == "sft" else "start": start, **policies}
    results = []
    for label, folder in policies.items():
        with finetuned_for_evaluation(sft_run, adapter_dir=folder) as model:
            results.append(evaluate(model, tokenizer, problems, sft_run, label, rl_cfg.run_dir / "eval",
                                    tool_execution=True))
    print(comparison_table(results))
    return {r.label: r.accuracy for r in results}


def main(argv: list[str] | None = None) -> int:
    from llmhelpers.training import run as run_module

    args, rl_cfg = parse(argv)
    notebook_words = dict(run_module.WORDS)
    run_module.WORDS.update({"start over": "re-run this command with --fresh", "resume": "re-run this command"})
    try:
        return _main(args, rl_cfg)
    finally:
        run_module.WORDS.update(notebook_words)


def _main(args, rl_cfg) -> int:
    from llmhelpers.data.sources import DataError
    from llmhelpers.storage import DiskSpaceError
    from llmhelpers.training.checkpoints import CheckpointError
    from llmhelpers.training.run import TrainingInterrupted, start_over
    from llmhelpers.training.run_lock import RunLockedError
    from llmhelpers.training.trainer import TrainingDiverged

    if args.fresh:
        start_over(rl_cfg)
    try:
        result = run(rl_cfg, evaluate_after=args.evaluate)
    except (DataError, RunLockedError, CheckpointError, DiskSpaceError, FileNotFoundError, TrainingDiverged,
            ValueError) as err:
        sys.stderr.write(f"{PROG}: error: {err}\n")
        return 1
    except TrainingInterrupted as err:
        sys.stderr.write(f"{PROG}: {err}\n")
        return 130
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
