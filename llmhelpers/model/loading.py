"""Loading the tokenizer and the 4-bit base model, and attaching LoRA adapters.

Everything is loaded from safetensors; remote code runs only if the config says so.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

from llmhelpers.config.library import bnb_arguments, library_settings
from llmhelpers.paths import resolve
from llmhelpers.model.gguf_source import convert as convert_gguf
from llmhelpers.model.gguf_source import is_gguf_source
from llmhelpers.model.tiny import build_tiny_r1

# peft 0.21 asks transformers 5 for its old `is_gradient_checkpointing` name, which warns at every get_peft_model and
# PeftModel.from_pretrained (the notebook's LoRA cell calls get_peft_model itself): this one message is dropped.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _beside_runs(output_dir: str) -> Path:
    target = Path(output_dir)
    return target if target.is_absolute() else Path.cwd() / target


def model_path(cfg) -> str:
    """The Hub id or a local folder; for the smoke profile the local tiny model (built on first use); for a GGUF
    file (`model_id` a .gguf path or pip:<package>/<file>.gguf) its bf16 folder, converted on first use."""
    if is_gguf_source(cfg.model_id):
        return str(convert_gguf(cfg.model_id, _beside_runs(cfg.output_dir)))
    if cfg.is_tiny:
        target = Path(cfg.tiny_model_dir) if cfg.tiny_model_dir else Path(cfg.output_dir) / "tiny-r1"  # beside the runs
        return str(build_tiny_r1(target if target.is_absolute() else Path.cwd() / target))
    local = resolve(cfg.model_id)
    return str(local) if local.exists() else cfg.model_id


def _hub_kwargs(cfg) -> dict:
    # SFTConfig.trust_remote_code (False by default): Qwen2 is native to transformers; never run Hub code unasked
    return {"revision": cfg.model_revision, "trust_remote_code": cfg.sft.trust_remote_code}


def load_tokenizer(cfg, path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or model_path(cfg), **_hub_kwargs(cfg))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # for batched generation; TRL's collator pads training batches itself
    return tok


def device_map() -> dict:
    """One whole model per process: the local GPU under accelerate/torchrun, else GPU 0, else CPU."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def load_base_model(cfg, quantized: bool = True, attn_implementation: str | None = None, path: str | None = None):
    """The base model: 4-bit NF4 (QLoRA) by default, or plain weights in the compute dtype."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=cfg.compute_dtype, device_map=device_map(), use_safetensors=True, **_hub_kwargs(cfg))
    if quantized:
        kwargs["quantization_config"] = cfg.bnb  # the notebook's bnb_config
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path or model_path(cfg), **kwargs)
    return finish_base_model(model, cfg, quantized)


def finish_base_model(model, cfg, quantized: bool):
    """What every freshly loaded base model gets: the KV cache on (for generation), the settings it was loaded
    with (checked by later cells), and on the CPU the 4-bit layout kept."""
    model.config.use_cache = True
    model.llm_loaded_with = loaded_with(cfg, quantized)
    if model.device.type == "cpu":
        _keep_cpu_4bit_layout(model)
    return model


# What a loaded model depends on: changing any of these needs the model loaded again.
LOAD_SETTINGS = ("model_id", "model_revision", "tiny_model_dir")


def loaded_with(cfg, quantized: bool) -> dict:
    settings = {k: getattr(cfg, k) for k in LOAD_SETTINGS}
    settings["compute dtype"] = str(cfg.compute_dtype)
    if quantized:  # the BitsAndBytesConfig's arguments, compared field by field
        settings.update({f"bnb_config.{k}": v for k, v in bnb_arguments(cfg.bnb).items()})
    return settings


def lora_settings(cfg) -> dict:
    """What attached adapters depend on: the LoraConfig's fields and how the base was prepared for them."""
    settings = {f"lora_config.{k}": v for k, v in library_settings(cfg.lora).items()}
    settings.update({"upcast_to_fp32": cfg.upcast_to_fp32, "liger_kernels": cfg.liger_kernels, "fused_lora": cfg.fused_lora,
                     "group_lora_inputs": cfg.group_lora_inputs,
                     "sft_config.activation_checkpointing": bool(cfg.sft.activation_checkpointing)})
    return settings


