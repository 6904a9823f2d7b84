"""Answer accuracy on held-out problems, per source, base against fine-tuned.

`evaluate` generates for each problem, grades it with `grading.is_correct`, and keeps the
per-problem record (saved as JSONL). `comparison_table` puts several runs side by side.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from llmhelpers.data.chat import END_THINK
from llmhelpers.data.chat import render_prompt
from llmhelpers.data.sources import percentile
from llmhelpers.inference.generation import generate
from llmhelpers.inference.sampling import SamplingParams
from llmhelpers.inference.tool_use import tool_runner
from llmhelpers.evaluation.grading import final_answer, is_correct


def answer_examples(model, tokenizer, examples, cfg, progress: bool = False, samples: int | None = None,
                    tool_execution: bool | None = None) -> list[list]:
    """cfg.eval_samples answers per example (sampled at cfg's temperature and top-p, seeded), grouped per example;
    python blocks executed when `tool_execution` (default cfg.tool_execution)."""
    samples = cfg.eval_samples if samples is None else samples
    prompts = [render_prompt(ex, tokenizer) for ex in examples]
    with tool_runner(tokenizer, cfg, tool_execution) as runner:
        flat = generate(model, tokenizer, prompts, SamplingParams.for_evaluation(cfg), cfg.eval_batch_size,
                        progress=progress, samples=samples, tools=runner, kv_cache_dtype=cfg.eval_kv_cache_dtype,
                        decode_kernels=cfg.eval_decode_kernels)
    return [flat[i * samples:(i + 1) * samples] for i in range(len(examples))]


@dataclass
class EvalRow:
    id: str
    source: str
    question: str
    gold: str
    output: str
    correct: bool
    finished_thinking: bool  # </think> appeared within the budget
    answered: bool  # a \\boxed{} answer after </think>
    thinking_tokens: int
    new_tokens: int
    hit_budget: bool  # stopped by the token budget, not by the model
    sample: int = 0  # which of the problem's eval_samples answers this is
    final: str | None = None  # the extracted final answer (for the majority vote)
    tool_calls: int = 0  # python blocks executed for this answer (0 with tool execution off)
    tool_errors: int = 0  # blocks that raised, timed out, or could not run
    tool_timeouts: int = 0


def majority_correct(rows: list[EvalRow]) -> bool:
    """maj@k for one problem: the most common final answer among its samples (ties: the one seen first) is graded.
    Answers are compared after dropping spaces; no answer never wins a vote."""
    votes: dict[str, list[EvalRow]] = {}
    for r in rows:
        if r.final is not None:
            votes.setdefault("".join(r.final.split()), []).append(r)
    if not votes:
        return False
    best = max(votes.values(), key=len)  # max keeps the first of equal counts
    return best[0].correct


@dataclass
class EvalResult:
    label: str
    rows: list[EvalRow]

    def summary(self) -> dict[str, dict]:
        """Per source and overall: problems, samples per problem, pass@1 (mean correctness over all samples),
        maj@k, the share of answers that hit the budget, pass@1 over finished answers only, and thinking length."""
        groups: dict[str, list[EvalRow]] = defaultdict(list)
        for r in self.rows:
            groups[r.source.split("/")[0]].append(r)
            groups["all"].append(r)
        out = {}
        for name, rows in groups.items():
            problems: dict[tuple, list[EvalRow]] = defaultdict(list)
            for r in rows:
                problems[(r.source, r.id, r.question)].append(r)
            finished = [r for r in rows if not r.hit_budget]
            thinking = [r.thinking_tokens for r in rows]
            n = len(rows)
            out[name] = {
                "problems": len(problems),
                "samples": n // max(1, len(problems)),
                "pass@1": sum(r.correct for r in rows) / n,
                "maj@k": sum(majority_correct(p) for p in problems.values()) / len(problems),
                "hit_budget": sum(r.hit_budget for r in rows) / n,
                "pass@1_finished": sum(r.correct for r in finished) / len(finished) if finished else None,
                "no_think_end": sum(not r.finished_thinking for r in rows) / n,
                "no_answer": sum(not r.answered for r in rows) / n,
                "mean_thinking_tokens": sum(thinking) / n,
                "p90_thinking_tokens": percentile(thinking, 0.9),
                "tool_calls_per_answer": sum(r.tool_calls for r in rows) / n,
                "tool_errors": sum(r.tool_errors for r in rows),
                "tool_timeouts": sum(r.tool_timeouts for r in rows),
            }
        return out

    @property
    def accuracy(self) -> float:
        """pass@1 over every problem and sample."""
        return self.summary()["all"]["pass@1"] if self.rows else 0.0

    def save_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps({"label": self.label, **asdict(r)}, ensure_ascii=False) + "\n")
        return path


def evaluation_set(data, cfg) -> list:
    """The problems graded: cfg.eval_set "heldout" (the eval split plus the SciBench problems without worked
    solutions), "math500" (cfg.math500_dataset) or a file of problems in MathCodeInstruct's schema; shuffled with the
    seed and capped at cfg.eval_limit, so that every run grades the same problems."""
    if cfg.eval_set == "math500":
        from llmhelpers.data.sources import load_math500

        pool, _ = load_math500(cfg)
    elif cfg.eval_set != "heldout":
        from llmhelpers.data.sources import load_problem_file

        pool, _ = load_problem_file(cfg.eval_set)
    else:
        pool = list(data.eval_examples) + list(data.heldout)
    random.Random(cfg.seed).shuffle(pool)
    return pool[:cfg.eval_limit] if cfg.eval_limit else pool


def evaluate(model, tokenizer, examples, cfg, label: str, save_dir: str | Path | None = None,
             progress: bool = True, samples: int | None = None, tool_execution: bool | None = None) -> EvalResult:
    """cfg.eval_samples sampled answers per problem (or `samples`), graded; rows saved as JSONL under save_dir.
    Python blocks are executed when `tool_execution` (default cfg.tool_execution)."""
    answers = answer_examples(model, tokenizer, examples, cfg, progress=progress, samples=samples, tool_execution=tool_execution)
    rows = []
    for ex, gens in zip(examples, answers):
        for k, g in enumerate(gens):
            rows.append(EvalRow(
                id=ex.id, source=ex.source, question=ex.question, gold=ex.gold, output=g.text,
                correct=is_correct(g.text, ex), finished_thinking=END_THINK in g.text,
                answered=final_answer(g.text) is not None, thinking_tokens=g.thinking_tokens,
                new_tokens=g.new_tokens, hit_budget=g.hit_budget, sample=k, final=final_answer(g.text),
                tool_calls=g.tool_calls, tool_errors=g.tool_errors, tool_timeouts=g.tool_timeouts))
    result = EvalResult(label, rows)
    if save_dir is not None:
        result.save_jsonl(Path(save_dir) / f"{label}.jsonl")
    return result


@contextmanager
def base_for_evaluation(cfg, model=None):
    """The base model to grade, freed on exit. With cfg.eval_bf16 (default): loaded in the compute dtype, the model as
    published, on the engine's fast path (about 5x the 4-bit training model's speed, BENCHMARKS.md). Otherwise
    `model`, the 4-bit training model, with its adapters switched off: slower, no extra memory."""
    from llmhelpers.model.loading import check_model_matches, load_base_model

    if not cfg.eval_bf16:
        if model is None:
            raise ValueError("eval_bf16=False evaluates the training model in place: pass model=")
        check_model_matches(model, cfg)
        with model.disable_adapter():
            yield model
        return
    plain = load_base_model(cfg, quantized=False)
    try:
        yield plain
    finally:
        del plain
        _free_memory()


@contextmanager
def finetuned_for_evaluation(cfg, model=None, adapter_dir=None):
    """The fine-tuned model to grade, freed on exit. With cfg.eval_bf16 (default): the base loaded in the compute
    dtype, its 4-bit layers set to the NF4 values training saw, and the saved adapters (`adapter_dir`, what
    save_adapters returned) merged in: what a merged deployment runs. Otherwise `model`, the training model with its
    adapters on."""
    from llmhelpers.model.loading import (add_adapters, check_adapter_matches, check_model_matches, load_base_model,
                                          use_trained_base_weights)

    if not cfg.eval_bf16:
        if model is None:
            raise ValueError("eval_bf16=False evaluates the training model in place: pass model=")
        check_model_matches(model, cfg)
        yield model
        return
    if adapter_dir is None:
        raise ValueError("eval_bf16=True merges the saved adapters into a bf16 base: pass adapter_dir= "
                         "(what save_adapters returned)")
    check_adapter_matches(adapter_dir, cfg)
    plain = load_base_model(cfg, quantized=False)
    use_trained_base_weights(plain, cfg)  # the NF4 values the adapters were trained on
    merged = add_adapters(plain, adapter_dir, cfg).merge_and_unload()
    try:
        yield merged
    finally:
        del plain, merged
        _free_memory()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_finetuned(model, tokenizer, examples, cfg, save_dir=None) -> list[EvalResult]:
    """"finetuned", plus "finetuned-no-tools" (the model writing its own outputs, as Ollama runs it) when
    cfg.tool_execution and cfg.eval_without_tools."""
    runs = [evaluate(model, tokenizer, examples, cfg, "finetuned", save_dir)]
    if cfg.tool_execution and cfg.eval_without_tools:
        runs.append(evaluate(model, tokenizer, examples, cfg, "finetuned-no-tools", save_dir, tool_execution=False))
    return runs


def evaluate_base_and_finetuned(cfg, tokenizer, examples, model=None, adapter_dir=None, save_dir=None
                                ) -> list[EvalResult]:
    """The notebook's two evaluation cells in one call (the CLI's --evaluate): [base, finetuned(, no-tools)]."""
    save_dir = save_dir or cfg.eval_dir
    with base_for_evaluation(cfg, model) as base_model:
        base = evaluate(base_model, tokenizer, examples, cfg, "base", save_dir)
    with finetuned_for_evaluation(cfg, model, adapter_dir) as tuned_model:
        return [base, *evaluate_finetuned(tuned_model, tokenizer, examples, cfg, save_dir)]


def comparison_table(results: list[EvalResult]) -> str:
    """One block of rows per run: per source pass@1, maj@k, the share of answers that hit the budget, pass@1 over
    finished answers only ("fin. p@1"), mean and 90th-percentile thinking length ("think", "p90"; budget effects made
    visible), tool calls per answer, tool errors and timeouts. 118 characters wide: fits a notebook output."""
    head = (f"{'run':<19}{'source':<17}{'probs':>6}{'k':>3}{'pass@1':>8}{'maj@k':>7}{'hit budget':>11}"
            f"{'fin. p@1':>9}{'think':>7}{'p90':>6}{'tools':>7}{'errors':>7}{'timeouts':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        summary = r.summary()
        for source in sorted(summary, key=lambda s: (s == "all", s)):
            m = summary[source]
            fin = "n/a" if m["pass@1_finished"] is None else f"{m['pass@1_finished']:.1%}"
            lines.append(f"{r.label[:18]:<19}{source[:16]:<17}{m['problems']:>6}{m['samples']:>3}{m['pass@1']:>8.1%}"
                         f"{m['maj@k']:>7.1%}{m['hit_budget']:>11.1%}{fin:>9}{m['mean_thinking_tokens']:>7.0f}"
                         f"{m['p90_thinking_tokens']:>6.0f}{m['tool_calls_per_answer']:>7.2f}"
                         f"{m['tool_errors']:>7}{m['tool_timeouts']:>9}")
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
        import torch

        # the answers are sampled (and seeded): the training RNG is put back afterwards, so dropout and anything else
        # drawn after this save draw what they would have without the callback (a resume is exact with it on)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate(model, self.tokenizer, self.examples, self.cfg, label=f"step-{state.global_step}",
                              progress=False, samples=1)  # one answer each: a trend during training, not the protocol
        self.history.append((state.global_step, result.accuracy))
        if self.trainer is not None:
            self.trainer.log({"eval_accuracy": result.accuracy})
