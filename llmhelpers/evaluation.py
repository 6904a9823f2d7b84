"""Answer accuracy on held-out problems, per source, base against fine-tuned.

`evaluate` generates for each problem, grades it with `grading.is_correct`, and keeps the
per-problem record (saved as JSONL). `comparison_table` puts several runs side by side.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from .chat import END_THINK
from .generation import answer_examples
from .grading import final_answer, is_correct


@dataclass
class EvalRow:
    id: str
    source: str
    question: str
    gold: str
    output: str
    correct: bool
    finished_thinking: bool  # </think> appeared within the budget
    answered: bool  # a \boxed{} answer after </think>
    thinking_tokens: int
    new_tokens: int
    hit_budget: bool


@dataclass
class EvalResult:
    label: str
    rows: list[EvalRow]

    def summary(self) -> dict[str, dict]:
        groups: dict[str, list[EvalRow]] = defaultdict(list)
        for r in self.rows:
            groups[r.source.split("/")[0]].append(r)
            groups["all"].append(r)
        out = {}
        for name, rows in groups.items():
            n = len(rows)
            out[name] = {
                "n": n,
                "accuracy": sum(r.correct for r in rows) / n,
                "no_think_end": sum(not r.finished_thinking for r in rows) / n,
                "no_answer": sum(not r.answered for r in rows) / n,
                "mean_thinking_tokens": sum(r.thinking_tokens for r in rows) / n,
            }
        return out

    @property
    def accuracy(self) -> float:
        return self.summary()["all"]["accuracy"] if self.rows else 0.0

    def save_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps({"label": self.label, **asdict(r)}, ensure_ascii=False) + "\n")
        return path


def evaluation_set(data, cfg) -> list:
    """The eval split (math and science with worked solutions) plus the SciBench held-out problems,
    capped at cfg.eval_limit with a fixed seed so that every run grades the same problems."""
    pool = list(data.eval_examples) + list(data.heldout)
    random.Random(cfg.seed).shuffle(pool)
    return pool[:cfg.eval_limit] if cfg.eval_limit else pool


def evaluate(model, tokenizer, examples, cfg, label: str, save_dir: str | Path | None = None,
             progress: bool = True) -> EvalResult:
    gens = answer_examples(model, tokenizer, examples, cfg, progress=progress)
    rows = []
    for ex, g in zip(examples, gens):
        rows.append(EvalRow(
            id=ex.id, source=ex.source, question=ex.question, gold=ex.gold, output=g.text,
            correct=is_correct(g.text, ex), finished_thinking=END_THINK in g.text,
            answered=final_answer(g.text) is not None,
            thinking_tokens=g.thinking_tokens,
            new_tokens=g.new_tokens, hit_budget=g.hit_budget))
    result = EvalResult(label, rows)
    if save_dir is not None:
        result.save_jsonl(Path(save_dir) / f"{label}.jsonl")
    return result


def evaluate_base_and_finetuned(cfg, tokenizer, examples, model=None, adapter_dir=None, save_dir=None):
    """Grade the base model and the fine-tuned one on the same problems.

    With cfg.eval_bf16 (default) the base is loaded once in the compute dtype, evaluated, then the saved
    adapters are merged into it in memory and it is evaluated again: what a merged deployment runs, and
    about 5x the speed of generating with the 4-bit training model (BENCHMARKS.md); `adapter_dir` is
    the folder save_adapters returned. Otherwise the
    adapter of `model` (the 4-bit training model) is switched off and on in place: slower, no extra memory.
    """
    import gc

    import torch

    from .modeling import check_adapter_matches, check_model_matches

    save_dir = save_dir or cfg.eval_dir
    if not cfg.eval_bf16:
        if model is None:
            raise ValueError("eval_bf16=False evaluates the training model in place: pass model=")
        check_model_matches(model, cfg)
        with model.disable_adapter():
            base = evaluate(model, tokenizer, examples, cfg, "base", save_dir)
        return base, evaluate(model, tokenizer, examples, cfg, "finetuned", save_dir)

    from peft import PeftModel

    from .modeling import load_base_model, quiet_peft

    if adapter_dir is None:
        raise ValueError("eval_bf16=True merges the saved adapters into a bf16 base: pass adapter_dir= "
                         "(what save_adapters returned)")
    check_adapter_matches(adapter_dir, cfg)
    plain = load_base_model(cfg, quantized=False)
    base = evaluate(plain, tokenizer, examples, cfg, "base", save_dir)
    with quiet_peft():
        merged = PeftModel.from_pretrained(plain, str(adapter_dir)).merge_and_unload()
    tuned = evaluate(merged, tokenizer, examples, cfg, "finetuned", save_dir)
    del plain, merged
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return base, tuned


def comparison_table(results: list[EvalResult]) -> str:
    """Accuracy, out-of-budget shares and thinking length per source, one column block per run."""
    summaries = [(r.label, r.summary()) for r in results]
    sources = sorted({s for _, summ in summaries for s in summ}, key=lambda s: (s == "all", s))
    head = f"{'source':<18}{'n':>5}" + "".join(
        f"  {label[:10]:>10} acc  no-</think>  no-answer  think-tok" for label, _ in summaries)
    lines = [head, "-" * len(head)]
    for s in sources:
        n = next((summ[s]["n"] for _, summ in summaries if s in summ), 0)
        cells = ""
        for _, summ in summaries:
            m = summ.get(s)
            cells += ("  " + " " * 10 + " n/a" + " " * 34) if m is None else (
                f"  {m['accuracy']:>14.1%}  {m['no_think_end']:>11.1%}  {m['no_answer']:>9.1%}"
                f"  {m['mean_thinking_tokens']:>9.0f}")
        lines.append(f"{s:<18}{n:>5}{cells}")
    return "\n".join(lines)


class AccuracyCallback(TrainerCallback):
    """Grades a small fixed subset at each checkpoint save and logs `eval_accuracy` (TensorBoard)."""

    def __init__(self, examples, tokenizer, cfg):
        self.examples = list(examples)[:cfg.accuracy_callback_size]
        self.tokenizer, self.cfg = tokenizer, cfg
        self.trainer = None  # set by attach(trainer): logging goes through the trainer's loggers
        self.history: list[tuple[int, float]] = []

    def attach(self, trainer):
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.examples or not state.is_world_process_zero:
            return
        result = evaluate(model, self.tokenizer, self.examples, self.cfg, label=f"step-{state.global_step}",
                          progress=False)
        self.history.append((state.global_step, result.accuracy))
        if self.trainer is not None:
            self.trainer.log({"eval_accuracy": result.accuracy})
