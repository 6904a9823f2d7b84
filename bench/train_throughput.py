"""Training throughput and memory: the seed plan's configuration against the project's default,
in one process on whatever GPU is present, through the project's real path (NF4 base + LoRA via
llmhelpers, TRL's SFTTrainer on pre-tokenized rows). Also checks that the optimised path's loss
equals the seed path's on the same 16 sequences.

    python bench/train_throughput.py                  # seed vs default (+ the intermediate steps)
    python bench/train_throughput.py --configs seed,default --steps 6

Useful tokens = non-pad tokens the model trains on. MFU counts the model FLOPs of a LoRA step
without recomputation: forward 2N + input-gradient 2N per token (frozen base: no weight
gradients), plus causal attention, against the GPU's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import R1_15B, gpu_name, packing, peak_bf16_flops, random_r1_model, synthetic_rows  # noqa: E402

PROMPT_TOKENS = 64  # synthetic_rows' default masked prompt length

CONFIGS = {
    "seed": dict(profile="seed"),
    "seed+grouped": dict(profile="seed", train_sampling_strategy="group_by_length"),
    # padded micro-batches (the recipe before packing), length-grouped
    "mb8x2+grouped+liger+fp32": dict(packing(0), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                     upcast_to_fp32=True),
    "mb16x1+grouped+liger+fp32": dict(packing(0), per_device_train_batch_size=16, gradient_accumulation_steps=1,
                                      upcast_to_fp32=True),
    "mb8x2+grouped+liger": dict(packing(0), per_device_train_batch_size=8, gradient_accumulation_steps=2),
    "mb16x1+grouped+liger": dict(packing(0), per_device_train_batch_size=16, gradient_accumulation_steps=1),
    "default": dict(),  # packed rows of 16,384 tokens, checkpointing chosen by memory
    "pack8k": packing(8192),
    "padded": packing(0),  # the previous default: 16 padded sequences, length-grouped
    "fits-24gb": dict(memory_limit_gib=22.0),  # the default's policy under a 22 GiB cap
    "pack32k": packing(32768),
    "pack8k-24gb": dict(packing(8192), memory_limit_gib=22.0),
    # issue #22: LoRA dropout launches a kernel per adapted layer, forward and backward; a CPU-bound step pays for it
    "default-nodrop": dict(lora_dropout=0.0),
    "pack8k-nodrop": dict(packing(8192), lora_dropout=0.0),
    # issue #22: the per-step CPU cost. bitsandbytes' paged 8-bit Adam steps each of the 392 LoRA tensors from Python;
    # torch's fused Adam steps them all in a few kernels (the LoRA states are 0.1 GB in fp32, so 8 bits save nothing)
    "pack8k-adamw": dict(packing(8192), optim="adamw_torch_fused"),
    "default-adamw": dict(optim="adamw_torch_fused"),
    "pack8k-noliger": dict(packing(8192), liger_kernels=False),
    # peft's own LoRA forward instead of the fused layer (llmhelpers.model.fused_lora)
    "pack8k-peft": dict(packing(8192), fused_lora=False),
    "default-peft": dict(fused_lora=False),
    # issue #31: the frozen base dequantized in every forward and backward (the default keeps it dequantized once)
    "default-4bit": dict(dequantize_once="off"),
    "pack8k-4bit": dict(packing(8192), dequantize_once="off"),
    "fits-24gb-4bit": dict(memory_limit_gib=22.0, dequantize_once="off"),
    # issue #31, lever 2: each decoder layer compiled as one region for the training steps (the CPU floor)
    "default-compiled": dict(compile_layers=True),
    "pack8k-compiled": dict(packing(8192), compile_layers=True),
    "fits-24gb-compiled": dict(memory_limit_gib=22.0, compile_layers=True),
    "equal-memory-compiled": dict(memory_limit_gib="peer", compile_layers=True),
    "default-compiled-nodrop": dict(compile_layers=True, lora_dropout=0.0),
    # issue #31: the default's policy under the memory Unsloth's packed run without checkpointing took in the same
    # session (--peer: that run's result file; its peak_reserved_gib becomes memory_limit_gib)
    "equal-memory": dict(memory_limit_gib="peer"),
    # issue #31, lever 3: the LoRA layers that read one input (q/k/v, gate/up) as one node each: one dropout mask and
    # one stacked A matmul per group, the input's gradient summed in place (group_lora_inputs; the default since
    # 2026-12-04, so the -grouped configs equal their plain ones, and -layerwise is the earlier path)
    "default-layerwise": dict(group_lora_inputs=False),
    "fits-24gb-layerwise": dict(memory_limit_gib=22.0, group_lora_inputs=False),
    "pack8k-layerwise": dict(packing(8192), group_lora_inputs=False),
    "default-grouped": dict(group_lora_inputs=True),
    "fits-24gb-grouped": dict(memory_limit_gib=22.0, group_lora_inputs=True),
    "equal-memory-grouped": dict(memory_limit_gib="peer", group_lora_inputs=True),
    "pack8k-grouped": dict(packing(8192), group_lora_inputs=True),
    # issue #31: the recipe's lora_dropout=0.05 saves a dropped copy of each adapted layer's input and its mask, ~0.46
    # GiB of a decoder layer's ~1.63 at rows of 16,384 (2026-11-30: peak 48.8 against 35.9 GiB); Unsloth's peer runs
    # without dropout. These separate the recipe from the implementation where memory decides the recomputation
    "equal-memory-nodrop": dict(memory_limit_gib="peer", lora_dropout=0.0),
    "fits-24gb-nodrop": dict(memory_limit_gib=22.0, lora_dropout=0.0),
}


def matmul_params(arch: dict = R1_15B) -> int:
    h, i, L, v = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    kv = h // arch["num_attention_heads"] * arch["num_key_value_heads"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v


def model_flops(lengths: list[int], arch: dict = R1_15B) -> float:
    n = matmul_params(arch)
    h, L = arch["hidden_size"], arch["num_hidden_layers"]
    per_seq = [4 * n * s + 2 * 2 * L * h * s * s for s in lengths]  # (fwd + input-grad) x (2N + causal attn)
    return float(sum(per_seq))


class CountingCollator:
    """Records, for every micro-batch the trainer collates, in order, the lengths of the sequences in it (a packed
    row holds several: its `seq_lengths`). Padding is never counted."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        self.batches.append([n for f in features for n in (f.get("seq_lengths") or [len(f["input_ids"])])])
        return self.inner(features)

    @property
    def lengths(self) -> list[int]:
        return [n for batch in self.batches for n in batch]


