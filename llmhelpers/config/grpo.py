"""The GRPO stage's configuration: TRL's `GRPOConfig` as the trainer receives it, nested beside the SFT run it starts
from (a `FinetuneConfig`: the model, its 4-bit loading, the LoRA layout, the tool settings, the output root) and the
few settings no library knows (where the policy starts, which problems it practises on, tool use in rollouts).

    rl_cfg = make_grpo_config(cfg, learning_rate=5e-6, num_generations=8)   # cfg: the SFT run's FinetuneConfig

Its run lives beside the SFT runs, `<output_dir>/runs/grpo-<key settings>-<hash>`: the hash covers what the policy
is trained from (the SFT run's training settings and the starting adapters) and every GRPOConfig field that changes
the trained weights, so re-running resumes, and a changed setting starts its own run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from llmhelpers.config.library import SECRET_FIELDS, keep_accelerator_state, library_settings, non_default_fields
from llmhelpers.config.run_identity import SFT_NOT_TRAINING, RunFolders, read_config_file, short_number

GRPO_CONFIG_NAME = "grpo_config.json"  # saved in the GRPO run's folder (the SFT runs keep finetune_config.json)

# The GRPO recipe: GRPOConfig's arguments where they differ from TRL's defaults, each with why (nanoGPT-style).
GRPO_RECIPE = {
    "learning_rate": 5e-6,  # LoRA on a distilled reasoner: 1e-6 (TRL's full-model default) barely moves the adapters
    "num_generations": 8,  # answers per problem: the group whose mean is each answer's baseline
    "per_device_train_batch_size": 8,  # completions per micro-batch: one problem's group
    "gradient_accumulation_steps": 4,  # 4 problems per optimizer step
    "max_completion_length": 4096,  # R1 answers run long; a cut answer scores 0 and is masked (below)
    "mask_truncated_completions": True,  # an answer cut by the budget says nothing about its correctness
    "temperature": 0.6,  # the model authors' sampling, as in evaluation (R1 loops at temperature 1)
    "top_p": 0.95,
    "beta": 0.0,  # no KL term and no reference model (DAPO, Dr. GRPO): half the forward passes
    "reward_weights": [1.0, 0.1],  # correct, format (llmhelpers.training.rewards.reward_functions)
    "max_steps": 200,
    "warmup_steps": 10,
    "lr_scheduler_type": "constant_with_warmup",
    "logging_steps": 1,  # each step's rewards in TensorBoard
    "save_steps": 20,
    "save_total_limit": 3,
    "report_to": "tensorboard",
    "optim": "adamw_torch_fused",
    "activation_checkpointing": True,
    "bf16": True,
}
# What each profile changes (as configs/<profile>.yaml does for SFT). The small profile's were measured on SmolLM2:
# lr 2e-5 chosen on validation among 2e-5, 1e-4, 3e-4; 6.5% -> 25.2% on the held-out templates (BENCHMARKS.md).
PROFILE_CHANGES = {
    "small": {"max_completion_length": 256, "learning_rate": 2e-5, "bf16": False, "optim": "adamw_torch",
              "max_steps": 60, "save_steps": 10, "temperature": 1.0, "top_p": 1.0},
    "smoke": {"max_completion_length": 16, "num_generations": 2, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 1, "max_steps": 2, "save_steps": 1, "warmup_steps": 0, "bf16": False,
              "optim": "adamw_torch", "activation_checkpointing": False, "report_to": "none"},
}
START_CHOICES = ("sft", "base")  # or a folder of saved adapters
NOT_TRAINING = {"engine_rollouts"}  # GRPO run settings that do not change what is trained (the run id)


@dataclass(frozen=True)
class GRPORunConfig(RunFolders):
    sft_run: typing.Any  # the SFT run's FinetuneConfig: model, 4-bit, LoRA layout, tools, output root
    grpo: typing.Any  # trl.GRPOConfig (its output_dir is the root; the trainer writes to run_dir)
    # Where the policy starts: "sft" = the SFT run's saved adapters (its final/ folder), "base" = fresh LoRA on the
    # base model, or a folder of saved adapters (with the same LoRA layout).
    start_from: str = "sft"
    problems: str = ""  # a .jsonl of problems with gold answers ("" = the SFT run's training problems)
    max_problems: int = 0  # 0 = all of them
    # python blocks in rollouts run in the sandbox and their output is appended, as in evaluation; those tokens are
    # left out of the policy loss (written by the interpreter, not the policy)
    tool_rollouts: bool = True
    # Rollouts on the generation engine (continuous batching, CUDA graphs) over a merged copy of the policy, refreshed
    # after each optimizer step (llmhelpers.model.merging.MergedPolicy: one more copy of the model in the compute
    # dtype); "auto": on a CUDA GPU for the architectures the engine runs, "on", "off" (the training model's
    # model.generate, as TRL does). A speed setting: it does not change the run id.
    engine_rollouts: str = "auto"

    config_name: typing.ClassVar[str] = GRPO_CONFIG_NAME

    def __post_init__(self):
        if self.start_from not in START_CHOICES and not Path(self.start_from).is_dir():
            raise ValueError(f"start_from={self.start_from!r} is invalid: 'sft', 'base' or a folder of saved adapters")
        if self.max_problems < 0:
            raise ValueError(f"max_problems={self.max_problems} is invalid: must be >= 0 (0 = all)")
        if self.engine_rollouts not in ("auto", "on", "off"):
            raise ValueError(f"engine_rollouts={self.engine_rollouts!r} is invalid: 'auto', 'on' or 'off'")
        if len(self.grpo.reward_weights or [1.0, 1.0]) != 2:
            raise ValueError(f"reward_weights={self.grpo.reward_weights} is invalid: two weights (correct, format)")

    # --- what other steps read --------------------------------------------------------------------------------------
    @property
    def trainer_config(self):
        return self.grpo

    @property
    def output_dir(self) -> str:
        return self.sft_run.output_dir

    @property
    def profile(self) -> str:
        return self.sft_run.profile

    @property
    def seed(self) -> int:
        return self.grpo.seed

    @property
    def start_adapters(self) -> Path | None:
        """The adapters a new run starts from (None: fresh LoRA weights)."""
        if self.start_from == "base":
            return None
        return self.sft_run.final_dir if self.start_from == "sft" else Path(self.start_from)

    # --- the run ----------------------------------------------------------------------------------------------------
    def training_settings(self) -> dict:
        own = {k: v for k, v in self.project_settings().items() if k not in NOT_TRAINING}
        if self.start_from not in START_CHOICES:
            own["start_from"] = _adapter_digest(Path(self.start_from))  # the weights, not the folder's name
        grpo = {k: v for k, v in library_settings(self.grpo).items() if k not in SFT_NOT_TRAINING}
        return {"rl": own, "sft_run": self.sft_run.training_settings(), "grpo": grpo}

    @property
    def run_id(self) -> str:
        return hashlib.sha1(json.dumps(self.training_settings(), sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_name(self) -> str:
        g = self.grpo
        length = f"s{g.max_steps}" if g.max_steps > 0 else f"ep{short_number(g.num_train_epochs)}"
        return f"grpo-lr{short_number(g.learning_rate)}_g{g.num_generations}_{length}-{self.run_id}"

    def trainer_args(self):
        """The GRPOConfig the trainer runs with: output_dir pointed at this run's folder, no secret."""
        return replace_grpo(self.grpo, output_dir=str(self.run_dir),
                            **{k: None for k in SECRET_FIELDS if getattr(self.grpo, k, None)})

    # --- what is shown and saved ------------------------------------------------------------------------------------
    def project_settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("sft_run", "grpo")}

    def index_settings(self) -> tuple[dict, dict]:
        """(key settings, changed settings) for the runs index."""
        g = self.grpo
        key = {"learning_rate": g.learning_rate, "num_generations": g.num_generations, "max_steps": g.max_steps,
               "max_completion_length": g.max_completion_length, "start_from": self.start_from,
               "model_id": self.sft_run.model_id, "stage": "grpo"}
        return key, {k: v for k, v in non_default_fields(g).items() if k != "output_dir"}

    def summary(self) -> str:
        g = self.grpo
        return (f"GRPO from {self.start_from} ({self.start_adapters or 'fresh LoRA'}) on "
                f"{self.problems or 'the SFT run training problems'}"
                f"  |  run folder {self.run_dir}\n"
                f"lr {g.learning_rate}, {g.num_generations} answers per problem, "
                f"{g.per_device_train_batch_size * g.gradient_accumulation_steps // g.num_generations} problems per "
                f"step, up to {g.max_completion_length} tokens at temperature {g.temperature}, beta {g.beta}, "
                f"reward weights {g.reward_weights}, tool rollouts {'on' if self.tool_rollouts else 'off'}")

    def to_dict(self) -> dict:
        return {**self.project_settings(), "sft_run": self.sft_run.to_dict(), "grpo": non_default_fields(self.grpo)}

    @classmethod
    def load(cls, path: str | Path) -> "GRPORunConfig":
        """A GRPO run's saved grpo_config.json."""
        from trl import GRPOConfig

        from llmhelpers.config.project import FinetuneConfig

        data = read_config_file(path)
        if not isinstance(data.get("grpo"), dict) or not isinstance(data.get("sft_run"), dict):
            raise ValueError(f"config file {path}: not a GRPO run's config (its grpo and sft_run objects)")
        arguments = data.pop("grpo")
        if arguments.get("steps_per_generation") is not None:  # GRPOConfig derived the other one from it
            arguments.pop("generation_batch_size", None)
        with keep_accelerator_state():
            grpo = GRPOConfig(**arguments)
        return cls(sft_run=FinetuneConfig.from_dict(data.pop("sft_run")), grpo=grpo, **data)

    def replace(self, **changes) -> "GRPORunConfig":
        """A copy with `changes`, each to this config's own fields or to the GRPOConfig."""
        own = {k: v for k, v in changes.items() if k in GRPO_RUN_FIELDS}
        grpo = {k: v for k, v in changes.items() if k not in GRPO_RUN_FIELDS}
        unknown = set(grpo) - grpo_fields()
        if unknown:
            raise ValueError(f"unknown GRPO setting(s): {', '.join(sorted(unknown))}")
        if grpo:
            own["grpo"] = replace_grpo(self.grpo, **grpo)
        return dataclasses.replace(self, **own)


