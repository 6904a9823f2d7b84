"""Shared by the GPU benchmarks: the exact DeepSeek-R1-Distill-Qwen-1.5B architecture with random
weights (no download), saved once as safetensors so the real from_pretrained + NF4 path loads it,
and synthetic pre-tokenized training rows with realistic lengths."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

R1_15B = dict(  # config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=151646, eos_token_id=151643, hidden_act="silu",
    sliding_window=None, use_sliding_window=False,
)


# The bigger distills (their config.json files; same tokenizer and special tokens as the 1.5B one).
R1_7B = dict(R1_15B, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4)
R1_14B = dict(R1_15B, vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
              num_attention_heads=40, num_key_value_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-5)
R1_32B = dict(R1_14B, intermediate_size=27648, num_hidden_layers=64)
ARCHITECTURES = {"1.5b": R1_15B, "7b": R1_7B, "14b": R1_14B, "32b": R1_32B}


def random_nf4_loader(arch: dict, seed: int = 0):
    """A loader `cfg -> model` for `arch` with random weights, quantized to NF4 by transformers' own loading path
    (from_pretrained with cfg's BitsAndBytesConfig) from an in-memory state dict: no checkpoint on disk (the 32B one
    would need 65 GB of it). Norm weights are ones, the rest N(0, 0.02) in the compute dtype."""

    def load(cfg):
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from llmhelpers.model.loading import device_map, finish_base_model

        if torch.cuda.is_available():  # the state dict is built whole on the GPU (real loading streams its shards):
            torch.cuda.set_per_process_memory_fraction(1.0)  # no earlier card's cap here; the run sets its own
        config = Qwen2Config(**arch)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Qwen2ForCausalLM(config).state_dict().items()}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(seed)
        state = {k: (torch.ones(shape, dtype=cfg.compute_dtype, device=device) if "norm" in k else
                     torch.randn(shape, generator=gen, dtype=cfg.compute_dtype, device=device).mul_(0.02))
                 for k, shape in shapes.items()}
        model = Qwen2ForCausalLM.from_pretrained(None, config=config, state_dict=state,
                                                 quantization_config=cfg.bnb, dtype=cfg.compute_dtype,
                                                 device_map=device_map())
        del state
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return finish_base_model(model, cfg, quantized=True)

    return load


def random_r1_model(path: str | Path = "/tmp/r1-1.5b-random", seed: int = 0) -> Path:
    """Build (once) and save the R1-1.5B architecture with random bf16 weights plus a tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmhelpers.model.tiny import build_tokenizer

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = Qwen2Config(**R1_15B)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok = build_tokenizer("current")  # ids differ from the real tokenizer; the benchmarks feed token ids directly
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def synthetic_rows(n: int, seed: int = 0, median: int = 700, sigma: float = 0.6, cap: int = 2048,
                   prompt: int = 64, vocab: int = 151000) -> dict[str, list]:
    """Lognormal lengths (median 700, capped at 2048), the first `prompt` tokens masked."""
    rng = random.Random(seed)
    ids, masks = [], []
    for _ in range(n):
        length = min(cap, max(prompt + 8, int(math.exp(rng.gauss(math.log(median), sigma)))))
        ids.append([rng.randrange(1000, vocab) for _ in range(length)])
        masks.append([0] * prompt + [1] * (length - prompt))
    return {"input_ids": ids, "completion_mask": masks}


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def provenance() -> dict:
    """What a result needs to be compared later: the commit (and whether the tree had changes), the GPU, the library
    versions, the exact command and the date."""
    import importlib.metadata
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"commit": git("rev-parse", "HEAD") or "unknown (not a git checkout)",
            "tree_changed": bool(git("status", "--porcelain", "--untracked-files=no")), "gpu": gpu_name(),
            "versions": versions, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def emit_result(result: dict, out: str | None) -> None:
    """Print a measurement's result as JSON and write it to `out` (its folders made) when given."""
    import json

    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def finish_check(result: dict, out: str | None, passed: bool, verdict: str) -> None:
    """Print and save a correctness check's result with its provenance, then exit non-zero when its verdict failed:
    a GPU check is read by its exit status, as a test is."""
    import json
    import sys

    result = {**result, "verdict": {"passed": passed, "rule": verdict}, "provenance": provenance()}
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)
    if not passed:
        sys.stderr.write(f"check FAILED: {verdict}\n")
        raise SystemExit(1)


def peak_bf16_flops() -> float:
    """Dense bf16 peak from NVIDIA's datasheets (H100/H200 SXM: 989 TFLOP/s)."""
    name = gpu_name()
    if "H100" in name or "H200" in name:
        return 989e12
    if "A100" in name:
        return 312e12
    return float(os.environ.get("PEAK_FLOPS", "nan"))


def peak_memory_bandwidth() -> float:
    """HBM bandwidth in bytes/s from NVIDIA's datasheets (H200: 4.8 TB/s, H100 SXM: 3.35 TB/s); PEAK_BANDWIDTH
    overrides it."""
    name = gpu_name()
    if "PEAK_BANDWIDTH" in os.environ:
        return float(os.environ["PEAK_BANDWIDTH"])
    return {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}.get(next((g for g in ("H200", "H100", "A100")
                                                                        if g in name), ""), float("nan"))


def packing(tokens: int) -> dict:
    """SFTConfig arguments for micro-batches of one packed row of `tokens` tokens; 0 = the padded alternative
    (16 sequences of up to 2,048 tokens per micro-batch, length-grouped)."""
    if tokens:
        return dict(packing=True, max_length=tokens, pad_to_multiple_of=tokens, per_device_train_batch_size=1,
                    per_device_eval_batch_size=1, train_sampling_strategy="random")
    return dict(packing=False, max_length=2048, pad_to_multiple_of=None, per_device_train_batch_size=16,
                per_device_eval_batch_size=16, train_sampling_strategy="group_by_length")
