"""Evaluation helper: per-source summary (accuracy, out-of-budget shares, thinking length), the
side-by-side table, JSONL output, a fixed evaluation set, and a real run on the tiny model."""
import json

import pytest

from llmhelpers.config import make_config
from llmhelpers.data import Example, build_datasets
from llmhelpers.evaluation import EvalResult, EvalRow, comparison_table, evaluate, evaluation_set


def row(source, correct, finished=True, answered=True, think=10):
    return EvalRow(id="", source=source, question="q", gold="1", output="o", correct=correct,
                   finished_thinking=finished, answered=answered, thinking_tokens=think, new_tokens=20,
                   hit_budget=not finished)


def test_summary_per_source_and_overall():
    res = EvalResult("x", [row("mathcodeinstruct", True), row("mathcodeinstruct", False, finished=False, answered=False, think=30),
                           row("scibench/quan", True), row("scibench/atkins", False, answered=False)])
    s = res.summary()
    assert s["mathcodeinstruct"] == {"n": 2, "accuracy": 0.5, "no_think_end": 0.5, "no_answer": 0.5,
                                     "mean_thinking_tokens": 20.0}
    assert s["scibench"]["n"] == 2 and s["scibench"]["accuracy"] == 0.5 and s["scibench"]["no_answer"] == 0.5
    assert s["all"]["n"] == 4 and res.accuracy == 0.5


def test_comparison_table_and_jsonl(tmp_path):
    a = EvalResult("base", [row("mathcodeinstruct", False), row("scibench/quan", False)])
    b = EvalResult("finetuned", [row("mathcodeinstruct", True), row("scibench/quan", True)])
    table = comparison_table([a, b])
    lines = table.splitlines()
    assert "base acc" in lines[0] and "finetuned acc" in lines[0]
    assert lines[-1].startswith("all") and "0.0%" in lines[-1] and "100.0%" in lines[-1]
    path = b.save_jsonl(tmp_path / "b.jsonl")
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["label"] == "finetuned" and rows[0]["correct"] is True


def test_evaluation_set_is_fixed_and_includes_heldout(tok_current):
    cfg = make_config("smoke", eval_limit=0)
    data = build_datasets(cfg, tok_current)
    s1, s2 = evaluation_set(data, cfg), evaluation_set(data, cfg)
    assert [e.question for e in s1] == [e.question for e in s2]
    assert len(s1) == len(data.eval_examples) + len(data.heldout)
    assert len(evaluation_set(data, make_config("smoke", eval_limit=5))) == 5


def test_evaluate_on_tiny_model(tiny_model_dir, tmp_path):
    from llmhelpers.modeling import load_base_model, load_tokenizer

    cfg = make_config("smoke", tiny_model_dir=str(tiny_model_dir), eval_max_new_tokens=8)
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg)
    exs = [Example(question=f"What is {i} plus 1?", reasoning="", answer="", gold=str(i + 1), source="scibench/x")
           for i in range(3)]
    res = evaluate(model, tok, exs, cfg, "tiny", save_dir=tmp_path, progress=False)
    assert len(res.rows) == 3 and all(r.thinking_tokens <= r.new_tokens <= 8 for r in res.rows)
    assert (tmp_path / "tiny.jsonl").exists()
    # A random model never closes its thinking in 8 tokens: counted as out of budget, not as an answer.
    assert all(not r.correct for r in res.rows if not r.finished_thinking)
