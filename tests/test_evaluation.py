"""Evaluation helper: per-source summary (accuracy, out-of-budget shares, thinking length), the
side-by-side table, JSONL output, a fixed evaluation set, and a real run on the tiny model."""
import json

import pytest

from llmhelpers.config.profiles import make_config
from llmhelpers.data.sources import Example, build_datasets
from llmhelpers.evaluation.protocol import EvalResult, EvalRow, comparison_table, evaluate, evaluation_set


def row(source, correct, finished=True, answered=True, think=10, problem="q", sample=0, final="1", hit=None):
    return EvalRow(id="", source=source, question=problem, gold="1", output="o", correct=correct,
                   finished_thinking=finished, answered=answered, thinking_tokens=think, new_tokens=20,
                   hit_budget=(not finished) if hit is None else hit, sample=sample, final=final if answered else None)


def test_pass_at_1_is_the_mean_over_samples_and_majority_vote_grades_the_most_common_answer():
    rows = [  # problem a: 3 of 4 samples say 7 (right); problem b: 2 say 5 (wrong), 1 says 6 (right), 1 none
        row("math500/algebra", True, problem="a", sample=0, final="7"),
        row("math500/algebra", True, problem="a", sample=1, final=" 7"),
        row("math500/algebra", False, problem="a", sample=2, final="8"),
        row("math500/algebra", True, problem="a", sample=3, final="7 "),
        row("math500/algebra", False, problem="b", sample=0, final="5"),
        row("math500/algebra", True, problem="b", sample=1, final="6"),
        row("math500/algebra", False, problem="b", sample=2, final="5"),
        row("math500/algebra", False, problem="b", sample=3, answered=False, finished=False, think=99),
    ]
    s = EvalResult("x", rows).summary()["math500"]
    assert s["problems"] == 2 and s["samples"] == 4
    assert s["pass@1"] == 4 / 8
    assert s["maj@k"] == 1 / 2  # a: 7 wins and is right; b: 5 wins and is wrong
    assert s["hit_budget"] == 1 / 8 and s["pass@1_finished"] == 4 / 7
    assert s["mean_thinking_tokens"] == (7 * 10 + 99) / 8 and s["p90_thinking_tokens"] == 10  # nearest rank: 7th of 8


def test_a_tie_goes_to_the_answer_seen_first_and_no_answer_never_wins():
    from llmhelpers.evaluation.protocol import majority_correct

    assert majority_correct([row("m", True, final="2"), row("m", False, final="3")])
    assert not majority_correct([row("m", False, final="3"), row("m", True, final="2")])
    assert majority_correct([row("m", False, answered=False), row("m", False, answered=False),
                             row("m", True, final="2")])
    assert not majority_correct([row("m", False, answered=False)])


def test_budget_hits_are_counted_and_finished_only_accuracy_leaves_them_out():
    rows = [row("scibench/quan", True), row("scibench/quan", False, finished=False, answered=False),
            row("scibench/quan", False, finished=True, hit=True), row("scibench/quan", False)]
    s = EvalResult("x", [dict_replace(r, question=f"p{i}") for i, r in enumerate(rows)]).summary()["scibench"]
    assert s["hit_budget"] == 2 / 4 and s["no_think_end"] == 1 / 4
    assert s["pass@1"] == 1 / 4 and s["pass@1_finished"] == 1 / 2
    assert EvalResult("y", [row("m", False, hit=True)]).summary()["m"]["pass@1_finished"] is None


def dict_replace(r, **kw):
    import dataclasses

    return dataclasses.replace(r, **kw)


def test_comparison_table_and_jsonl(tmp_path):
    a = EvalResult("base", [row("mathcodeinstruct", False), row("scibench/quan", False, problem="z")])
    b = EvalResult("finetuned", [row("mathcodeinstruct", True), row("scibench/quan", True, problem="z")])
    table = comparison_table([a, b])
    lines = table.splitlines()
    assert "pass@1" in lines[0] and "maj@k" in lines[0] and "hit budget" in lines[0] and "p90" in lines[0]
    base_all = next(l for l in lines if l.startswith("base") and " all " in l)
    tuned_all = next(l for l in lines if l.startswith("finetuned") and " all " in l)
    assert "0.0%" in base_all and "100.0%" in tuned_all
    path = b.save_jsonl(tmp_path / "b.jsonl")
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["label"] == "finetuned" and rows[0]["correct"] is True
    assert {"sample", "final", "hit_budget"} <= set(rows[0])