def measure_after_warmup(trainer, warmup: int):
    """Count the collated sequences and, once `warmup` optimizer steps are done, mark the time and the number of
    sequences so far and reset the GPU's peak-memory counter. Returns (counter, marks)."""
    from transformers import TrainerCallback

    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    marks = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                _cuda("synchronize")
                marks["t0"], marks["n0"] = time.perf_counter(), len(counter.batches)
                marks["step_ends"] = []
                _cuda("reset_peak_memory_stats")
            elif state.global_step > warmup:  # no synchronize: the host's clock, which runs at most a step ahead
                marks["step_ends"].append(time.perf_counter())

    trainer.add_callback(Timer())
    return counter, marks


def second_half_rate(marks: dict, batches: list, accumulation: int, steps: int) -> dict:
    """Each measured step's seconds, and the useful tokens/s of the second half of the measured steps: a run whose
    first measured steps still compile (a peer that compiles for each new row length) shows it here, apart from the
    whole window's rate. `batches`: the counting collator's micro-batches (lists of sequence lengths)."""
    ends = [marks["t0"]] + marks.get("step_ends", [])[:steps]
    out = {"step_seconds": [round(b - a, 3) for a, b in zip(ends, ends[1:])]}
    half = steps // 2
    if len(ends) == steps + 1 and half:
        first = marks["n0"] + half * accumulation
        tokens = sum(n for batch in batches[first:marks["n0"] + steps * accumulation] for n in batch)
        out["second_half_useful_tok_s"] = round(tokens / (ends[-1] - ends[half]))
    return out


def _cuda(fn_name: str, *args):
    """torch.cuda.<fn_name>(*args) on a GPU, nothing (0) on the CPU (the benchmarks' dry runs)."""
    import torch

    return getattr(torch.cuda, fn_name)(*args) if torch.cuda.is_available() else 0


def bench_trainer(cfg, rows, load_model=None):
    """The project's trainer on pre-tokenized `rows` (no evaluation, no checkpoints): NF4 base from
    `load_model(cfg)` (default load_base_model) plus LoRA, seeded."""
    import torch
    from datasets import Dataset

    from llmhelpers.data.sources import DataBundle, DataReport
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.trainer import build_trainer

    ds = Dataset.from_dict(rows)
    data = DataBundle(ds, ds.select(range(16)), [], [], [], DataReport())
    torch.manual_seed(0)
    model = attach_lora((load_model or load_base_model)(cfg), cfg)
    return build_trainer(cfg, model, load_tokenizer(cfg), data, eval_strategy="no", save_strategy="no",
                         load_best_model_at_end=False, dataloader_num_workers=0)


