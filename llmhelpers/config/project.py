"""One frozen config object that feeds every builder: quantization, LoRA, trainer, data.

Defaults are the seed plan's hyperparameters; the comments say why each is what it is.
`make_config(profile, **overrides)` is the only way the notebook and the CLI build one,
and an unknown key or an invalid value is an error that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from llmhelpers.model.tiny import TINY_MODEL_ID

CONFIG_NAME = "finetune_config.json"  # the config saved beside checkpoints, adapters and merged weights


@dataclass(frozen=True)
class FinetuneConfig:
    profile: str = "full"  # the PROFILES entry this config starts from; make_config sets it

    # --- model -------------------------------------------------------------------------
    model_id: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    model_revision: str | None = None  # pin a Hub commit for reproducible runs
    trust_remote_code: bool = False  # Qwen2 is native to transformers; never run Hub code unasked
    tiny_model_dir: str = ""  # where the smoke profile builds its local tiny model ("" = <output_dir>/tiny-r1)

    # --- 4-bit quantization (QLoRA) -----------------------------------------------------
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"  # NF4 suits normally distributed weights (QLoRA paper)
    bnb_4bit_use_double_quant: bool = True  # quantizes the quantization constants too: ~0.4 bit/param saved
    bnb_4bit_compute_dtype: str = "bfloat16"  # matmuls run in bf16 after dequantization

    # --- LoRA ---------------------------------------------------------------------------
    lora_r: int = 16  # reasoning data benefits from more capacity than the usual r=8
    lora_alpha: int = 32  # alpha = 2r keeps the update scale at 2
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"  # q,k,v,o,gate,up,down in every layer

    # --- optimisation -------------------------------------------------------------------
    learning_rate: float = 2e-4  # the usual QLoRA rate; lower it for longer runs
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03  # fraction of the steps spent warming up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Padding-free micro-batches: whole sequences packed into one row of this many tokens (best-fit decreasing, none
    # cut), each attending only to itself (llmhelpers.training.packing); no compute is spent on padding. One optimizer step is
    # pack_tokens x gradient_accumulation_steps tokens: 16,384 hold ~28 of the real rows (mean 570 tokens). Rows of
    # 16,384 tokens ran at 2.0x the speed of 8,192 on an H200 (the 4-bit weights are dequantized once per row, so
    # bigger rows amortize it; BENCHMARKS.md). 0 = padded micro-batches of per_device_train_batch_size sequences.
    pack_tokens: int = 16384
    # Used only with pack_tokens=0: 16 sequences per optimizer step, as in the seed plan (2 x 8), in one micro-batch.
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs (the smoke profile uses this)
    max_length: int = 2048  # longer examples are dropped and counted, never truncated
    optim: str = "paged_adamw_8bit"  # 8-bit states, paged to CPU under memory pressure
    bf16: bool = True
    gradient_checkpointing: bool = True  # non-reentrant: required with a frozen 4-bit base
    # How many decoder layers recompute their activations: -1 = as few as fit the worst batch in memory, measured on
    # the GPU before step 1 (llmhelpers.training.memory; all of them on a CPU); 0..layers = exactly that many.
    checkpoint_layers: int = -1
    memory_limit_gib: float = 0.0  # GPU memory the run may use (0 = all of it); e.g. 22 to fit a 24 GB card
    # peft's prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, which makes the
    # residual stream fp32 and doubles checkpointed activations. Keeping them bf16 halves that memory with the
    # same loss (bench/train_throughput.py checks it); the seed profile keeps the upcast.
    upcast_to_fp32: bool = False
    # MathCodeInstruct's ```output blocks were written by an interpreter, not the model: train on the code and
    # the opening fence, never on predicting what the interpreter prints (MathCoder executes the code at inference).
    mask_tool_output: bool = True
    group_by_length: bool = True  # batches of similar lengths: far less padding (seed plan: random order)
    use_liger_kernel: bool = True  # fused RMSNorm/SwiGLU/RoPE Triton kernels; applied only on CUDA

    # --- evaluation, checkpoints, logging -------------------------------------------------
    eval_steps: int = 200
    save_steps: int = 200  # must be a multiple of eval_steps to keep the best checkpoint
    logging_steps: int = 10
    save_total_limit: int = 3
    load_best_model_at_end: bool = True  # keeps and restores the lowest eval_loss checkpoint
    metric_for_best_model: str = "eval_loss"
    report_to: str = "tensorboard"
    seed: int = 42

    # --- data -----------------------------------------------------------------------------
    # A Hub id, a local .json/.jsonl file, or a folder of them.
    math_dataset: str = "MathLLMs/MathCodeInstruct"
    science_dataset: str = "xw27/scibench"
    dataset_revision: str | None = None
    allow_one_source: bool = False  # True: a source with no usable rows is left out instead of stopping the run
    math_samples: int = 15000  # of ~80k MathCodeInstruct rows
    science_samples: int = 0  # 0 = all; SciBench has only 692 rows, 112 with a worked solution
    eval_fraction: float = 0.1  # 90/10 train/eval split of the training pool
    heldout_max: int = 0  # cap on the held-out accuracy set (0 = all)

    # --- answer-accuracy evaluation ---------------------------------------------------------
    # The model authors' protocol (and open-r1's): sampling at temperature 0.6, top-p 0.95, several answers per
    # problem, long budgets. Greedy decoding makes R1 models loop, and a short budget cuts most answers off, so a
    # fine-tuned model that merely thinks shorter would "win".
    eval_set: str = "heldout"  # "heldout" (eval split + SciBench problems without solutions) or "math500"
    math500_dataset: str = "HuggingFaceH4/MATH-500"  # Hub id or a local .jsonl with MATH-500's fields
    eval_samples: int = 4  # answers per problem: pass@1 is their mean, maj@k their majority vote
    eval_max_new_tokens: int = 8192  # per-answer budget; 32768 is the authors' (set it for final numbers)
    eval_batch_size: int = 0  # 0 = as many sequences (engine slots) as fit 85% of free GPU memory
    eval_bf16: bool = True  # evaluate on bf16 weights (base, then merged adapters): the fast engine runs those
    eval_do_sample: bool = True  # False = greedy (loops on R1 models; only for debugging)
    eval_temperature: float = 0.6  # the model authors' recommendation
    eval_top_p: float = 0.95
    eval_limit: int = 200  # problems per evaluation run (0 = all)
    # Tool execution (MathCoder's inference): python blocks the model writes are run in a sandbox process and their
    # real output is appended before it continues (llmhelpers.inference.tool_use; limits in FINETUNING_GUIDE.md section 9).
    tool_execution: bool = True  # evaluation runs code; False lets the model write its own "output"
    eval_without_tools: bool = True  # also grade the fine-tuned model with tool_execution off (the comparison)
    tool_timeout: float = 10.0  # wall-clock seconds per block (CPU time: this + 2 s); the sandbox is killed after it
    tool_max_calls: int = 8  # executions per answer; later blocks get an error message as their output
    tool_workers: int = 0  # blocks run at once (0 = min(16, CPU cores - 1): one core stays with generation)
    tool_max_sandboxes: int = 64  # interpreter processes alive at once (each holds ~30-100 MB once sympy is in)
    accuracy_callback: bool = False  # accuracy on a small fixed subset at each save
    accuracy_callback_size: int = 16

    # --- outputs ----------------------------------------------------------------------------
    output_dir: str = "outputs/deepseek-r1-math-science"
    merge_after_training: bool = False  # needs ~3.5 GB disk and a bf16 copy of the base
    # --- sharing (notebook section 12) ---------------------------------------------------------------------------
    gguf_outtype: str = ""  # "q8_0", "f16" or "bf16": write merged/ as GGUF for llama.cpp / Ollama ("" = don't)
    hub_repo_id: str = ""  # e.g. "you/r1-math-lora": push the adapters with their card ("" = don't)
    hub_private: bool = True  # a pushed repository is private unless this is False

    # --- derived locations, all under output_dir ---------------------------------------------
    @property
    def run_id(self) -> str:
        """A short hash of every setting that changes what is trained.

        Checkpoints live under runs/<run_name>, which ends in this id, so re-running training with the same settings
        resumes, while `replace(cfg, learning_rate=1e-4)` starts its own run beside it.
        """
        import hashlib

        relevant = {k: v for k, v in self.to_dict().items() if k not in _NOT_TRAINING_KEYS}
        return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_name(self) -> str:
        """The run's folder and TensorBoard name: the key hyperparameters, then the hash of all of them,
        e.g. lr2e-4_r16_t16k_ep3-1a2b3c4d5e (t16k: 16,384 packed tokens per step; b16: 16 padded sequences)."""
        length = f"s{self.max_steps}" if self.max_steps > 0 else f"ep{_short(self.num_train_epochs)}"
        return f"lr{_short(self.learning_rate)}_r{self.lora_r}_{self.step_size_tag}_{length}-{self.run_id}"

    @property
    def step_size_tag(self) -> str:
        """What one optimizer step holds: t16k = 16,384 packed tokens, b16 = 16 padded sequences."""
        if self.pack_tokens:
            tokens = self.pack_tokens * self.gradient_accumulation_steps
            return f"t{tokens // 1024}k" if tokens % 1024 == 0 else f"t{tokens}"
        return f"b{self.per_device_train_batch_size * self.gradient_accumulation_steps}"

    @property
    def run_dir(self) -> Path:
        """Everything this run writes: checkpoints, TensorBoard logs, adapters, evaluation, merged model."""
        return Path(self.output_dir) / "runs" / self.run_name

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"

    @property
    def merged_dir(self) -> Path:
        return self.run_dir / "merged"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    def __post_init__(self):
        _check_types(self)
        _check_values(self)

    # --- builders ------------------------------------------------------------------------------
    def torch_dtype(self):
        import torch

        return getattr(torch, self.bnb_4bit_compute_dtype)

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=self.torch_dtype(),
        )

    def target_modules(self) -> str | list[str]:
        """'all-linear', or the comma-separated names as a list (peft would read a plain string as a regex)."""
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules(),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def sft_config(self, **extra):
        """The trl.SFTConfig for this run. Fields named as in SFTConfig pass through unchanged; the few
        that differ are derived below; `extra` passes trainer-only arguments through."""
        from trl import SFTConfig

        args = {name: getattr(self, name) for name in _sft_fields() - _RENAMED_IN_SFT if hasattr(self, name)}
        args.update(
            activation_checkpointing=self.gradient_checkpointing,  # transformers 5's name; the old one warns
            activation_checkpointing_kwargs={"use_reentrant": False},
            output_dir=str(self.run_dir),
            warmup_steps=self.warmup_ratio,  # transformers 5: a float < 1 is a ratio
            train_sampling_strategy="group_by_length" if self.group_by_length else "random",
            use_liger_kernel=False,  # deprecated in TRL 1.16: attach_lora applies Liger's kernels itself
            eval_strategy="steps",
            save_strategy="steps",
            greater_is_better=False,
            report_to=[] if self.report_to == "none" else [self.report_to],
            data_seed=self.seed,
            use_cpu=not _cuda(),  # also makes several CPU processes (gloo) form one DDP group
            ddp_find_unused_parameters=False,  # LoRA + checkpointing: every trainable parameter is used
            completion_only_loss=True,  # loss on reasoning + answer + eos only (our completion_mask)
            packing=False,
            dataset_num_proc=None,
        )
        if self.pack_tokens:  # one packed row per micro-batch, always pack_tokens long: one compiled shape
            args.update(packing=True, packing_strategy="bfd", max_length=self.pack_tokens,
                        pad_to_multiple_of=self.pack_tokens, per_device_train_batch_size=1,
                        per_device_eval_batch_size=1, train_sampling_strategy="random")
        args.update(extra)
        return SFTConfig(**args)

    def summary(self) -> str:
        """The settings that differ from the full profile's defaults, then the key hyperparameters."""
        default = make_config(self.profile)
        changed = {k: v for k, v in self.to_dict().items() if getattr(default, k) != v}
        eff = self.per_device_train_batch_size * self.gradient_accumulation_steps
        lines = [f"profile {self.profile}, model {self.model_id}  |  run folder {self.run_dir}",
                 f"QLoRA: {'4-bit ' + self.bnb_4bit_quant_type if self.load_in_4bit else 'no quantization'}, "
                 f"LoRA r={self.lora_r} alpha={self.lora_alpha} dropout={self.lora_dropout} on {self.lora_target_modules}",
                 f"lr {self.learning_rate} ({self.lr_scheduler_type}), " + (
                     f"packed rows of {self.pack_tokens} tokens x accumulation {self.gradient_accumulation_steps} = "
                     f"{self.pack_tokens * self.gradient_accumulation_steps} tokens/step, " if self.pack_tokens else
                     f"batch {self.per_device_train_batch_size} x accumulation {self.gradient_accumulation_steps} = "
                     f"{eff} sequences/step, ") +
                 f"{'max_steps ' + str(self.max_steps) if self.max_steps > 0 else str(self.num_train_epochs) + ' epochs'}, "
                 f"max_length {self.max_length}, optim {self.optim}"]
        if changed:
            lines.append(f"changed from the {self.profile} profile: " + ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
        return "\n".join(lines)

    # --- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, profile: str | None = None) -> "FinetuneConfig":
        """A config file. Keys it leaves out come from the profile it names (its "profile" key) or from
        `profile` (the command line's explicit --profile); with neither, every key must be present."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ValueError(f"config file {path}: cannot read it ({err.strerror or err})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"config file {path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: must hold a JSON object")
        try:
            _reject_unknown(data)
            base = data.get("profile", profile)
            if base is None:
                missing = sorted({f.name for f in dataclasses.fields(cls)} - set(data) - {"profile"})
                if missing:
                    raise ValueError(f"keys missing: {', '.join(missing)}. Name the profile they should come from, "
                                     'with a "profile" key in the file or --profile')
                return cls(**data)
            if profile is not None and data.get("profile", profile) != profile:
                raise ValueError(f"the file says profile {data['profile']!r} but --profile {profile!r} was given")
            return make_config(base, **{k: v for k, v in data.items() if k != "profile"})
        except (TypeError, ValueError) as err:
            raise ValueError(f"config file {path}: {err}") from None


# Settings that do not change the trained weights: changing them keeps the same run (and its checkpoints).
_NOT_TRAINING_KEYS = {
    "output_dir", "tiny_model_dir", "merge_after_training", "report_to", "logging_steps", "save_total_limit",
    "eval_max_new_tokens", "eval_batch_size", "eval_do_sample", "eval_temperature", "eval_top_p", "eval_limit",
    "eval_set", "math500_dataset", "eval_samples",
    "accuracy_callback", "accuracy_callback_size", "heldout_max", "per_device_eval_batch_size", "trust_remote_code",
    "eval_bf16", "profile", "allow_one_source", "tool_execution", "eval_without_tools", "tool_timeout",
    "tool_max_calls", "tool_workers", "tool_max_sandboxes", "checkpoint_layers", "memory_limit_gib",
    "gguf_outtype", "hub_repo_id", "hub_private",
}

PROFILES: dict[str, dict] = {
    "full": {},
    # The seed plan exactly as written (micro-batch 2 x accumulation 8, random order, no fused
    # kernels): kept for comparison; bench/train_throughput.py measures it against "full".
    "seed": dict(pack_tokens=0, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                 gradient_accumulation_steps=8, group_by_length=False,
                 use_liger_kernel=False, upcast_to_fp32=True),
    # CPU-friendly: tiny local model, bundled samples, a handful of steps. Still 4-bit NF4,
    # so CI runs the real QLoRA path.
    "smoke": dict(
        model_id=TINY_MODEL_ID,
        math_dataset="data/samples/mathcodeinstruct.jsonl",
        science_dataset="data/samples/scibench.jsonl",
        math_samples=0,
        max_length=1024,
        bf16=False,
        bnb_4bit_compute_dtype="float32",
        optim="adamw_torch",  # paged 8-bit optimizers need CUDA
        learning_rate=3e-3,  # high, so that 30 steps on a tiny model show a clear fall in loss
        pack_tokens=0,  # padded batches, as the tests' step counts assume; tests/test_packing.py runs the packed path
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=30,
        eval_steps=10,
        save_steps=10,
        logging_steps=1,
        eval_max_new_tokens=48,
        eval_batch_size=8,
        eval_samples=2,
        math500_dataset="data/samples/math500.jsonl",
        eval_limit=16,
        accuracy_callback=True,
        accuracy_callback_size=4,
        output_dir="outputs/smoke",
        merge_after_training=True,
        gguf_outtype="q8_0",
    ),
}


def _short(x: float) -> str:
    """2e-4 -> '2e-4', 1.5e-4 -> '1.5e-4', 3.0 -> '3', 0.5 -> '0.5': compact enough for a folder name."""
    if x == int(x) and abs(x) < 1000:
        return str(int(x))
    if 1e-2 <= abs(x) < 1000:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


_RENAMED_IN_SFT = {"gradient_checkpointing"}  # passed under its transformers 5 name, activation_checkpointing


def _sft_fields() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_config(profile: str = "full", /, **overrides) -> FinetuneConfig:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    _reject_unknown(overrides)
    if overrides.get("profile", profile) != profile:
        raise ValueError(f"profile={overrides['profile']!r} in the overrides contradicts make_config({profile!r})")
    return FinetuneConfig(**{**PROFILES[profile], **overrides, "profile": profile})


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' from the command line, the value parsed to the field's type."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"override {text!r} must look like key=value")
    _reject_unknown({key: None})
    hint = _type_hints()[key]
    base = _base_type(hint)
    if raw.lower() in ("none", "null") and _optional(hint):
        return key, None
    try:
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return key, raw.lower() in ("true", "1", "yes")
        return key, base(raw)
    except ValueError:
        raise ValueError(f"{key}: cannot read {raw!r} as {base.__name__}") from None


# --- validation ----------------------------------------------------------------------------------
def _type_hints() -> dict:
    return typing.get_type_hints(FinetuneConfig)


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _reject_unknown(keys) -> None:
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"unknown config key {key!r}{hint}")


def _check_types(cfg: FinetuneConfig) -> None:
    for name, hint in _type_hints().items():
        value = getattr(cfg, name)
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
_COMMON_OPTIMIZERS = ("paged_adamw_8bit", "adamw_torch", "adamw_8bit", "adamw_torch_fused")


def _optimizers() -> set[str]:
    from transformers.training_args import OptimizerNames

    return {o.value for o in OptimizerNames}


def _schedulers() -> set[str]:
    from transformers.trainer_utils import SchedulerType

    return {s.value for s in SchedulerType}


_CHOICES = {
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
    "report_to": ("tensorboard", "none"),
    "metric_for_best_model": ("eval_loss",),
    "eval_set": ("heldout", "math500"),
    "gguf_outtype": ("", "q8_0", "f16", "bf16"),
}


def _check_values(cfg: FinetuneConfig) -> None:
    def need(ok: bool, key: str, rule: str):
        if not ok:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is invalid: {rule}")

    for key in ("lora_r", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "eval_steps", "save_steps", "logging_steps", "save_total_limit",
                "eval_max_new_tokens", "accuracy_callback_size", "eval_samples", "tool_timeout", "tool_max_calls",
                "tool_max_sandboxes"):
        need(getattr(cfg, key) > 0, key, "must be > 0")
    for key in ("math_samples", "science_samples", "heldout_max", "eval_limit", "eval_batch_size", "tool_workers"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0 (0 means all)")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.checkpoint_layers >= -1, "checkpoint_layers", "must be -1 (chosen by memory) or a number of layers >= 0")
    need(cfg.memory_limit_gib >= 0, "memory_limit_gib", "must be >= 0 (0 = the whole GPU)")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(0 <= cfg.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(cfg.num_train_epochs > 0, "num_train_epochs", "must be > 0")
    need(cfg.max_steps == -1 or cfg.max_steps > 0, "max_steps", "must be -1 (use epochs) or > 0")
    need(cfg.max_length >= 64, "max_length", "must be >= 64 tokens")
    need(cfg.pack_tokens == 0 or cfg.pack_tokens >= cfg.max_length, "pack_tokens",
         f"must be 0 (padded batches) or at least max_length ({cfg.max_length}), so that every example fits a row")
    need(0 < cfg.eval_fraction < 1, "eval_fraction", "must be in (0, 1)")
    need(cfg.eval_temperature > 0, "eval_temperature", "must be > 0")
    need(0 < cfg.eval_top_p <= 1, "eval_top_p", "must be in (0, 1]")
    need(cfg.save_total_limit >= 2 or not cfg.load_best_model_at_end, "save_total_limit",
         "must be >= 2 with load_best_model_at_end, so that both the best and the latest checkpoint (to resume) are kept")
    need(cfg.save_steps % cfg.eval_steps == 0 or not cfg.load_best_model_at_end, "save_steps",
         "must be a multiple of eval_steps when load_best_model_at_end is on")
    need(cfg.profile in PROFILES, "profile", f"must be one of {sorted(PROFILES)}")
    need(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32) (numpy's seed range)")
    need(cfg.optim in _optimizers(), "optim", f"must be a transformers optimizer, e.g. {_COMMON_OPTIMIZERS}")
    need(cfg.lr_scheduler_type in _schedulers(), "lr_scheduler_type", f"must be one of {sorted(_schedulers())}")
    modules = cfg.target_modules()
    need(modules == "all-linear" or (modules and set(modules) <= QWEN2_LINEAR_LAYERS), "lora_target_modules",
         f"must be 'all-linear' or a comma-separated list of {sorted(QWEN2_LINEAR_LAYERS)}")
    for key in ("model_id", "output_dir", "math_dataset", "science_dataset", "optim", "lora_target_modules"):
        need(getattr(cfg, key).strip() != "", key, "must not be empty")
    for key, choices in _CHOICES.items():
        need(getattr(cfg, key) in choices, key, f"must be one of {choices}")
    out = Path(cfg.output_dir)
    need(not out.is_file(), "output_dir", "is an existing file, not a directory")


def non_default_fields(config) -> dict:
    """The fields of a library config (SFTConfig, LoraConfig, ...) that differ from its class defaults: what
    this recipe actually sets, without the hundred-odd defaults around it."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(config, f.name, None)
        if isinstance(value, enum.Enum):
            value = value.value
        if value != default and not (f.name.startswith("_") or value in (None, [], {}) and default is None):
            out[f.name] = value
    return out