def _first_difference(recorded: dict, current: dict, now: str = "now") -> str | None:
    for key, value in recorded.items():
        if current.get(key) != value:
            return f"{key}={value!r}, but {now} {key}={current.get(key)!r}"
    return None


def check_model_matches(model, cfg) -> None:
    """Refuse to train or evaluate a model in memory that was loaded under other model settings."""
    recorded = getattr(model, "llm_loaded_with", None)
    if recorded is None:
        return  # not loaded by load_base_model (a test's own model): nothing recorded to compare
    diff = _first_difference(recorded, loaded_with(cfg, any(k.startswith("bnb_config.") for k in recorded)))
    if diff:
        raise ValueError(f"the model in memory was loaded with {diff}. Re-run the step that loads the model "
                         "(load_base_model) and the steps after it.")


def check_lora_matches(model, cfg) -> None:
    recorded = getattr(model, "llm_lora_settings", None)
    diff = _first_difference(recorded, lora_settings(cfg)) if recorded else None
    if diff:
        raise ValueError(f"the LoRA adapters in memory were attached with {diff}. Re-run the LoRA step "
                         "(prepare_for_lora, get_peft_model, finish_lora) and the steps after it.")


def _keep_cpu_4bit_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference at the first
    eval-mode forward and keeps that layout; a later training step then fails ("a view of a leaf
    Variable ... in-place"). Generating between training steps (the accuracy callback) needs the
    training layout, so the repacking is switched off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model, cfg):
    """The notebook's LoRA cell in one call (the CLI, the tests and the benches): fresh adapters from cfg.lora."""
    from peft import get_peft_model

    # a copy: peft writes the layer names it found into the config it is given; cfg's stays as written
    peft_model = get_peft_model(prepare_for_lora(model, cfg), copy.deepcopy(cfg.lora))
    return finish_lora(peft_model, cfg)


def prepare_for_lora(model, cfg):
    """A 4-bit model made ready for `get_peft_model`: the base frozen (or peft's fp32 recipe with upcast_to_fp32),
    activation checkpointing switched on (every layer can recompute; the run decides how many do), Liger's kernels
    on a GPU. Adapters already on it are removed first (without merging), so a re-run LoRA cell always starts from
    fresh adapters."""
    from peft import PeftModel, prepare_model_for_kbit_training

    check_model_matches(model, cfg)
    if isinstance(model, PeftModel):
        model = model.unload()
    checkpointing = bool(cfg.sft.activation_checkpointing)
    if getattr(model, "is_loaded_in_4bit", False) and cfg.upcast_to_fp32:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    model.llm_liger = apply_liger(model, cfg)
    model.llm_prepared_with = lora_settings(cfg)
    return model


def finish_lora(peft_model, cfg):
    """After `get_peft_model`: checks that the adapters are cfg's LoraConfig on a base prepared for cfg (else names
    the cell to re-run), runs each LoRA layer as one fused autograd step (cfg.fused_lora) and records the settings
    the later steps' staleness checks compare."""
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError("finish_lora takes the model get_peft_model returned")
    base = peft_model.get_base_model()
    if getattr(base, "llm_prepared_with", None) != lora_settings(cfg):
        raise ValueError("the model was not prepared for these settings: run prepare_for_lora(model, cfg) on it "
                         "before get_peft_model (re-run the LoRA step)")
    attached = library_settings(peft_model.peft_config["default"])
    wanted = library_settings(cfg.lora)
    diff = _first_difference({k: attached.get(k) for k in wanted if k not in PEFT_FILLS_IN}, wanted, "cfg has")
    if diff:
        raise ValueError(f"the adapters were attached with {diff}: lora_config changed after cfg was built. Re-run "
                         "the cell that builds cfg (make_config), then the LoRA step.")
    if cfg.fused_lora:
        from llmhelpers.model.fused_lora import fuse_lora_layers, group_lora_layers

        fuse_lora_layers(peft_model)
        if cfg.group_lora_inputs:
            group_lora_layers(peft_model)
    base.llm_lora_settings = lora_settings(cfg)
    return peft_model


# LoraConfig fields that get_peft_model writes into the config it is given (peft 0.21): the layers that
# target_modules="all-linear" matched, the base model's name.
PEFT_FILLS_IN = ("target_modules", "base_model_name_or_path", "revision")


