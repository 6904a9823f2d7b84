"""Is a model's output right? The final answer is the last \\boxed{} after </think>.

Math answers are compared with Hugging Face's math-verify (fractions, radicals, intervals,
tuples, LaTeX against plain text). SciBench answers are numbers compared with SciBench's 5%
relative tolerance against answer_number x 10^(power of ten in the unit). For numeric
answers only, an answer without a box falls back to the last number after </think>.
"""
from __future__ import annotations

import re

from llmhelpers.data.answers import last_boxed
from llmhelpers.data.chat import END_THINK, split_thinking

from llmhelpers.data.examples import Example

REL_TOL = 0.05  # SciBench's own grading tolerance

_CLEAN = [(re.compile(p), r) for p, r in [
    (r"\\[,;:! ]", ""), (r"~", " "), (r"−", "-"), (r"\{,\}", ","), (r"\\left|\\right", ""),
    (r"\\(?:text|mathrm|mbox|operatorname)\s*\{([^{}]*)\}", r" \1 "), (r"\$", " "), (r"\\approx|\\sim|≈", "="),
    (r"\\dfrac|\\tfrac", r"\\frac"),
]]
_NUMBER = re.compile(r"""
    (?<![\w.])
    (?:10\s*\^\s*\{?\s*(?P<bare>[-+]?\d+)\s*\}?
     |(?P<mant>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+)
       (?:\s*[eE]\s*(?P<e>[-+]?\d+)
        |\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*(?:\^|\*\*)\s*\{?\s*(?P<p>[-+]?\d+)\s*\}?)?)
""", re.X)


def _clean(text: str) -> str:
    for pattern, repl in _CLEAN:
        text = pattern.sub(repl, text)
    return text


def _match_value(m: re.Match) -> float:
    if m.group("bare") is not None:
        return 10.0 ** int(m.group("bare"))
    value = float(m.group("mant").replace(",", ""))
    exp = m.group("e") or m.group("p")
    return value * 10.0 ** int(exp) if exp else value


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, reading 1.91 \\times 10^{-47}, 1.91e-47 and 1,234.5 as one number each."""
    return [_match_value(m) for m in _NUMBER.finditer(_clean(text))]


def parse_number(text: str) -> float | None:
    """The value of a final answer such as '1.91 \\times 10^{-47} kg' or '\\frac{3}{4}'; None if none."""
    cleaned = _clean(text).strip()
    if "\\frac" in cleaned or "\\sqrt" in cleaned or "\\pi" in cleaned:
        value = _sympy_value(text)
        if value is not None:
            return value
    nums = numbers_in(text)
    return nums[0] if nums else None


def _sympy_value(text: str) -> float | None:
    from math_verify import parse

    for item in parse(f"${text}$"):
        try:
            return float(item)
        except (TypeError, ValueError):
            continue
    return None


def final_answer(output_text: str) -> str | None:
    """The last \\boxed{} after </think>, or None if the model never closed its thinking or boxed nothing."""
    if END_THINK not in output_text:
        return None
    _, answer = split_thinking(output_text)
    return last_boxed(answer)


def is_numeric_gold(example: Example) -> bool:
    return example.numeric or parse_number(example.gold) is not None and bool(
        re.fullmatch(r"[-+]?[\d,]*\.?\d+(?:[eE][-+]?\d+)?", example.gold.strip()))


def close_enough(pred: float, gold: float, rel_tol: float = REL_TOL) -> bool:
    if gold == 0:
        return abs(pred) < 1e-9
    return abs(pred - gold) <= rel_tol * abs(gold)


def is_correct(output_text: str, example: Example) -> bool:
    if END_THINK not in output_text:
        return False  # ran out of budget while thinking: no answer
    _, answer = split_thinking(output_text)
    boxed = last_boxed(answer)
    if example.numeric:
        text = boxed if boxed is not None else (answer if answer else "")
        nums = [parse_number(boxed)] if boxed is not None else numbers_in(text)[-1:]
        return bool(nums) and nums[0] is not None and close_enough(nums[0], example.gold_value)
    if boxed is None:
        if is_numeric_gold(example):
            nums = numbers_in(answer)
            return bool(nums) and nums[-1] == float(example.gold.replace(",", ""))
        return False
    return _math_equal(boxed, example.gold)


def _math_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$")
    pred_parsed = parse(f"${pred}$")
    if not gold_parsed or not pred_parsed:
        return pred.strip() == gold.strip()
    return bool(verify(gold_parsed, pred_parsed))
