"""Answer grading on realistic outputs: boxed answers after </think>, math-verify equivalence for
MathCodeInstruct-style answers, SciBench numbers with unit powers of ten and 5% tolerance."""
import pytest

from llmhelpers.data.sources import Example
from llmhelpers.evaluation.grading import final_answer, is_correct, numbers_in, parse_number


def math(gold):
    return Example(question="q", reasoning="r", answer=f"\\boxed{{{gold}}}", gold=gold, source="mathcodeinstruct")


def sci(gold, exponent=0):
    return Example(question="q", reasoning="", answer="", gold=gold, source="scibench/quan", unit="J",
                   unit_exponent=exponent)


def out(answer, thinking="Let me think.\n"):
    return f"{thinking}</think>\n\n{answer}"


@pytest.mark.parametrize("gold,answer", [
    ("\\frac{1}{2}", "The answer is $\\boxed{0.5}$."),
    ("\\frac{1}{2}", "So $x = \\boxed{\\dfrac{1}{2}}$"),
    ("6\\sqrt{2}", "$\\boxed{\\sqrt{72}}$"),
    ("(2, 3)", "The set is $\\boxed{(2,3)}$"),
    ("25\\pi", "Area $= \\boxed{25\\pi}$"),
    ("42", "\\boxed{42}"),
    ("1024", "\\boxed{1,024}"),
    ("x^2 + 2x + 1", "\\boxed{(x+1)^2}"),
])
def test_math_equivalent_forms_are_correct(gold, answer):
    assert is_correct(out(answer), math(gold))


@pytest.mark.parametrize("gold,answer", [
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
    ("6\\sqrt{2}", "\\boxed{8.48}"),  # a decimal approximation is not the exact radical
    ("(2, 3)", "\\boxed{[2, 3]}"),  # closed vs open interval
    ("42", "\\boxed{43}"),
])
def test_math_wrong_answers_are_wrong(gold, answer):
    assert not is_correct(out(answer), math(gold))


def test_only_the_last_box_after_think_counts():
    ex = math("7")
    assert not is_correct("Maybe \\boxed{7}? No.\n</think>\n\nSo \\boxed{8}.", ex)
    assert is_correct("Maybe \\boxed{8}? No.\n</think>\n\nFirst \\boxed{8}, corrected: \\boxed{7}.", ex)


def test_no_closing_think_means_no_answer():
    assert not is_correct("<think>\nI think it is \\boxed{7}", math("7"))
    assert final_answer("<think>\n\\boxed{7}") is None
    assert final_answer(out("\\boxed{7}")) == "7"


def test_integer_gold_falls_back_to_last_number_without_box():
    assert is_correct(out("The answer is 42."), math("42"))
    assert not is_correct(out("The answer is x + 1."), math("x+1"))  # not numeric: a box is required


@pytest.mark.parametrize("answer", [
    "\\boxed{1.91 \\times 10^{-47}}",
    "\\boxed{1.91e-47} kg m^2",
    "$\\boxed{1.9\\,\\times\\,10^{-47}}$",
    "\\boxed{1.95 \\cdot 10^{-47} \\mathrm{~kg~m^2}}",
    "The moment of inertia is 1.91 × 10^-47 kg m².",  # no box: last number
])
def test_scibench_power_of_ten_forms(answer):
    assert is_correct(out(answer), sci("1.91", exponent=-47))


def test_scibench_tolerance_is_five_percent():
    ex = sci("100")
    assert is_correct(out("\\boxed{104.9}"), ex)
    assert is_correct(out("\\boxed{95.1}"), ex)
    assert not is_correct(out("\\boxed{105.5}"), ex)
    assert not is_correct(out("\\boxed{1.00}"), ex)  # forgetting the scale is wrong


def test_scibench_thousands_separators_and_units():
    assert is_correct(out("\\boxed{41,800 \\mathrm{~J}}"), sci("41800"))
    assert is_correct(out("It takes \\boxed{2.02\\text{ s}}."), sci("2.02"))
    assert is_correct(out("\\boxed{-3.5}"), sci("-3.50"))
    assert is_correct(out("\\boxed{−3.5}"), sci("-3.50"))  # unicode minus
    assert is_correct(out("\\boxed{\\frac{3}{4}}"), sci("0.75"))


def test_scibench_uses_the_last_number_only_without_a_box():
    assert is_correct(out("v = 3.0/1.5 = 2.0 cm/s"), sci("2.0"))
    assert not is_correct(out("\\boxed{3.0} (v = 2.0)"), sci("2.0"))


@pytest.mark.parametrize("text,expected", [
    ("1.91e-47", [1.91e-47]), ("6.022 \\times 10^{23}", [6.022e23]), ("1,234.5 and 7", [1234.5, 7.0]),
    ("10^{5} Pa", [1e5]), ("2.5x10^3", [2.5e3]), ("-.5", [-0.5]),
])
def test_numbers_in(text, expected):
    assert numbers_in(text) == pytest.approx(expected)


def test_parse_number_none_for_text():
    assert parse_number("no number") is None
