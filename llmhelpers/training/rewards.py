"""Verifiable rewards for reinforcement learning after SFT (GRPO, issue #33), from the project's own grading.

TRL's `GRPOTrainer` calls each reward function with the prompts, the completions and the dataset's other columns, one
list entry per completion, and logs each function's mean apart (`rewards/<name>/mean`). Two are built here:

- `correct`: 1 when `grading.is_correct` accepts the answer against the gold one (math-verify for math, SciBench's 5%
  relative tolerance for science; equivalent forms count), else 0;
- `format`: 1 when the thinking is closed and exactly one \\boxed{} answer follows it, else 0: a small shaping reward
  (weighted down in GRPOConfig's `reward_weights`).

A reward that raises or is not finite for one completion gives that completion 0, counted and reported in a warning;
it never stops the run. `rl_dataset` builds the prompts with their gold answers and refuses a dataset without them.
"""
from __future__ import annotations

import math
import warnings

from llmhelpers.data.chat import END_THINK, render_prompt, split_thinking
from llmhelpers.data.examples import Example
from llmhelpers.evaluation.grading import is_correct

GOLD_COLUMNS = ("gold", "source", "unit", "unit_exponent")  # what grading needs of each problem, as dataset columns


def completion_text(completion) -> str:
    """A completion as text: TRL passes strings for text prompts and message lists for conversational ones."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role", "assistant") == "assistant")


def example_of(row: dict) -> Example:
    """The grading record of one dataset row (its gold columns)."""
    return Example(question=row.get("question", ""), reasoning="", answer="", gold=str(row["gold"]),
                   source=row["source"], unit=row.get("unit", ""), unit_exponent=int(row.get("unit_exponent", 0)))


def correct(text: str, row: dict) -> float:
    return 1.0 if is_correct(text, example_of(row)) else 0.0


def answer_format(text: str, row: dict) -> float:
    if END_THINK not in text:
        return 0.0
    _, answer = split_thinking(text)
    return 1.0 if answer.count("\\boxed{") == 1 else 0.0


class SafeReward:
    """A reward function as TRL calls it, made safe for a run: a completion whose score raises or is not finite gets
    0, and the count is reported (`failures`, and a warning naming the first error)."""

    def __init__(self, score, name: str):
        self.score, self.__name__ = score, name  # TRL logs rewards/<__name__>/mean
        self.failures = 0

    def __call__(self, prompts=None, completions=None, **columns) -> list[float]:
        n = len(completions)
        rows = [{k: v[i] for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == n}
                for i in range(n)]
        scores, failed, first = [], 0, None
        for completion, row in zip(completions, rows):
            try:
                value = float(self.score(completion_text(completion), row))
                if not math.isfinite(value):
                    raise ValueError(f"the score was {value}")
            except Exception as err:  # one bad completion must not end a run of hours
                value, failed = 0.0, failed + 1
                first = first or f"{type(err).__name__}: {err}"
            scores.append(value)
        if failed:
            self.failures += failed
            warnings.warn(f"reward {self.__name__}: {failed} of {n} completions could not be scored and get 0 "
                          f"({self.failures} so far in this run); the first: {first}", RuntimeWarning, stacklevel=2)
        return scores


def reward_functions() -> list[SafeReward]:
    """[correct, format], in the order of GRPOConfig's reward_weights."""
    return [SafeReward(correct, "correct"), SafeReward(answer_format, "format")]


def rl_dataset(examples, tokenizer):
    """The problems as GRPO's dataset: `prompt` (the R1 chat prompt, thinking opened as in evaluation) and the gold
    columns the rewards read. Problems without a gold answer are left out and counted; a set with none is refused."""
    from datasets import Dataset

    examples = list(examples)
    usable = [e for e in examples if str(e.gold).strip()]
    if not usable:
        raise ValueError(f"none of the {len(examples)} problems has a gold answer: GRPO rewards correctness "
                         "against it (use problems in MathCodeInstruct's or SciBench's schema with their answers)")
    if len(usable) < len(examples):
        print(f"rl_dataset: {len(examples) - len(usable)} of {len(examples)} problems have no gold answer and "
              "are left out")
    return Dataset.from_dict({
        "prompt": [render_prompt(e, tokenizer) for e in usable],
        "question": [e.question for e in usable],
        **{column: [getattr(e, column) for e in usable] for column in GOLD_COLUMNS},
    })