def run_config(name: str, spec: dict, model_dir: Path, rows, warmup: int, steps: int, load_model=None,
               arch: dict = R1_15B) -> dict:
    """`load_model(cfg)` builds the base model (default: load_base_model from model_dir, NF4)."""
    from llmhelpers.config.profiles import make_config

    spec = dict(spec)
    profile = spec.pop("profile", "full")
    cfg = make_config(profile, model_id=str(model_dir), output_dir=f"/tmp/bench-train/{name}", max_steps=warmup + steps,
                      save_steps=10_000, eval_steps=10_000, logging_steps=1, report_to="none", warmup_steps=0, **spec)
    trainer = bench_trainer(cfg, rows, load_model)
    from llmhelpers.training.run import TrainingRun

    with TrainingRun(trainer, cfg) as run:  # as the notebook trains: the memory policy decides before step 1
        counter, marks = measure_after_warmup(trainer, warmup)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=run.checkpoint)  # None: save_strategy="no" leaves no checkpoint
        _cuda("synchronize")
        # the window ends here: the worst-case steps below are not training (2026-12-04, fourth session: inside the
        # window they cost eager runs ~0.7 s of ~12 and compiled ones ~5 s, a recompilation for their shape)
        elapsed = time.perf_counter() - marks["t0"]
        timed_peaks = _cuda("max_memory_allocated"), _cuda("max_memory_reserved")
        # inside the run: the layers as they trained (TrainingRun undoes compile_layers on exit)
        worst_reserved = worst_case_peak_reserved(trainer, cfg)
    decided = run.memory
    # The collator has already been called for the micro-batches after the last step when prefetching; count
    # exactly the sequences of the measured steps.
    per_step = trainer.args.gradient_accumulation_steps  # micro-batches per optimizer step
    lengths = [n for batch in counter.batches[marks["n0"]:marks["n0"] + steps * per_step] for n in batch]
    useful = sum(lengths)  # all non-pad tokens
    trained = sum(l - PROMPT_TOKENS for l in lengths)  # minus each row's masked prompt
    out = {
        "config": name, "pack_tokens": cfg.pack_tokens,
        "micro_batch": trainer.args.per_device_train_batch_size, "accumulation": cfg.sft.gradient_accumulation_steps,
        "grouped": cfg.sft.train_sampling_strategy == "group_by_length", "liger": getattr(trainer.model, "llm_liger", False),
        # the speed settings a configuration may change ("grouped" above is the padded recipe's length grouping)
        "group_lora_inputs": cfg.group_lora_inputs, "compile_layers": cfg.compile_layers,
        "lora_dropout": cfg.lora.lora_dropout,
        "checkpointing": decided, "memory_limit_gib": cfg.memory_limit_gib,
        "sequences_per_step": round(len(lengths) / steps, 1),
        "warmup_seconds": round(marks["t0"] - started, 1),  # model compile, first steps
        "steps": steps, "seconds": round(elapsed, 2), "tokens_per_step": round(sum(lengths) / steps),
        "useful_tok_s": round(useful / elapsed), "trained_tok_s": round(trained / elapsed),
        "peak_alloc_gib": round(timed_peaks[0] / 2**30, 2),
        "peak_reserved_gib": round(timed_peaks[1] / 2**30, 2),
        "mfu": round(model_flops(lengths, arch) / elapsed / peak_bf16_flops(), 4),
        "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None,
    }
    out.update(second_half_rate(marks, counter.batches, per_step, steps))
    out["worst_case_peak_reserved_gib"] = worst_reserved
    del trainer
    gc.collect()
    _cuda("empty_cache")
    return out


def worst_case_peak_reserved(trainer, cfg, steps: int = 2) -> float:
    """Peak reserved GPU memory (GiB) over `steps` training steps on the worst micro-batch the run can meet (every
    token trained; a full packed row, or every sequence at max_length), after the measured steps."""
    from llmhelpers.training.memory import worst_batch

    counting, trainer.data_collator = trainer.data_collator, getattr(trainer.data_collator, "inner",
                                                                     trainer.data_collator)
    try:
        batch = worst_batch(trainer, cfg)  # collated by the trainer's collator, not counted as a measured step's
    finally:
        trainer.data_collator = counting
    _cuda("reset_peak_memory_stats")
    trainer.model.train()
    for _ in range(steps):
        trainer.training_step(trainer.model, dict(batch))
        trainer.model.zero_grad(set_to_none=True)
    _cuda("synchronize")
    return round(_cuda("max_memory_reserved") / 2**30, 2)