GRPO_RUN_FIELDS = {f.name for f in dataclasses.fields(GRPORunConfig) if f.name not in ("sft_run", "grpo")}


def replace_grpo(grpo, **changes):
    """dataclasses.replace for a GRPOConfig: its __post_init__ fills generation_batch_size and steps_per_generation
    from each other and refuses both set, so the derived one is cleared first (and steps_per_generation too where it
    only followed gradient_accumulation_steps, TRL's default)."""
    derived = {}
    if "generation_batch_size" not in changes:
        derived["generation_batch_size"] = None
        if "steps_per_generation" not in changes and grpo.steps_per_generation == grpo.gradient_accumulation_steps:
            derived["steps_per_generation"] = None
    with keep_accelerator_state():
        return dataclasses.replace(grpo, **{**derived, **changes})


def grpo_fields() -> set[str]:
    from trl import GRPOConfig

    return {f.name for f in dataclasses.fields(GRPOConfig) if f.init}


def grpo_recipe(profile: str) -> dict:
    """GRPOConfig's arguments for `profile`: the recipe with the profile's changes."""
    return {**GRPO_RECIPE, **PROFILE_CHANGES.get(profile, {})}


def apply_grpo_profile(profile: str, grpo):
    """`grpo` (a GRPOConfig written in a notebook cell) with `profile`'s changes where the cell still holds the
    recipe's value (a value written otherwise is kept), as configs/<profile>.yaml does for the SFT configs."""
    changes = {k: v for k, v in PROFILE_CHANGES.get(profile, {}).items()
               if _plain(getattr(grpo, k)) == _plain(GRPO_RECIPE.get(k, _grpo_default(k)))}
    return replace_grpo(grpo, **changes) if changes else grpo


