"""Checks of a `FinetuneConfig`: the project's own fields, and the few things it relies on in the libraries' configs
that they do not check themselves. `FinetuneConfig.__post_init__` calls `check`."""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

from llmhelpers.config.library import (LIBRARY_CLASS_NAMES, LIBRARY_CONFIGS, STEP_INTERVALS, library_settings,
                                       plain_value)


def project_fields(kind) -> frozenset:
    """The project's own fields of a FinetuneConfig class (the library configs left out)."""
    return frozenset(f.name for f in dataclasses.fields(kind) if f.name not in LIBRARY_CONFIGS)


def reject_unknown(keys, known) -> None:
    """An error naming the first key not in `known`, with near names."""
    import difflib

    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"unknown config key {key!r}{hint}")


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _check_types(cfg) -> None:
    hints = typing.get_type_hints(type(cfg))
    for name in project_fields(type(cfg)):
        value, hint = getattr(cfg, name), hints[name]
        if value is None and _optional(hint):
            continue
        base = _base_type(hint)
        ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise TypeError(f"{name} must be {base.__name__}, got {type(value).__name__} {value!r}")
        if base is float and not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is invalid: must be a finite number")


# The linear layers of every R1-Distill-Qwen size (Qwen2ForCausalLM); lm_head is possible but not usual.
QWEN2_LINEAR_LAYERS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "lm_head"})
_CHOICES = {"gguf_outtype": ("", "q8_0", "f16", "bf16"), "dequantize_once": ("auto", "on", "off"),
            "eval_kv_cache_dtype": ("auto", "fp8")}
EVAL_SETS = ("heldout", "math500")  # or a local .jsonl/.json file of problems in MathCodeInstruct's schema


_NUMBER = (int, float)
_LIBRARY_RULES = [  # (config, field, types, rule, why): what would otherwise fail late or train nonsense silently
    ("sft", "learning_rate", _NUMBER, lambda v: v > 0, "must be > 0"),
    ("sft", "max_grad_norm", _NUMBER, lambda v: v > 0, "must be > 0"),
    ("sft", "weight_decay", _NUMBER, lambda v: v >= 0, "must be >= 0"),
    ("sft", "num_train_epochs", _NUMBER, lambda v: v > 0, "must be > 0"),
    ("sft", "max_steps", (int,), lambda v: v == -1 or v > 0, "must be -1 (use epochs) or > 0"),
    ("sft", "per_device_train_batch_size", (int,), lambda v: v > 0, "must be > 0"),
    ("sft", "gradient_accumulation_steps", (int,), lambda v: v > 0, "must be > 0"),
    ("sft", "seed", (int,), lambda v: 0 <= v < 2**32, "must be in [0, 2**32) (numpy's seed range)"),
    ("sft", "bf16", (bool, type(None)), lambda v: True, ""),
    ("bnb", "bnb_4bit_quant_type", (str,), lambda v: v in ("nf4", "fp4"), "must be 'nf4' or 'fp4'"),
    ("lora", "r", (int,), lambda v: v > 0, "must be > 0"),
    ("lora", "lora_alpha", _NUMBER, lambda v: v > 0, "must be > 0"),
    ("lora", "lora_dropout", _NUMBER, lambda v: 0 <= v < 1, "must be in [0, 1)"),
]


def _check_finite(cfg) -> None:
    """No NaN or infinity in any numeric field of the three library configs: a NaN label_smoothing_factor trained
    every adapter value into NaN and the run called itself finished (issue #29)."""
    for key in LIBRARY_CONFIGS:
        for name, value in library_settings(getattr(cfg, key)).items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{name}={v!r} is invalid: must be a finite number ({LIBRARY_CLASS_NAMES[key]})")


