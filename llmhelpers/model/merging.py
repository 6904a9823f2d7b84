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
