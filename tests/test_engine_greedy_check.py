"""`python -m bench check engine-greedy` (bench/engine_greedy_check.py), its logic on the tiny models on the CPU: the
engine's greedy tokens compared with model.generate's, and a divergence judged a bf16 tie or not."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from engine_greedy_check import compare, first_divergence, fp32_sides, tie_at, verdict  # noqa: E402

from llmhelpers.inference.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_arch):
    from conftest import arch_config
    from llmhelpers.data.chat import render_prompt
    from llmhelpers.data.sources import demo_examples
    from llmhelpers.model.loading import load_base_model, load_tokenizer

    cfg = arch_config(tiny_arch)
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg, quantized=False).float().eval()
    prompts = [tok(render_prompt(e, tok), add_special_tokens=False)["input_ids"] for e in demo_examples()]
    return model, tok, prompts


def test_first_divergence_counts_a_stop_as_one():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped where the other went on


def test_the_same_model_gives_identical_rows_and_a_passing_verdict(tiny):
    model, tok, prompts = tiny
    engine = Engine(model, slots=len(prompts), max_len=max(map(len, prompts)) + 17, fuse=True)
    rows = compare(model, model, engine, prompts, 16, tok.eos_token_id)
    assert len(rows) == len(prompts) and all(r["first_divergence"] is None for r in rows)
    assert verdict(rows)


def test_another_engine_can_be_the_reference(tiny):
    """--reference engine: the engine's tokens against a second engine's (fused against unfused here, identical in
    fp32 on the CPU); against an engine on a scrambled head they diverge and are not ties."""
    import copy

    model, tok, prompts = tiny
    width = max(map(len, prompts)) + 17
    fused = Engine(model, slots=len(prompts), max_len=width, fuse=True)
    rows = compare(model, model, fused, prompts, 16, tok.eos_token_id, Engine(model, len(prompts), width, fuse=False))
    assert all(r["first_divergence"] is None for r in rows) and verdict(rows)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.copy_(other.lm_head.weight[torch.randperm(other.lm_head.weight.shape[0])])
    rows = compare(model, model, fused, prompts, 16, tok.eos_token_id, Engine(other, len(prompts), width))
    assert any(r["first_divergence"] is not None for r in rows) and not verdict(rows)


def test_an_engine_with_overlapped_steps_gives_its_references_tokens(tiny):
    """--overlap-steps --reference same-engine: queued steps change no token (on the CPU as on a GPU: the same rows)."""
    model, tok, prompts = tiny
    width = max(map(len, prompts)) + 17
    overlapped = Engine(model, slots=2, max_len=width, overlap_steps=True)  # fewer slots than prompts: refills
    rows = compare(model, model, overlapped, prompts, 16, tok.eos_token_id, Engine(model, 2, width))
    assert all(r["first_divergence"] is None for r in rows) and verdict(rows)
    assert overlapped.stats["overlap_used_steps"] > 0


def test_a_different_model_in_the_engine_diverges_and_is_not_called_a_tie(tiny):
    """The engine runs on a copy whose LM head is scrambled: its tokens differ from the first one, and the gaps at
    the divergences are real preferences, far beyond the (zero) low-precision error of an fp32 model."""
    import copy

    model, tok, prompts = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.copy_(other.lm_head.weight[torch.randperm(other.lm_head.weight.shape[0])])
    engine = Engine(other, slots=len(prompts), max_len=max(map(len, prompts)) + 17)
    rows = compare(model, model, engine, prompts, 16, tok.eos_token_id)
    diverged = [r for r in rows if r["first_divergence"] is not None]
    assert diverged and all(not r["tie"] and r["fp32_gap"] > 0 for r in diverged)
    assert not verdict(rows)
    # the reference is the fp32 model's own greedy decode: at each divergence fp32 picks its token, never the engine's
    assert fp32_sides(rows) == {"fp32_picks_engine_token": 0, "fp32_picks_reference_token": len(diverged)}


def test_a_tie_is_a_gap_within_twice_the_low_precision_error(tiny):
    model, _, prompts = tiny
    import copy

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    best, worst = int(logits.argmax()), int(logits.argmin())
    same = tie_at(bf16, model, prompts[0], best, best)
    assert same["tie"] and same["fp32_gap"] == 0 and same["fp32_argmax"] == best
    far = tie_at(bf16, model, prompts[0], best, worst)
    assert not far["tie"] and far["fp32_gap"] > 2 * far["low_precision_error"] > 0
    # bf16's spacing at the larger logit: 2^-7 of the power of two below it
    top = max(abs(float(logits[best])), abs(float(logits[worst])))
    assert far["logit"] == pytest.approx(top) and far["bf16_ulp"] <= top * 2**-7 < 2 * far["bf16_ulp"]


def test_the_real_models_prompts_are_the_held_out_questions_in_its_chat_template(tiny):
    from engine_greedy_check import prompts_for

    _, tok, _ = tiny
    prompts = prompts_for("smollm2", tok, 3)
    text = tok.decode(prompts[0])
    assert len(prompts) == 3 and "Maria buys 5 notebooks" in text
    assert text.rstrip().endswith(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                          add_generation_prompt=True).rstrip()[-8:])
    randoms = prompts_for("r1-random", tok, 20)
    assert len(randoms) == 20 and all(20 <= len(p) < 400 for p in randoms)
    assert randoms == prompts_for("r1-random", tok, 20)  # fixed: the same prompts in every run
