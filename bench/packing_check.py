"""Is padding-free training exact on this GPU stack? The R1-1.5B architecture (random weights, NF4 base + LoRA with
non-zero adapters, bf16 autocast, eval mode), 8 sequences of realistic lengths:

- logits of each sequence alone against the same sequence inside one packed row, with the project's document mask
  (flex_attention BlockMask on CUDA), with no mask and no KV cache (transformers' own detection of restarting
  position_ids), and with no mask and a KV cache (the detection is off then: the leak measured on 2026-11-30);
- the loss of the 8 sequences as one packed micro-batch against one padded micro-batch, through the project's
  trainer (TRL's loss over completion tokens).

    python bench/packing_check.py --out bench/results/<date>-<gpu>-packing-check.json
    python bench/packing_check.py --tiny          # dry run on the CPU (tiny model, dense mask)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish_check, gpu_name, packing, random_r1_model, synthetic_rows  # noqa: E402

LEAK_FREE_MEAN_DIFF = 0.05  # bf16 noise between two kernels over the same sequence is ~0.02 (2026-11-30)
MAX_REL_LOSS_DIFF = 1e-3  # measured 2.3e-5 on an H200 (2026-11-30)


def main():
    import torch
    from datasets import Dataset

    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import DataBundle, DataReport
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.trainer import build_trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the smoke profile's tiny model on the CPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        base = dict(profile="smoke", output_dir="/tmp/packing-check")
        vocab, median = 1020, 60  # ids from 1000 up: synthetic_rows keeps clear of special tokens
    else:
        base = dict(profile="full", model_id=str(random_r1_model()), output_dir="/tmp/packing-check")
        vocab, median = 151000, 490
    rows = synthetic_rows(8, seed=3, median=median, prompt=16, vocab=vocab)
    profile = base.pop("profile")
    results = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "lengths": [len(r) for r in rows["input_ids"]]}

    def trainer_for(**overrides):
        cfg = make_config(profile, **base, report_to="none", lora_dropout=0.0, **overrides)
        torch.manual_seed(0)
        model = attach_lora(load_base_model(cfg), cfg)
        with torch.no_grad():  # non-zero adapters: the LoRA path is part of what is compared
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=torch.Generator(p.device).manual_seed(1))
        ds = Dataset.from_dict(rows)
        return build_trainer(cfg, model, load_tokenizer(cfg), DataBundle(ds, ds, [], [], [], DataReport()))

    packed = trainer_for(**packing(8192 if not args.tiny else 1024))
    # the losses first: each model's first forward (bitsandbytes on the CPU changes its 4-bit layout at the first one)
    losses = {}
    for name, trainer in (("packed", packed), ("padded", trainer_for(**{**packing(0), "per_device_train_batch_size": 8,
                                                                        "per_device_eval_batch_size": 8}))):
        (batch,) = list(trainer.get_eval_dataloader())
        batch = trainer._prepare_inputs(batch)
        with torch.no_grad():
            losses[name] = trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)[0].item()
    rel = abs(losses["packed"] - losses["padded"]) / losses["padded"]
    model = packed.model.eval()
    device = packed.args.device
    seqs = [torch.tensor(r, device=device) for r in rows["input_ids"]]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s), device=device) for s in seqs])[None]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        alone = [model(input_ids=s[None], use_cache=False).logits[0].float() for s in seqs]
        with packed.packed_mask.applied(model, {"position_ids": pos}):
            masked = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
        detected = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
        cached = model(input_ids=ids, position_ids=pos, use_cache=True).logits[0].float()

    def diffs(logits):
        out, start = [], 0
        for a in alone:
            out.append((logits[start:start + len(a)] - a).abs().mean().item())
            start += len(a)
        return [round(d, 4) for d in out]

    results["mean_abs_logit"] = round(torch.cat(alone).abs().mean().item(), 4)
    results["mean_abs_diff_per_sequence"] = {
        "document_mask": diffs(masked), "no_mask_no_cache": diffs(detected), "no_mask_with_cache": diffs(cached)}
    worst = max(results["mean_abs_diff_per_sequence"]["document_mask"])
    results["losses"] = losses
    del model
    results["packing_check"] = {"leak_free": worst <= LEAK_FREE_MEAN_DIFF, "max_rel_loss_diff": rel,
                                "max_mean_abs_logit_diff": worst, "threshold": LEAK_FREE_MEAN_DIFF}
    finish_check(results, args.out, worst <= LEAK_FREE_MEAN_DIFF and rel <= MAX_REL_LOSS_DIFF,
                 f"every sequence's mean |logit diff| packed vs alone <= {LEAK_FREE_MEAN_DIFF} and the packed loss "
                 f"within {MAX_REL_LOSS_DIFF:g} (relative) of the padded one")


if __name__ == "__main__":
    main()
