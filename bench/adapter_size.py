"""Adapter size on disk for the default LoRA config on the exact R1-1.5B architecture (CPU, random
weights): trainable parameters and the adapter_model.safetensors size.

    python bench/adapter_size.py
"""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from common import R1_15B  # noqa: E402
from llmhelpers.config.profiles import make_config  # noqa: E402

cfg = make_config()
model = Qwen2ForCausalLM(Qwen2Config(**R1_15B)).to(torch.bfloat16)
total = sum(p.numel() for p in model.parameters())
model = get_peft_model(model, cfg.lora)
trainable, _ = model.get_nb_trainable_parameters()
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d, safe_serialization=True)
    size = os.path.getsize(Path(d) / "adapter_model.safetensors")
print(f"base parameters {total:,}; LoRA r={cfg.lora.r} on {cfg.lora.target_modules}: {trainable:,} trainable "
      f"({trainable / total:.2%}); adapter_model.safetensors {size / 1e6:.1f} MB")