def apply_liger(model, cfg) -> bool:
    """Liger's fused RMSNorm, SwiGLU and RoPE Triton kernels on this model (CUDA only; Qwen2 and Llama), through
    Liger's own API: TRL 1.16 deprecates its use_liger_kernel switch. The loss stays TRL's fused LM head (Liger's fused linear
    cross-entropy would replace the model's forward, which TRL patches)."""
    import importlib.util

    import torch

    if not (cfg.liger_kernels and torch.cuda.is_available() and importlib.util.find_spec("liger_kernel")):
        return False
    import liger_kernel.transformers as liger

    apply = {"qwen2": liger.apply_liger_kernel_to_qwen2, "llama": liger.apply_liger_kernel_to_llama}.get(
        model.config.model_type)
    if apply is None:
        return False
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return True


def trainable_parameters(model) -> str:
    from llmhelpers.model.fused_lora import FUSED_FLAG

    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit packed weights at full size
    line = f"trainable params: {trainable:,} of {total:,} ({trainable / total:.3%})"
    fused = sum(1 for m in model.modules() if getattr(m, FUSED_FLAG, False))
    return line + (f"; {fused} LoRA layers fused for training steps (fused_lora: on a GPU, or without dropout)"
                   if fused else "")


def use_trained_base_weights(model, cfg) -> int:
    """In place, on a base loaded with plain weights (`load_base_model(cfg, quantized=False)`): every weight that the
    4-bit load quantizes becomes its NF4 value, dequantized to the model's dtype. These are the base weights the
    adapters were trained on, so adapters merged into them give the trained model's numbers; merged into the
    original weights they do not (the fine-tuned SmolLM2 of the small profile: 8 of 8 greedy answers changed, held-out
    accuracy 99.7% -> 57.5%; FINETUNING_GUIDE.md). Returns how many weights were replaced."""
    import gc

    import bitsandbytes as bnb
    import torch

    quantized = load_base_model(cfg)  # the same loading path as training: the same NF4 values
    targets = dict(model.named_modules())
    count = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is None:
                continue
            weight = targets[name].weight
            weight.copy_(bnb.functional.dequantize_4bit(module.weight.data, state).to(weight.device, weight.dtype))
            count += 1
    del quantized
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model.llm_base_weights = "as trained (NF4, dequantized)"
    return count


def load_adapter_model(cfg, adapter_dir, attn_implementation: str | None = None):
    """The 4-bit base with saved adapters on top, e.g. for eager-attention visualisation."""
    check_adapter_matches(adapter_dir, cfg)
    return add_adapters(load_base_model(cfg, attn_implementation=attn_implementation), adapter_dir, cfg).eval()


def add_adapters(base, adapter_dir, cfg):
    """Saved adapters on a loaded base model (4-bit or plain), after checking they were trained on this model."""
    from peft import PeftModel

    check_adapter_matches(adapter_dir, cfg)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def load_adapter_weights(model, adapter_dir) -> None:
    """Saved adapters' weights into the LoRA layers already attached to `model` (the same layout): a GRPO run starts
    from the SFT run's adapters this way, on the model whose LoRA the trainer optimizes. Every saved tensor must
    land on a LoRA weight and every LoRA weight must be given one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no saved adapters (adapter_model.safetensors missing): train "
                                "and save them first, or start from the base model (start_from='base')")
    state = load_file(str(weights))
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if any(k == n or k.endswith(n) for n in lora)]
    if result.unexpected_keys or missing or not state:
        raise ValueError(f"the adapters in {adapter_dir} do not fit the LoRA layers attached here (unexpected: "
                         f"{list(result.unexpected_keys)[:3]}, missing: {missing[:3]}): attach LoRA with the "
                         "settings they were trained with")


def check_adapter_matches(adapter_dir, cfg) -> None:
    """Saved adapters belong to one base model: refuse to put them on another."""
    import json

    from llmhelpers.config.project import CONFIG_NAME

    saved = Path(adapter_dir) / CONFIG_NAME
    if not saved.exists():
        raise FileNotFoundError(f"{adapter_dir} holds no saved adapters ({CONFIG_NAME} missing): save them first")
    model_id = json.loads(saved.read_text()).get("model_id")
    if model_id != cfg.model_id:
        raise ValueError(f"the adapters in {adapter_dir} were trained on {model_id}, but the config says "
                         f"model_id={cfg.model_id!r}")
