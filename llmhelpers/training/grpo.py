"""Reinforcement learning after SFT: TRL's GRPOTrainer in a run of the project's, its rollouts drawn by the project's
generation (tool execution in the sandbox included), its rewards from the project's grading.

The notebook's GRPO cells read

    rl_cfg = make_grpo_config(cfg, learning_rate=5e-6)                        # llmhelpers.config.grpo
    rl_trainer = ResumableGRPOTrainer(model=model, args=rl_cfg.trainer_args(), reward_funcs=reward_functions(),
                                      train_dataset=rl_data, processing_class=tokenizer,
                                      rollout_func=ProjectRollouts(tokenizer, rl_cfg))
    with TrainingRun(rl_trainer, rl_cfg) as run:                              # the SFT runs' lifecycle, unchanged
        rl_result = rl_trainer.train(resume_from_checkpoint=run.checkpoint)

- **Rollouts** (`ProjectRollouts`): each problem's answers come from `llmhelpers.inference.generation.generate` with
  GRPOConfig's temperature, top-p and budget; with `tool_rollouts`, python blocks run in the sandbox and their output
  is appended, as in evaluation. The interpreter's tokens go back to TRL as `env_mask` zeros: the policy loss leaves
  them out, as SFT's `mask_tool_output` does. Each step's sampling seed is (seed, step): a resumed run draws the
  same answers the uninterrupted one drew.
- **Exact resume, one writer, the runs index**: `RunTrainer` and `TrainingRun`, as for SFT.
"""
from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from trl import GRPOTrainer

from llmhelpers.training.trainer import DiskGuard, RunTrainer, ThroughputMeter

# GRPOTrainer's members ResumableGRPOTrainer reads (tests/test_training.py checks them in the installed TRL)
GRPO_PRIVATE_MEMBERS = {
    ("GRPOTrainer", "self._metrics"): "read and reset: TRL's per-mode metric lists",
    ("GRPOTrainer", "self._buffered_inputs"): "cleared: rollouts of an interrupted call are not reused",
}


class ResumableGRPOTrainer(RunTrainer, GRPOTrainer):
    """TRL's GRPOTrainer in a run (RunTrainer: fp32 LoRA, checkpoints that are complete or ignored, the run's loss
    sums, a second `train` call after an interrupt, non-finite steps stopping the run)."""

    def __init__(self, *args, **kwargs):
        import os
        import warnings

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's "experimental" warning, every run
        # TRL 1.16 calls transformers' old names around generation: two FutureWarnings per step, nothing to act on
        warnings.filterwarnings("ignore", message="`gradient_checkpointing_(enable|disable)` is deprecated",
                                category=FutureWarning)
        super().__init__(*args, **kwargs)
        self._init_run()
        self.callback_handler.callbacks.insert(0, DropEmptyLogs())  # before TensorBoard's callback reads them

    def starting_adapters(self, rl_cfg):
        return starting_adapters(rl_cfg)

    def _start_afresh(self) -> None:
        super()._start_afresh()
        self._buffered_inputs = None  # rollouts drawn before the interrupt belong to the steps trained again
        if isinstance(self.rollout_func, ProjectRollouts):
            self.rollout_func.merged_step = None  # the checkpoint's weights replace the ones it holds


