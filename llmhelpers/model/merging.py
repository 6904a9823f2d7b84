"""Merge LoRA adapters into a full-precision (bf16) base and check the merge.

The adapters were trained on the NF4 base, so they are merged into those weights: the base is reloaded in the
compute dtype with each 4-bit layer's weight set to its NF4 value, dequantized (`use_trained_base_weights`). Merged
into the original weights instead, the fine-tuned model is not the trained one (FINETUNING_GUIDE.md measures it). The check compares logits of base+adapter (unmerged) with
the merged weights in the same precision, on the same model object (one copy in memory).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from llmhelpers.storage import save_model_folder

# Mean |logit difference| allowed between base+adapter and merged weights. In fp32 the merge is
# exact up to rounding; in bf16 W + BA is rounded once more to bf16 (8-bit mantissa).
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
CONFIDENT_MARGIN = 0.5  # logits; several times the largest bf16 merge difference measured on an H100 (0.2)


def merge_adapters(cfg, tokenizer, sample_texts: list[str], adapter_dir: str | Path,
                   out_dir: str | Path | None = None) -> dict:
    import torch

    from llmhelpers.model.gguf_source import STAMP
    from llmhelpers.model.loading import (add_adapters, check_adapter_matches, load_base_model, model_path,
                                          use_trained_base_weights)

    adapter_dir = Path(adapter_dir)
    check_adapter_matches(adapter_dir, cfg)  # before the bf16 base is loaded
    base = load_base_model(cfg, quantized=False)
    use_trained_base_weights(base, cfg)  # the NF4 values training saw, not the original weights
    model = add_adapters(base, adapter_dir, cfg).eval()
    enc = tokenizer(sample_texts, return_tensors="pt", padding=True, add_special_tokens=False).to(base.device)
    with torch.inference_mode():
        before = model(**enc).logits.float()
        merged = model.merge_and_unload()
        after = merged(**enc).logits.float()
    mask = enc["attention_mask"].bool()
    diff = (before - after).abs()[mask]
    same_top1 = (before.argmax(-1) == after.argmax(-1))[mask]
    # Where the two best tokens are nearly tied, rounding alone can swap them; that is not a merge error.
    # Top-1 agreement is required only where the unmerged model's margin exceeds CONFIDENT_MARGIN.
    top2 = before.topk(2, dim=-1).values
    confident = ((top2[..., 0] - top2[..., 1]) > CONFIDENT_MARGIN)[mask]
    check = {
        "dtype": str(cfg.compute_dtype).removeprefix("torch."),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(same_top1.float().mean()),
        "confident_positions": int(confident.sum()),
        "top1_agreement_confident": float(same_top1[confident].float().mean()) if confident.any() else 1.0,
        "tolerance": MERGE_TOLERANCE[str(cfg.compute_dtype).removeprefix("torch.")],
    }
    check["ok"] = check["mean_abs_diff"] <= check["tolerance"] and check["top1_agreement_confident"] >= 0.99

    weights = sum(p.numel() * p.element_size() for p in merged.parameters())
    target = Path(out_dir or adapter_dir.parent / "merged")
    check["path"] = str(save_model_folder(merged, tokenizer, cfg, target, int(weights * 1.1), "the merged model"))
    source = Path(model_path(cfg)) / STAMP  # a base converted from GGUF: the export reads its pre-tokenizer there
    if source.is_file():
        shutil.copyfile(source, target / STAMP)
    del merged, model, base
    return check


class MergedPolicy:
    """A plain copy of a model with a 4-bit base and LoRA adapters, the adapters merged in: what the generation engine
    runs (it needs plain nn.Linear layers) while the 4-bit model trains, as TRL keeps vLLM's weights in sync.

    Each adapted layer's weight is its NF4 base, dequantized as bitsandbytes does, plus the adapters' product
    (peft's `get_delta_weight`); every other weight (embeddings, norms, the head) is copied. `refresh()` writes them
    again, in place, after the adapters changed: the engine's CUDA graphs keep reading the same tensors. Costs one
    copy of the model in the compute dtype (3.1 GB for the 1.5B in bf16)."""

    def __init__(self, peft_model, dtype=None):
        import torch
        from transformers import AutoModelForCausalLM

        self.source = peft_model
        base = peft_model.get_base_model()
        self.dtype = dtype or _compute_dtype(base)
        device = next(p.device for p in base.parameters() if p.device.type != "meta")
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(base.config, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.linears = {}  # name -> (the source layer: peft LoRA layer, 4-bit or plain Linear; the copy's Linear)
        source_modules = dict(base.named_modules())
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self.linears[name] = (source_modules[name], module)
        if any(getattr(src, "use_dora", {}).get(a) for src, _ in self.linears.values()
               for a in getattr(src, "active_adapters", [])):
            raise ValueError("MergedPolicy: DoRA adapters are not merged here (their magnitude vector): generate "
                             "with the training model (engine rollouts off)")
        self.refresh(copy_all=True)

    def refresh(self, copy_all: bool = False) -> None:
        """Write the merged weights (and, with copy_all, every other parameter and buffer) into the copy."""
        import torch

        with torch.no_grad():
            for name, (src, dst) in self.linears.items():
                dst.weight.copy_(self._merged_weight(src))
                bias = getattr(getattr(src, "base_layer", src), "bias", None)
                if copy_all and bias is not None:
                    dst.bias.copy_(bias.to(self.dtype))
            if copy_all:
                linear_names = {f"{n}.{p}" for n in self.linears for p in ("weight", "bias")}
                state = {k.replace("base_layer.", ""): v for k, v in self.source.get_base_model().state_dict().items()}
                for key, target in self.model.state_dict().items():
                    if key not in linear_names and key in state:
                        target.copy_(state[key].to(target.dtype))

    def _merged_weight(self, layer):
        from llmhelpers.model.fused_lora import dequantized

        base = getattr(layer, "base_layer", layer)
        quant_state = getattr(base.weight, "quant_state", None)
        weight = dequantized(base.weight, quant_state, self.dtype).view(base.out_features, base.in_features) \
            if quant_state is not None else base.weight.to(self.dtype)
        if base is layer or getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
            return weight
        deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
        if not deltas:
            return weight
        return (weight.float() + sum(d.float() for d in deltas)).to(self.dtype)  # one rounding, as peft's merge


def _compute_dtype(model):
    import torch

    quantized = next((m for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None)), None)
    dtype = getattr(quantized, "compute_dtype", None) if quantized is not None else None
    return dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