def check(cfg) -> None:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    for key, kind in (("bnb", BitsAndBytesConfig), ("lora", LoraConfig), ("sft", SFTConfig)):
        if not isinstance(getattr(cfg, key), kind):
            raise TypeError(f"{key} must be a {kind.__module__.split('.')[0]}.{kind.__name__}, got "
                            f"{type(getattr(cfg, key)).__name__} (make_config builds all three)")
    _check_types(cfg)

    def need(ok: bool, key: str, rule: str):
        if not ok:
            value = getattr(cfg, key) if "." not in key else getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
            raise ValueError(f"{key}={plain_value(value)!r} is invalid: {rule}")

    for key in ("eval_max_new_tokens", "accuracy_callback_size", "eval_samples", "tool_timeout", "tool_max_calls",
                "tool_max_sandboxes"):
        need(getattr(cfg, key) > 0, key, "must be > 0")
    for key in ("math_samples", "science_samples", "heldout_max", "eval_limit", "eval_batch_size", "tool_workers",
                "early_stopping_patience"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0 (0 means all)")
    need(not cfg.early_stopping_patience or (cfg.sft.load_best_model_at_end and cfg.sft.eval_strategy != "no"),
         "early_stopping_patience", "needs evaluation steps and load_best_model_at_end=True (SFTConfig)")
    need(cfg.tool_timeout <= 3600, "tool_timeout", "must be <= 3600 s (a block's wall clock; its CPU limit follows it)")
    need(cfg.checkpoint_layers >= -1, "checkpoint_layers", "must be -1 (chosen by memory) or a number of layers >= 0")
    need(cfg.memory_limit_gib >= 0, "memory_limit_gib", "must be >= 0 (0 = the whole GPU)")
    need(cfg.max_example_tokens >= 64, "max_example_tokens", "must be >= 64 tokens")
    need(0 < cfg.eval_fraction < 1, "eval_fraction", "must be in (0, 1)")
    need(cfg.eval_temperature > 0, "eval_temperature", "must be > 0")
    need(0 < cfg.eval_top_p <= 1, "eval_top_p", "must be in (0, 1]")
    for key in ("model_id", "math_dataset", "science_dataset"):
        need(getattr(cfg, key).strip() != "", key, "must not be empty")
    need(cfg.eval_set in EVAL_SETS or cfg.eval_set.endswith((".jsonl", ".json")), "eval_set",
         f"must be one of {EVAL_SETS} or a .jsonl/.json file of problems in MathCodeInstruct's schema")
    for key, choices in _CHOICES.items():
        need(getattr(cfg, key) in choices, key, f"must be one of {choices}")
    # what the project relies on in the libraries' configs, where the libraries do not check it themselves
    sft, lora = cfg.sft, cfg.lora
    for owner, key, kind, ok, rule in _LIBRARY_RULES:
        value = getattr(getattr(cfg, owner), key)
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in kind:
            names = " or ".join(k.__name__ for k in kind)
            raise TypeError(f"{key} ({LIBRARY_CLASS_NAMES[owner]}) must be {names}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value!r} is invalid: must be a finite number ({LIBRARY_CLASS_NAMES[owner]})")
        if not ok(value):
            raise ValueError(f"{key}={value!r} is invalid: {rule} ({LIBRARY_CLASS_NAMES[owner]})")
    _check_finite(cfg)
    for key in STEP_INTERVALS:  # 0 would mean "never" to no one; TRL takes it
        value = getattr(sft, key)
        if value is not None and not value > 0:
            raise ValueError(f"{key}={value!r} is invalid: must be > 0 (SFTConfig)")
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    unknown = [r for r in (sft.report_to or []) if r not in INTEGRATION_TO_CALLBACK and r not in ("all", "none")]
    if unknown:  # the Trainer would fail only when it is built, after the model and data have loaded
        raise ValueError(f"report_to={unknown[0]!r} is invalid: must be one of "
                         f"{sorted([*INTEGRATION_TO_CALLBACK, 'all', 'none'])} (SFTConfig)")
    need(not sft.push_to_hub, "sft.push_to_hub",
         "must be False: set hub_repo_id, and the project pushes the adapters with their card (the Trainer's own "
         "push would create a repository named after the run folder)")
    need(cfg.bnb.load_in_4bit, "bnb.load_in_4bit", "must be True: this is QLoRA (a 4-bit base under LoRA)")
    need(bool(sft.output_dir) and not Path(sft.output_dir).is_file(), "sft.output_dir",
         "must name a directory (not an existing file)")
    need(sft.max_length is not None and sft.max_length >= cfg.max_example_tokens, "sft.max_length",
         f"must be at least max_example_tokens ({cfg.max_example_tokens}): every kept example fits a row whole "
         "(a longer example is dropped and counted, never cut)")
    need(sft.completion_only_loss is not False, "sft.completion_only_loss",
         "must be True: the loss is on the reasoning and answer only (the prompt is masked)")
    need(not sft.use_liger_kernel, "sft.use_liger_kernel",
         "must be False (deprecated in TRL 1.16): liger_kernels=True applies Liger's kernels through Liger's own API")
    if sft.packing:
        need(sft.per_device_train_batch_size == 1, "sft.per_device_train_batch_size",
             "must be 1 with packing: a micro-batch is one packed row of max_length tokens")
        need(sft.pad_to_multiple_of == sft.max_length, "sft.pad_to_multiple_of",
             f"must equal max_length ({sft.max_length}) with packing: every row has one shape (one compilation)")
        need(sft.packing_strategy == "bfd", "sft.packing_strategy",
             "must be 'bfd' (whole sequences; 'wrapped' cuts them)")
    need(sft.save_total_limit is None or sft.save_total_limit >= 2 or not sft.load_best_model_at_end,
         "sft.save_total_limit", "must be >= 2 with load_best_model_at_end, so that both the best and the latest "
         "checkpoint (to resume) are kept")
    modules = lora.target_modules
    names = {modules} if isinstance(modules, str) else set(modules or ())
    need(names == {"all-linear"} or (names and names <= QWEN2_LINEAR_LAYERS), "lora.target_modules",
         f"must be 'all-linear' or names among {sorted(QWEN2_LINEAR_LAYERS)}")
