"""The run's configuration: the project's own settings, with the three library configs nested as they are.

`FinetuneConfig` holds what no library knows (the model id, data sources and mix, the evaluation protocol, tool
execution, sharing) and, unchanged, the `BitsAndBytesConfig`, peft `LoraConfig` and TRL `SFTConfig` that loading,
LoRA and the trainer receive. The libraries check their own fields; `FinetuneConfig` checks only its own and the
few combinations the project relies on. `llmhelpers.config.profiles` builds one (`make_config`) from the notebook's
objects or from the recipe files in configs/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "finetune_config.json"  # the config saved beside checkpoints, adapters and merged weights
TINY_MODEL_ID = "llmhelpers/tiny-r1"  # the smoke profile's model, built locally by llmhelpers.model.tiny


@dataclass(frozen=True)
class FinetuneConfig:
    profile: str = "full"  # the configs/<profile>.yaml this config starts from; make_config sets it

    # --- model -------------------------------------------------------------------------------------------------
    model_id: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"  # Hub id, local folder, .gguf, or pip:<pkg>/<file>.gguf
    model_revision: str | None = None  # pin a Hub commit for reproducible runs
    tiny_model_dir: str = ""  # where the smoke profile builds its local tiny model ("" = <output_dir>/tiny-r1)

    # --- training, beyond what the libraries know --------------------------------------------------------------------
    max_example_tokens: int = 2048  # longer examples are dropped and counted, never truncated
    # How many decoder layers recompute their activations: -1 = as few as fit the worst batch in memory, measured on
    # the GPU before step 1 (llmhelpers.training.memory; all of them on a CPU); 0..layers = exactly that many.
    checkpoint_layers: int = -1
    memory_limit_gib: float = 0.0  # GPU memory the run may use (0 = all of it); e.g. 22 to fit a 24 GB card
    # peft's prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, which makes the residual
    # stream fp32 and doubles checkpointed activations. Keeping them bf16 halves that memory with the same loss
    # (bench/train_throughput.py checks it); the seed profile keeps the upcast.
    upcast_to_fp32: bool = False
    # MathCodeInstruct's ```output blocks were written by an interpreter, not the model: train on the code and the
    # opening fence, never on predicting what the interpreter prints (MathCoder executes the code at inference).
    mask_tool_output: bool = True
    # Stop when eval loss (metric_for_best_model) has not improved for this many evaluations, with transformers'
    # EarlyStoppingCallback (0 = train to the end); the best checkpoint is restored (load_best_model_at_end).
    early_stopping_patience: int = 0
    liger_kernels: bool = True  # Liger's fused RMSNorm/SwiGLU/RoPE Triton kernels (CUDA only; TRL's switch is deprecated)
    # Each LoRA layer on the 4-bit base as one autograd node with a written-out backward (llmhelpers.model.fused_lora):
    # the same forward bit for bit, a fraction of peft's per-layer CPU work, which held the GPU back on 8k-token rows.
    fused_lora: bool = True

    # --- data ----------------------------------------------------------------------------------------------------
    # A Hub id, a local .json/.jsonl file, or a folder of them.
    math_dataset: str = "MathLLMs/MathCodeInstruct"
    science_dataset: str = "xw27/scibench"  # as math_dataset: a Hub id, a local .json/.jsonl file, or a folder
    dataset_revision: str | None = None  # a Hub revision (commit) of both datasets, for a reproducible pool
    allow_one_source: bool = False  # True: a source with no usable rows is left out instead of stopping the run
    math_samples: int = 15000  # of ~80k MathCodeInstruct rows
    science_samples: int = 0  # 0 = all; SciBench has only 692 rows, 112 with a worked solution
    eval_fraction: float = 0.1  # 90/10 train/eval split of the training pool
    heldout_max: int = 0  # cap on the held-out accuracy set (0 = all)

    # --- answer-accuracy evaluation --------------------------------------------------------------------------------
    # The model authors' protocol (and open-r1's): sampling at temperature 0.6, top-p 0.95, several answers per
    # problem, long budgets. Greedy decoding makes R1 models loop, and a short budget cuts most answers off, so a
    # fine-tuned model that merely thinks shorter would "win".
    # "heldout" (eval split + SciBench problems without solutions), "math500", or a local .jsonl file of problems in
    # MathCodeInstruct's schema, graded by their boxed answer (the small profile's held-out problems)
    eval_set: str = "heldout"
    math500_dataset: str = "HuggingFaceH4/MATH-500"  # Hub id or a local .jsonl with MATH-500's fields
    eval_samples: int = 4  # answers per problem: pass@1 is their mean, maj@k their majority vote
    eval_max_new_tokens: int = 8192  # per-answer budget; 32768 is the authors' (set it for final numbers)
    eval_batch_size: int = 0  # 0 = as many sequences (engine slots) as fit 85% of free GPU memory
    eval_bf16: bool = True  # evaluate on bf16 weights (base, then merged adapters): the fast engine runs those
    eval_do_sample: bool = True  # False = greedy (loops on R1 models; only for debugging)
    eval_temperature: float = 0.6  # the model authors' recommendation
    eval_top_p: float = 0.95  # the model authors' recommendation
    eval_limit: int = 200  # problems per evaluation run (0 = all)
    # Tool execution (MathCoder's inference): python blocks the model writes are run in a sandbox process and their
    # real output is appended before it continues (llmhelpers.inference.tool_use; limits in FINETUNING_GUIDE.md).
    tool_execution: bool = True  # evaluation runs code; False lets the model write its own "output"
    eval_without_tools: bool = True  # also grade the fine-tuned model with tool_execution off (the comparison)
    tool_timeout: float = 10.0  # wall-clock seconds per block (CPU time: this + 2 s); the sandbox is killed after it
    tool_max_calls: int = 8  # executions per answer; later blocks get an error message as their output
    tool_workers: int = 0  # blocks run at once (0 = min(16, CPU cores - 1): one core stays with generation)
    tool_max_sandboxes: int = 64  # interpreter processes alive at once (each holds ~30-100 MB once sympy is in)
    accuracy_callback: bool = False  # accuracy on a small fixed subset at each save
    accuracy_callback_size: int = 16  # problems in that subset (one sampled answer each: a trend, not the table)

    # --- outputs and sharing -----------------------------------------------------------------------------------------
    merge_after_training: bool = False  # needs ~3.5 GB disk and a bf16 copy of the base
    gguf_outtype: str = ""  # "q8_0", "f16" or "bf16": write merged/ as GGUF for llama.cpp / Ollama ("" = don't)
    hub_repo_id: str = ""  # e.g. "you/r1-math-lora": push the adapters with their card ("" = don't)
    hub_private: bool = True  # a pushed repository is private unless this is False

    # --- the libraries' own configs, as loading, LoRA and the trainer receive them ------------------------------------
    bnb: typing.Any = None  # transformers.BitsAndBytesConfig
    lora: typing.Any = None  # peft.LoraConfig
    sft: typing.Any = None  # trl.SFTConfig (its output_dir is the root; the trainer writes to run_dir)

    def __post_init__(self):
        _check(self)

    # --- what other steps read, derived from the library configs ----------------------------------------------------
    @property
    def output_dir(self) -> str:
        return self.sft.output_dir

    @property
    def seed(self) -> int:
        return self.sft.seed

    @property
    def pack_tokens(self) -> int:
        """Tokens per packed row (SFTConfig's max_length with packing on), 0 for padded batches."""
        return self.sft.max_length if self.sft.packing else 0

    @property
    def compute_dtype(self):
        """The torch dtype matmuls run in: the 4-bit compute dtype, also the dtype of unquantized weights."""
        import torch

        dtype = self.bnb.bnb_4bit_compute_dtype
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    # --- the run: one folder per set of training settings -------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """A short hash of every setting that changes what is trained.

        Checkpoints live under runs/<run_name>, which ends in this id, so re-running training with the same settings
        resumes, while another learning rate or LoRA rank starts its own run beside it.
        """
        return hashlib.sha1(json.dumps(self.training_settings(), sort_keys=True).encode()).hexdigest()[:10]

    def training_settings(self) -> dict:
        """Everything the trained weights depend on: project fields, and every library field but the few that only
        say where and how often to write, log or evaluate."""
        out = {k: v for k, v in self.project_settings().items() if k not in NOT_TRAINING}
        out["bnb"] = library_settings(self.bnb)
        out["lora"] = library_settings(self.lora)
        out["sft"] = {k: v for k, v in library_settings(self.sft).items() if k not in SFT_NOT_TRAINING}
        return out

    @property
    def run_name(self) -> str:
        """The run's folder and TensorBoard name: the key hyperparameters, then the hash of all of them,
        e.g. lr2e-4_r16_t16k_ep3-1a2b3c4d5e (t16k: 16,384 packed tokens per step; b16: 16 padded sequences)."""
        sft = self.sft
        length = f"s{sft.max_steps}" if sft.max_steps > 0 else f"ep{_short(sft.num_train_epochs)}"
        return f"lr{_short(sft.learning_rate)}_r{self.lora.r}_{self.step_size_tag}_{length}-{self.run_id}"

    @property
    def step_size_tag(self) -> str:
        """What one optimizer step holds: t16k = 16,384 packed tokens, b16 = 16 padded sequences."""
        if self.pack_tokens:
            tokens = self.pack_tokens * self.sft.gradient_accumulation_steps
            return f"t{tokens // 1024}k" if tokens % 1024 == 0 else f"t{tokens}"
        return f"b{self.sft.per_device_train_batch_size * self.sft.gradient_accumulation_steps}"

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

    def replace(self, **changes) -> "FinetuneConfig":
        """A copy with `changes`, each routed by its name to the project's settings or to the library config that
        has the field (copies of those; this config's objects are left as they are)."""
        routed: dict[str, dict] = {key: {} for key in ("project", *LIBRARY_CONFIGS)}
        for key, value in changes.items():
            routed["project" if key in PROJECT_FIELDS or key in LIBRARY_CONFIGS else library_owner(key)][key] = value
        objects = {}
        if routed["bnb"]:
            objects["bnb"] = changed_bnb(self.bnb, **routed["bnb"])
        for key in ("lora", "sft"):
            if routed[key]:
                with keep_accelerator_state():
                    objects[key] = dataclasses.replace(getattr(self, key), **routed[key])
        return dataclasses.replace(self, **routed["project"], **objects)

    def trainer_args(self):
        """The SFTConfig the trainer runs with: `sft` with its output_dir pointed at this run's folder."""
        with keep_accelerator_state():  # no secret: the trainer pickles its arguments into every checkpoint
            return dataclasses.replace(self.sft, output_dir=str(self.run_dir),
                                       **{k: None for k in SECRET_FIELDS if getattr(self.sft, k, None)})

    # --- what is shown and saved ----------------------------------------------------------------------------------------
    def summary(self) -> str:
        """The key hyperparameters, then every setting that differs from the libraries' and the project's defaults."""
        sft, lora = self.sft, self.lora
        step = (f"packed rows of {self.pack_tokens} tokens x accumulation {sft.gradient_accumulation_steps}"
                if self.pack_tokens else
                f"batch {sft.per_device_train_batch_size} x accumulation {sft.gradient_accumulation_steps}")
        length = f"max_steps {sft.max_steps}" if sft.max_steps > 0 else f"{sft.num_train_epochs:g} epochs"
        quant = f"4-bit {self.bnb.bnb_4bit_quant_type}" if self.bnb.load_in_4bit else "no quantization"
        lines = [f"profile {self.profile}, model {self.model_id}  |  run folder {self.run_dir}",
                 f"QLoRA: {quant}, LoRA r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout} on "
                 f"{lora.target_modules}",
                 f"lr {sft.learning_rate} ({_value(sft.lr_scheduler_type)}), {step}, {length}, "
                 f"examples up to {self.max_example_tokens} tokens, optim {_value(sft.optim)}"]
        changed = {k: v for k, v in self.project_settings().items()
                   if k != "profile" and v != _PROJECT_DEFAULTS[k]}
        if changed:
            lines.append("project settings changed: " + ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
        return "\n".join(lines)

    def project_settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in LIBRARY_CONFIGS}

    def to_dict(self) -> dict:
        """Project settings, and for each library config the fields that differ from its defaults (what the recipe
        sets): readable, and enough to rebuild every object (`from_dict`)."""
        return {**self.project_settings(), "bnb": bnb_arguments(self.bnb),
                "lora": non_default_fields(self.lora), "sft": non_default_fields(self.sft)}

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        from peft import LoraConfig
        from transformers import BitsAndBytesConfig
        from trl import SFTConfig

        libraries = {"bnb": BitsAndBytesConfig, "lora": LoraConfig, "sft": SFTConfig}
        missing = [k for k in libraries if not isinstance(data.get(k), dict)]
        if missing:
            raise ValueError(f"{', '.join(missing)}: missing (each library config is a JSON object of its arguments)")
        _reject_unknown({k for k in data if k not in libraries})
        built = {}
        for key, kind in libraries.items():
            try:
                with keep_accelerator_state():
                    built[key] = kind(**data[key])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{key} ({kind.__name__}): {err}") from None
        return cls(**{**{k: v for k, v in data.items() if k not in libraries}, **built})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FinetuneConfig":
        """A config file that `save` wrote (or one written by hand in its shape)."""
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
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config file {path}: {err}") from None


LIBRARY_CONFIGS = ("bnb", "lora", "sft")


@contextlib.contextmanager
def keep_accelerator_state():
    """Build SFTConfig objects without disturbing a live trainer: every TrainingArguments, when it is built, resets
    accelerate's process-wide state, after which an existing trainer fails at its next dataloader ("AcceleratorState
    object has no attribute distributed_type"). The state that was live is put back."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved = {cls: dict(cls._shared_state) for cls in (PartialState, AcceleratorState, GradientState)}
    try:
        yield
    finally:
        for cls, state in saved.items():
            if state:
                cls._shared_state.clear()
                cls._shared_state.update(state)
_PROJECT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name not in LIBRARY_CONFIGS}
PROJECT_FIELDS = frozenset(_PROJECT_DEFAULTS)

# Project settings that do not change the trained weights: changing them keeps the same run (and its checkpoints).
NOT_TRAINING = {
    "profile", "tiny_model_dir", "checkpoint_layers", "memory_limit_gib", "fused_lora", "allow_one_source",
    "heldout_max", "eval_set", "math500_dataset", "eval_samples", "eval_max_new_tokens", "eval_batch_size", "eval_bf16",
    "eval_do_sample", "eval_temperature", "eval_top_p", "eval_limit", "tool_execution", "eval_without_tools",
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


def _value(x):
    return x.value if isinstance(x, enum.Enum) else x


def _jsonable(x):
    """A value as it goes into the run hash and the saved config: sets sorted, enums and dtypes by name."""
    x = _value(x)
    if isinstance(x, (set, frozenset)):
        return sorted(_jsonable(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x).removeprefix("torch.")


# Secrets: never written to a saved config, the runs index, a card or a log, never hashed into the run id, and not
# handed to the trainer (whose checkpoints pickle its arguments). The Hub push authenticates through
# `huggingface-cli login` or HF_TOKEN.
SECRET_FIELDS = frozenset({"hub_token"})
STEP_INTERVALS = ("save_steps", "eval_steps", "logging_steps")  # SFTConfig fields that must be > 0


def library_settings(config) -> dict:
    """Every field of a library config as JSON values (BitsAndBytesConfig: its constructor arguments), secrets left
    out."""
    if not dataclasses.is_dataclass(config) or type(config).__name__ == "BitsAndBytesConfig":
        return bnb_arguments(config)  # a dataclass of one field (quant_method); its settings are constructor arguments
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.init and not f.name.startswith("_") and f.name not in SECRET_FIELDS}


BNB_ARGUMENTS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                 "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules",
                 "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight")


def bnb_arguments(bnb) -> dict:
    """A BitsAndBytesConfig's constructor arguments (it is not a dataclass) as JSON values, dtypes by name."""
    return {k: _jsonable(v) for k, v in bnb_constructor_arguments(bnb).items()}


def bnb_constructor_arguments(bnb) -> dict:
    """A BitsAndBytesConfig's arguments as objects (dtypes as dtypes), to build a changed copy."""
    import copy

    return {k: copy.deepcopy(getattr(bnb, k)) for k in BNB_ARGUMENTS if hasattr(bnb, k)}


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def build_bnb(arguments: dict):
    """BitsAndBytesConfig(**arguments), with the dtype names checked first: the constructor resolves them with
    getattr(torch, name), and a typo surfaced as an AttributeError traceback."""
    import torch
    from transformers import BitsAndBytesConfig

    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        value = arguments.get(key)
        if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
            choices = COMPUTE_DTYPES if key == "bnb_4bit_compute_dtype" else ("uint8", *COMPUTE_DTYPES)
            raise ValueError(f"{key}={value!r} is invalid: must be one of {', '.join(choices)} (BitsAndBytesConfig)")
    return BitsAndBytesConfig(**arguments)


def changed_bnb(bnb, **changes):
    """A new BitsAndBytesConfig: `bnb`'s arguments with `changes` (it is not a dataclass one could replace)."""
    return build_bnb({**bnb_constructor_arguments(bnb), **changes})


def library_fields() -> dict[str, set[str]]:
    from peft import LoraConfig
    from trl import SFTConfig

    return {"bnb": set(BNB_ARGUMENTS),
            "lora": {f.name for f in dataclasses.fields(LoraConfig) if f.init},
            "sft": {f.name for f in dataclasses.fields(SFTConfig) if f.init}}


def library_owner(key: str) -> str:
    """Which library config has the field `key` ("bnb", "lora" or "sft"; their names do not overlap)."""
    import difflib

    fields = library_fields()
    for owner, names in fields.items():
        if key in names:
            return owner
    near = difflib.get_close_matches(key, PROJECT_FIELDS.union(*fields.values()), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise ValueError(f"unknown config key {key!r}{hint}")


def non_default_fields(config) -> dict:
    """The fields of a library config (SFTConfig, LoraConfig, ...) that differ from a default-built one: what this
    recipe actually sets, without the hundred-odd defaults around it (values as JSON: enough to rebuild it)."""
    default = _default_instance(type(config))
    out = {}
    for f in dataclasses.fields(config):
        if not f.init or f.name.startswith("_") or f.name in _MIRRORS or f.name in SECRET_FIELDS:
            continue
        value = _jsonable(getattr(config, f.name, None))
        if value != _jsonable(getattr(default, f.name, None)) or f.name in _ALWAYS_WRITTEN:
            out[f.name] = value
    return out


# Resolved by the machine when left out (TRL turns bf16 on where the GPU has it): always written, so that a saved
# config means the same run on another machine.
_ALWAYS_WRITTEN = {"bf16", "fp16", "use_cpu", "activation_checkpointing", "r"}
_MIRRORS = {"gradient_checkpointing", "gradient_checkpointing_kwargs"}  # transformers 5 copies the new names into these


_DEFAULTS: dict = {}


def _default_instance(kind):
    if kind not in _DEFAULTS:
        import warnings

        with warnings.catch_warnings(), keep_accelerator_state():
            warnings.simplefilter("ignore")
            # a CPU-only default: a TrainingArguments with bf16 on refuses to exist on a machine without a GPU
            _DEFAULTS[kind] = kind(use_cpu=True) if "use_cpu" in {f.name for f in dataclasses.fields(kind)} else kind()
    return _DEFAULTS[kind]


def _short(x: float) -> str:
    """2e-4 -> '2e-4', 1.5e-4 -> '1.5e-4', 3.0 -> '3', 0.5 -> '0.5': compact enough for a folder name."""
    if x == int(x) and abs(x) < 1000:
        return str(int(x))
    if 1e-2 <= abs(x) < 1000:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


# --- validation: the project's own fields, and what it relies on in the libraries' ----------------------------------
def _reject_unknown(keys) -> None:
    import difflib

    for key in keys:
        if key not in PROJECT_FIELDS:
            near = difflib.get_close_matches(key, PROJECT_FIELDS, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"unknown config key {key!r}{hint}")


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _check_types(cfg: FinetuneConfig) -> None:
    hints = typing.get_type_hints(FinetuneConfig)
    for name in PROJECT_FIELDS:
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
_CHOICES = {"gguf_outtype": ("", "q8_0", "f16", "bf16")}
EVAL_SETS = ("heldout", "math500")  # or a local .jsonl/.json file of problems in MathCodeInstruct's schema


LIBRARY_CLASS_NAMES = {"bnb": "BitsAndBytesConfig", "lora": "LoraConfig", "sft": "SFTConfig"}
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


def _check_finite(cfg: FinetuneConfig) -> None:
    """No NaN or infinity in any numeric field of the three library configs: a NaN label_smoothing_factor trained
    every adapter value into NaN and the run called itself finished (issue #29)."""
    for key in LIBRARY_CONFIGS:
        for name, value in library_settings(getattr(cfg, key)).items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{name}={v!r} is invalid: must be a finite number ({LIBRARY_CLASS_NAMES[key]})")


def _check(cfg: FinetuneConfig) -> None:
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
            raise ValueError(f"{key}={_value(value)!r} is invalid: {rule}")

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