def _plain(value):
    return getattr(value, "value", value)


def _grpo_default(name: str):
    from trl import GRPOConfig

    return {f.name: f.default for f in dataclasses.fields(GRPOConfig)}[name]


def make_grpo_config(sft_run, grpo=None, **overrides) -> GRPORunConfig:
    """The GRPO run's config from the SFT run's: `grpo` (a GRPOConfig built in a notebook cell) as it is, or the
    recipe for the SFT run's profile; `overrides` set this config's own fields or GRPOConfig's."""
    from trl import GRPOConfig

    own = {k: v for k, v in overrides.items() if k in GRPO_RUN_FIELDS}
    library = {k: v for k, v in overrides.items() if k not in GRPO_RUN_FIELDS}
    if grpo is None:
        import torch

        arguments = {**grpo_recipe(sft_run.profile), "output_dir": sft_run.output_dir, "seed": sft_run.seed,
                     "use_cpu": not torch.cuda.is_available(), **library}
        with keep_accelerator_state():
            grpo = GRPOConfig(**arguments)
    elif library:
        raise ValueError(f"{next(iter(library))}: set it where the GRPOConfig is built, not among the overrides")
    return GRPORunConfig(sft_run=sft_run, grpo=grpo, **own)


def _adapter_digest(folder: Path) -> str:
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"start_from={str(folder)!r}: no adapter_model.safetensors there (a folder of saved adapters)")
    return hashlib.sha1(weights.read_bytes()).hexdigest()[:12]

