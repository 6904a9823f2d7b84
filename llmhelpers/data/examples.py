"""The two records every other module shares: a converted `Example`, and `BadRow` for a row that
cannot become one. They live apart from the data adapters so that `chat` and `grading` can use them
without importing the loaders."""
from __future__ import annotations

from dataclasses import dataclass


class BadRow(ValueError):
    """A row that cannot become an Example; `reason` is a short key used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    question: str  # the user turn, instruction included
    reasoning: str  # goes inside <think>...</think>; "" when the source has none
    answer: str  # the text after </think>, holding \boxed{gold}
    gold: str  # the final answer alone, as the source gives it
    source: str  # "mathcodeinstruct" or "scibench/<subject>"
    unit: str = ""  # SciBench: unit with any power of ten removed (shown in the question)
    unit_exponent: int = 0  # SciBench: the true value is float(gold) * 10**unit_exponent
    id: str = ""

    @property
    def numeric(self) -> bool:
        return self.source.startswith("scibench")

    @property
    def gold_value(self) -> float:
        return float(self.gold) * 10.0 ** self.unit_exponent