def loss_equivalence(model_dir: Path, rows) -> dict:
    """Loss of 16 sequences as the seed path computes it (8 micro-batches of 2, plain kernels) and as the
    default path does (one micro-batch of 16, Liger kernels), on the same model, dropout off."""
    import torch
    from datasets import Dataset
    from transformers.integrations.liger import apply_liger_kernel

    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import DataBundle, DataReport
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.trainer import build_trainer

    seed_cfg = make_config("seed", model_id=str(model_dir), output_dir="/tmp/bench-train/eq", report_to="none")
    fast_cfg = make_config("full", model_id=str(model_dir), output_dir="/tmp/bench-train/eq", report_to="none",
                           per_device_train_batch_size=16, gradient_accumulation_steps=1)
    tok = load_tokenizer(seed_cfg)
    sub = {k: v[:16] for k, v in rows.items()}
    ds = Dataset.from_dict(sub)
    data = DataBundle(ds, ds, [], [], [], DataReport())

    def loss_over(cfg, lora_state=None, liger=False) -> tuple[float, dict]:
        torch.manual_seed(0)
        model = attach_lora(load_base_model(cfg), cfg)
        with torch.no_grad():  # the same non-zero adapters in both paths, so the LoRA path is covered too
            if lora_state is None:
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.01)
            else:
                model.load_state_dict(lora_state, strict=False)
        state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
        trainer = build_trainer(cfg, model, tok, data)
        if liger:
            apply_liger_kernel(model, {"fused_linear_cross_entropy": False})
        features = [trainer.train_dataset[i] for i in range(16)]
        total = torch.tensor(sum(sum(1 for l in f["labels"][1:] if l != -100) for f in features)).cuda()
        micro = cfg.sft.per_device_train_batch_size
        model.eval()
        acc = 0.0
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for i in range(0, 16, micro):
                batch = {k: v.cuda() for k, v in trainer.data_collator(features[i:i + micro]).items()}
                acc += float(trainer.compute_loss(model, batch, num_items_in_batch=total))
        del trainer, model
        gc.collect()
        torch.cuda.empty_cache()
        return acc, state

    seed_loss, lora_state = loss_over(seed_cfg)
    fast_loss, _ = loss_over(fast_cfg, lora_state, liger=fast_cfg.liger_kernels)
    rel = abs(fast_loss - seed_loss) / seed_loss
    return {"seed_loss": seed_loss, "default_loss": fast_loss, "relative_diff": rel, "tolerance": 1e-2,
            "ok": rel <= 1e-2}


def peer_peak(path: str | None) -> float:
    """The peak reserved memory of Unsloth's packed run without checkpointing, from its result file."""
    if not path:
        raise SystemExit("equal-memory needs --peer: the result file of train_unsloth.py --configs packed")
    runs = [r for r in json.loads(Path(path).read_text())["runs"] if r["config"] == "unsloth-packed"]
    if not runs:
        raise SystemExit(f"{path} has no unsloth-packed run")
    return runs[-1]["peak_reserved_gib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-loss-check", action="store_true")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 32 "
                             "to measure what a 32 GB card can run")
    parser.add_argument("--median", type=int, default=700,
                        help="median row length of the synthetic lognormal rows (real MathCodeInstruct rows: ~490)")
    parser.add_argument("--peer", default=None,
                        help="train_unsloth.py's result file with an unsloth-packed run (for equal-memory)")
    parser.add_argument("--out", default=None, help="write results JSON here")
    args = parser.parse_args()
    model_dir = random_r1_model()
    rows = synthetic_rows(16 * (args.warmup + args.steps + 2) * 4, median=args.median)
    results = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "median": args.median, "runs": []}
    if args.memory_cap_gb:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 1e9 / total))
        results["memory_cap_gb"] = args.memory_cap_gb
    if not args.no_loss_check:
        results["loss_equivalence"] = loss_equivalence(model_dir, rows)
        print(json.dumps(results["loss_equivalence"]), flush=True)
    for name in args.configs.split(","):
        overrides = dict(CONFIGS[name])
        if overrides.get("memory_limit_gib") == "peer":
            overrides["memory_limit_gib"] = peer_peak(args.peer)
        r = run_config(name, overrides, model_dir, rows, args.warmup, args.steps)
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        if args.out:  # after every configuration: a run cut off later keeps what was measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    base = next((r for r in results["runs"] if r["config"] == "seed"), None)
    print(f"\n{results['gpu']}, {results['date']}")
    print(f"{'config':<24}{'useful tok/s':>13}{'x seed':>8}{'alloc GiB':>10}{'reserved':>10}{'MFU':>7}{'tok/step':>10}")
    for r in results["runs"]:
        ratio = r["useful_tok_s"] / base["useful_tok_s"] if base else float("nan")
        print(f"{r['config']:<24}{r['useful_tok_s']:>13,}{ratio:>8.2f}{r['peak_alloc_gib']:>10.2f}"
              f"{r['peak_reserved_gib']:>10.2f}{r['mfu']:>7.1%}{r['tokens_per_step']:>10,}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
