"""The libraries' configs as the project handles them: their settings as JSON values, what differs from their
defaults, which one owns a field, a BitsAndBytesConfig rebuilt with changes, and building them without disturbing a
live trainer. Knows nothing of `FinetuneConfig` (llmhelpers.config.project), which nests them."""
from __future__ import annotations

import contextlib
import dataclasses
import enum

LIBRARY_CONFIGS = ("bnb", "lora", "sft")  # FinetuneConfig's fields holding the three library configs
LIBRARY_CLASS_NAMES = {"bnb": "BitsAndBytesConfig", "lora": "LoraConfig", "sft": "SFTConfig"}


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


def plain_value(x):
    return x.value if isinstance(x, enum.Enum) else x


def jsonable(x):
    """A value as it goes into the run hash and the saved config: sets sorted, enums and dtypes by name."""
    x = plain_value(x)
    if isinstance(x, (set, frozenset)):
        return sorted(jsonable(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
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
    return {f.name: jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.init and not f.name.startswith("_") and f.name not in SECRET_FIELDS}


BNB_ARGUMENTS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                 "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules",
                 "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight")


def bnb_arguments(bnb) -> dict:
    """A BitsAndBytesConfig's constructor arguments (it is not a dataclass) as JSON values, dtypes by name."""
    return {k: jsonable(v) for k, v in bnb_constructor_arguments(bnb).items()}


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


def library_owner(key: str, other_names=frozenset()) -> str:
    """Which library config has the field `key` ("bnb", "lora" or "sft"; their names do not overlap). An unknown key
    is an error that suggests near names among theirs and `other_names` (the project's fields)."""
    import difflib

    fields = library_fields()
    for owner, names in fields.items():
        if key in names:
            return owner
    near = difflib.get_close_matches(key, frozenset(other_names).union(*fields.values()), n=3)
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
        value = jsonable(getattr(config, f.name, None))
        if value != jsonable(getattr(default, f.name, None)) or f.name in _ALWAYS_WRITTEN:
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