def test_evaluation_set_is_fixed_and_includes_heldout(tok_current):
    cfg = make_config("smoke", eval_limit=0)
    data = build_datasets(cfg, tok_current)
    s1, s2 = evaluation_set(data, cfg), evaluation_set(data, cfg)
    assert [e.question for e in s1] == [e.question for e in s2]
    assert len(s1) == len(data.eval_examples) + len(data.heldout)
    assert len(evaluation_set(data, make_config("smoke", eval_limit=5))) == 5


def test_evaluate_on_tiny_model(tiny_model_dir, tmp_path):
    from llmhelpers.model.loading import load_base_model, load_tokenizer

    cfg = make_config("smoke", tiny_model_dir=str(tiny_model_dir), eval_max_new_tokens=8)
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg)
    exs = [Example(question=f"What is {i} plus 1?", reasoning="", answer="", gold=str(i + 1), source="scibench/x")
           for i in range(3)]
    res = evaluate(model, tok, exs, cfg, "tiny", save_dir=tmp_path, progress=False)
    assert len(res.rows) == 3 * cfg.eval_samples and all(r.thinking_tokens <= r.new_tokens <= 8 for r in res.rows)
    assert sorted(r.sample for r in res.rows) == sorted(list(range(cfg.eval_samples)) * 3)
    assert (tmp_path / "tiny.jsonl").exists()
    # A random model never closes its thinking in 8 tokens: counted as out of budget, not as an answer.
    assert all(not r.correct for r in res.rows if not r.finished_thinking)


def test_the_evaluation_cells_give_the_base_and_the_trained_model_and_can_be_re_run(tiny_trainer):
    """Section 9: `base_for_evaluation` is the model as published (bf16 here: eval_bf16), `finetuned_for_evaluation`
    the adapters merged into the NF4 values training saw, loaded afresh each time (a re-run cell merges once, not
    twice); with eval_bf16=False both are the training model in place, adapters off and on."""
    import torch

    from llmhelpers.evaluation.protocol import base_for_evaluation, finetuned_for_evaluation
    from llmhelpers.training.run import save_adapters

    trainer, cfg, tok, _ = tiny_trainer()
    model = trainer.model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # adapters that change the logits
    adapter_dir = save_adapters(model, tok, cfg)
    ids = torch.tensor([tok.encode("What is 2 + 3?")])
    with torch.no_grad():
        trained = model(ids).logits.float()
        with model.disable_adapter():
            base_4bit = model(ids).logits.float()
        with base_for_evaluation(cfg, model) as base:
            assert not getattr(base, "is_loaded_in_4bit", False)
            published = base(ids).logits.float()
        merged = []
        for _ in range(2):
            with finetuned_for_evaluation(cfg, model, adapter_dir) as tuned:
                assert not any("lora" in name for name, _ in tuned.named_parameters())
                merged.append(tuned(ids).logits.float())
        assert torch.equal(merged[0], merged[1])
        assert (merged[0] - trained).abs().max() < 1e-3  # the merged model is the trained one
        assert (published - trained).abs().max() > 20 * (merged[0] - trained).abs().max()
        in_place = cfg.replace(eval_bf16=False)
        with base_for_evaluation(in_place, model) as base:
            assert base is model and torch.equal(base(ids).logits.float(), base_4bit)
        with finetuned_for_evaluation(in_place, model) as tuned:
            assert torch.equal(tuned(ids).logits.float(), trained)
    with pytest.raises(ValueError, match="pass adapter_dir="):
        with finetuned_for_evaluation(cfg, model):
            pass


def test_the_decode_kernels_setting_reaches_the_engine(tiny_model_dir, monkeypatch):
    """eval_decode_kernels: True leaves the choice to the engine (its fused kernels on a GPU), False asks for the
    model's own modules."""
    import llmhelpers.inference.engine as engine_module
    from llmhelpers.evaluation.protocol import answer_examples
    from llmhelpers.model.loading import load_base_model, load_tokenizer

    seen = []

    class Recording(engine_module.Engine):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("elementwise", "not passed"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", Recording)
    exs = [Example(question="What is 1 plus 1?", reasoning="", answer="", gold="2", source="scibench/x")]
    for setting in (True, False):
        cfg = make_config("smoke", tiny_model_dir=str(tiny_model_dir), eval_max_new_tokens=4, eval_samples=1,
                          eval_decode_kernels=setting)
        model = load_base_model(cfg, quantized=False)
        answers = answer_examples(model, load_tokenizer(cfg), exs, cfg, tool_execution=False)
        assert len(answers) == 1 and len(answers[0]) == 1
    assert seen == [None, "model"]
