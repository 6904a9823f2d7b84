"""A run's identity: which settings change the trained weights (and so the run), its id (a hash of them) and its
folder name. `FinetuneConfig.run_id`, `run_name` and `training_settings` are these functions."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmhelpers.config.library import library_settings

# Project settings that do not change the trained weights: changing them keeps the same run (and its checkpoints).
NOT_TRAINING = {
    "profile", "tiny_model_dir", "checkpoint_layers", "memory_limit_gib", "fused_lora", "dequantize_once", "compile_layers",
    "allow_one_source",
    "heldout_max", "eval_set", "math500_dataset", "eval_samples", "eval_max_new_tokens", "eval_batch_size", "eval_bf16",
    "eval_do_sample", "eval_temperature", "eval_top_p", "eval_kv_cache_dtype", "eval_decode_kernels", "eval_limit", "tool_execution", "eval_without_tools",
    "tool_timeout", "tool_max_calls", "tool_workers", "tool_max_sandboxes", "accuracy_callback",
    "accuracy_callback_size", "merge_after_training", "gguf_outtype", "hub_repo_id", "hub_private",
}
# SFTConfig fields that say where, how often or how verbosely to write, not what is trained.
SFT_NOT_TRAINING = {
    "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
    "report_to", "run_name", "project", "trackio_space_id", "save_total_limit", "per_device_eval_batch_size",
    "eval_accumulation_steps", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
    "save_on_each_node", "local_rank", "ddp_backend", "ddp_timeout", "use_cpu", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision",
    "dataset_num_proc", "overwrite_output_dir",
}


def training_settings(cfg) -> dict:
    """Everything the trained weights depend on: project fields, and every library field but the few that only say
    where and how often to write, log or evaluate."""
    out = {k: v for k, v in cfg.project_settings().items() if k not in NOT_TRAINING}
    out["bnb"] = library_settings(cfg.bnb)
    out["lora"] = library_settings(cfg.lora)
    out["sft"] = {k: v for k, v in library_settings(cfg.sft).items() if k not in SFT_NOT_TRAINING}
    return out


def run_id(cfg) -> str:
    """A short hash of every setting that changes what is trained: checkpoints live under runs/<run_name>, which ends
    in it, so re-running training with the same settings resumes, while another learning rate or LoRA rank starts
    its own run beside it."""
    return hashlib.sha1(json.dumps(training_settings(cfg), sort_keys=True).encode()).hexdigest()[:10]


def run_name(cfg) -> str:
    """The run's folder and TensorBoard name: the key hyperparameters, then the hash of all of them,
    e.g. lr2e-4_r16_t16k_ep3-1a2b3c4d5e (t16k: 16,384 packed tokens per step; b16: 16 padded sequences)."""
    sft = cfg.sft
    length = f"s{sft.max_steps}" if sft.max_steps > 0 else f"ep{short_number(sft.num_train_epochs)}"
    return f"lr{short_number(sft.learning_rate)}_r{cfg.lora.r}_{step_size_tag(cfg)}_{length}-{run_id(cfg)}"


def step_size_tag(cfg) -> str:
    """What one optimizer step holds: t16k = 16,384 packed tokens, b16 = 16 padded sequences."""
    if cfg.pack_tokens:
        tokens = cfg.pack_tokens * cfg.sft.gradient_accumulation_steps
        return f"t{tokens // 1024}k" if tokens % 1024 == 0 else f"t{tokens}"
    return f"b{cfg.sft.per_device_train_batch_size * cfg.sft.gradient_accumulation_steps}"


def short_number(x: float) -> str:
    """2e-4 -> '2e-4', 1.5e-4 -> '1.5e-4', 3.0 -> '3', 0.5 -> '0.5': compact enough for a folder name."""
    if x == int(x) and abs(x) < 1000:
        return str(int(x))
    if 1e-2 <= abs(x) < 1000:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


class RunFolders:
    """What a run's config (FinetuneConfig, GRPORunConfig) shares: its folders, from `output_dir` and `run_name`,
    and writing it as JSON (`to_dict`) beside them."""

    @property
    def run_dir(self) -> Path:
        """Everything this run writes: checkpoints, TensorBoard logs, adapters, evaluation, merged model."""
        return Path(self.output_dir) / "runs" / self.run_name

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
        return path


def read_config_file(path: str | Path) -> dict:
    """A saved config's JSON object, or a ValueError that names the file and what is wrong with it."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would hang the read, /dev/zero fill the memory
        raise ValueError(f"config file {path}: not a regular file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"config file {path}: cannot read it ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: must hold a JSON object")
    return data