class DropEmptyLogs(TrainerCallback):
    """TRL logs None for a clip-ratio extreme that no token reached; TensorBoard refuses it with a warning per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in [k for k, v in (logs or {}).items() if v is None]:
            del logs[key]


class ProjectRollouts:
    """GRPOTrainer's `rollout_func`: the answers to a batch of prompts, drawn by the project's generation.

    TRL passes the prompts of this process, each repeated num_generations times; one answer per entry comes back,
    with its token ids and, with tool rollouts, which tokens the interpreter wrote (`env_mask` 0)."""

    def __init__(self, tokenizer, rl_cfg):
        self.tokenizer, self.cfg = tokenizer, rl_cfg
        self.last: list = []  # the last batch's Generation records (tool runs, budget hits): what a cell can show
        self.merged = None  # the engine's merged copy of the policy (engine_rollouts)
        self.merged_step: int | None = None  # the optimizer step whose weights it holds

    def policy(self, trainer):
        """The model the answers are drawn from: the training model, or (engine_rollouts) its merged copy, brought
        up to this step's weights."""
        if not self.uses_engine(trainer.model):
            return trainer.model
        from llmhelpers.model.merging import MergedPolicy

        step = trainer.state.global_step
        if self.merged is None:
            self.merged = MergedPolicy(trainer.model)
        elif self.merged_step != step:
            self.merged.refresh()
        self.merged_step = step
        return self.merged.model

    def uses_engine(self, model) -> bool:
        import torch

        setting = self.cfg.engine_rollouts
        if setting == "off" or not hasattr(model, "get_base_model"):
            return False
        architecture = type(model.get_base_model()).__name__
        from llmhelpers.inference.engine import ARCHITECTURES

        if architecture not in ARCHITECTURES:
            if setting == "on":
                raise ValueError(f"engine_rollouts='on': the engine runs {', '.join(ARCHITECTURES)}, not "
                                 f"{architecture}; use 'auto' or 'off'")
            return False
        return setting == "on" or torch.cuda.is_available()

    def __call__(self, prompts: list, trainer) -> dict:
        from llmhelpers.inference.generation import generate
        from llmhelpers.inference.sampling import SamplingParams
        from llmhelpers.inference.tool_use import tool_runner

        args = trainer.args
        step = trainer.state.global_step
        # one seed per (run seed, step, train or eval, process): a resumed run draws the answers the uninterrupted one
        # drew (TRL generates once per optimizer step: steps_per_generation micro-batches come from one call)
        seed = ((args.seed * 1_000_003 + step) * 2 + (not trainer.model.training)) * 64 + args.process_index
        sampling = SamplingParams(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                                  top_p=args.top_p, seed=seed % 2**63)
        texts = [p if isinstance(p, str) else self.tokenizer.apply_chat_template(p, tokenize=False,
                                                                                 add_generation_prompt=True)
                 for p in prompts]
        with tool_runner(self.tokenizer, self.cfg.sft_run, on=self.cfg.tool_rollouts) as tools:
            generations = generate(self.policy(trainer), self.tokenizer, texts, sampling, tools=tools)
        self.last = generations
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        out = {"prompt_ids": prompt_ids, "completion_ids": [g.ids for g in generations], "logprobs": None}
        if self.cfg.tool_rollouts:
            out["env_mask"] = [g.model_token_mask() for g in generations]
            trainer._metrics["train"]["tools/calls_per_answer"].append(
                sum(g.tool_calls for g in generations) / max(len(generations), 1))
        return out


def starting_adapters(rl_cfg):
    """The adapters a GRPO run starts from: the SFT run's (its final/ folder, or the finished run's final checkpoint
    when they were never saved there), a folder given as start_from, or None (fresh LoRA on the base)."""
    from llmhelpers.training.checkpoints import trained_adapters

    return trained_adapters(rl_cfg.sft_run) if rl_cfg.start_from == "sft" else rl_cfg.start_adapters


def load_problems(rl_cfg, data=None) -> list:
    """The problems GRPO practises on, capped at max_problems: rl_cfg.problems (a file), or the SFT run's training
    problems (`data`, what build_datasets returned; built here when not given). Never the evaluation problems."""
    from llmhelpers.data.sources import load_problem_file

    if rl_cfg.problems:
        examples, _ = load_problem_file(rl_cfg.problems)
    else:
        if data is None:
            from llmhelpers.data.sources import build_datasets, load_examples
            from llmhelpers.model.loading import load_tokenizer

            data = build_datasets(rl_cfg.sft_run, load_tokenizer(rl_cfg.sft_run), load_examples(rl_cfg.sft_run))
        examples = list(data.train_examples)
    return examples[:rl_cfg.max_problems] if rl_cfg.max_problems else examples


def build_grpo_trainer(rl_cfg, model, tokenizer, dataset, callbacks=(), reward_funcs=None):
    """The notebook's GRPO trainer cell in one call (the CLI and the tests)."""
    from llmhelpers.training.rewards import reward_functions

    return ResumableGRPOTrainer(
        model=model,
        args=rl_cfg.trainer_args(),
        # correct (1/0 by the project's grading), format (closed thinking, one box), in reward_weights' order
        reward_funcs=reward_funcs or reward_functions(),
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=ProjectRollouts(tokenizer, rl_cfg),
        callbacks=[ThroughputMeter(), DiskGuard(rl_cfg, model), *callbacks],
    )


def save_grpo_adapters(model, tokenizer, rl_cfg) -> Path:
    """The GRPO policy's adapters in the run's final/ folder, loadable as the SFT run's are (its finetune_config.json:
    the same base and LoRA layout), with the GRPO config beside them."""
    from llmhelpers.storage import save_model_folder
    from llmhelpers.training.checkpoints import checkpoint_bytes
    from llmhelpers.training.runs import record_run

    saved = save_model_folder(model, tokenizer, rl_cfg.sft_run, rl_cfg.final_dir, checkpoint_bytes(model, rl_cfg),
                              "saving the GRPO adapters")
    rl_cfg.save(saved / rl_cfg.config_name)
    record_run(rl_cfg, adapter_dir=str(saved))
    return saved


def reward_history(trainer_or_dir) -> dict[str, list]:
    """{'step', 'reward', 'correct', 'format'} per logged step: the reward curve."""
    from llmhelpers.training.run import logged_rows

    out = {"step": [], "reward": [], "correct": [], "format": []}
    for row in logged_rows(trainer_or_dir):
        if "reward" in row:
            out["step"].append(row["step"])
            out["reward"].append(row["reward"])
            out["correct"].append(row.get("rewards/correct/mean"))
            out["format"].append(row.get("rewards/format/mean"))
    return out
