"""Writes the bundled sample rows (our own problems) in the real dataset schemas.

    python data/samples/generate.py

mathcodeinstruct.jsonl follows MathLLMs/MathCodeInstruct (messages with text/code/execution
blocks); scibench.jsonl follows xw27/scibench. malformed_*.jsonl hold broken rows for tests.
"""
import json
import math
from pathlib import Path

HERE = Path(__file__).parent


def mci(question, steps, final, system=None, crlf=False):
    blocks = []
    for kind, text in steps:
        if crlf and kind == "code":
            text = text.replace("\n", "\r\n")
        blocks.append({"type": kind, "content": text})
    blocks.append({"type": "text", "content": final})
    msgs = [{"role": "system", "content": [{"type": "text", "content": system}]}] if system else []
    msgs += [{"role": "user", "content": [{"type": "text", "content": question}]},
             {"role": "assistant", "content": blocks}]
    return {"messages": msgs}


def math_rows():
    rows = []
    for i, n in enumerate([10, 25, 40, 64, 99, 120]):
        s = n * (n + 1) // 2
        rows.append(mci(
            f"What is the sum of the first {n} positive integers?",
            [("text", f"The sum 1 + 2 + ... + n equals n(n+1)/2. With n = {n} I compute it with Python."),
             ("code", f"n = {n}\nprint(n * (n + 1) // 2)"), ("execution", f"{s}")],
            f"The sum of the first {n} positive integers is $\\boxed{{{s}}}$.",
            system="You are a helpful assistant." if i % 2 else None, crlf=i % 3 == 0))
    for a, b in [(84, 36), (120, 45), (1071, 462), (360, 210), (97, 13)]:
        g = math.gcd(a, b)
        rows.append(mci(
            f"Find the greatest common divisor of {a} and {b}.",
            [("text", "I use the Euclidean algorithm, checked with math.gcd."),
             ("code", f"import math\nprint(math.gcd({a}, {b}))"), ("execution", str(g))],
            f"So $\\gcd({a}, {b}) = \\boxed{{{g}}}$.", crlf=True))
    for a, b, c in [(3, 5, 20), (7, -4, 31), (2, 9, 4), (5, 1, 1), (4, 6, 9)]:
        from fractions import Fraction
        x = Fraction(c - b, a)
        tex = str(x.numerator) if x.denominator == 1 else f"\\frac{{{x.numerator}}}{{{x.denominator}}}"
        rows.append(mci(
            f"Solve for $x$: ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {c}$.",
            [("text", f"Subtract {b} from both sides to get ${a}x = {c - b}$, then divide by {a}."),
             ("code", f"from sympy import symbols, solve\nx = symbols('x')\nprint(solve({a}*x + ({b}) - {c}, x))"),
             ("execution", f"[{x}]")],
            f"Therefore $x = \\boxed{{{tex}}}$."))
    for r in [2, 3, 5, 7]:
        rows.append(mci(
            f"A circle has radius {r}. What is its area? Give the exact value.",
            [("text", f"The area of a circle is $\\pi r^2 = \\pi \\cdot {r}^2$."),
             ("code", f"import sympy as sp\nprint(sp.pi * {r}**2)"), ("execution", f"{r*r}*pi")],
            f"The area is $\\boxed{{{r*r}\\pi}}$."))
    for n, k in [(5, 2), (8, 3), (10, 4), (6, 6)]:
        v = math.comb(n, k)
        rows.append(mci(
            f"In how many ways can {k} books be chosen from {n} different books?",
            [("text", f"Order does not matter, so the count is $\\binom{{{n}}}{{{k}}}$."),
             ("code", f"from math import comb\nprint(comb({n}, {k}))"), ("execution", str(v))],
            f"There are $\\boxed{{{v}}}$ ways."))
    # Single text block, no code: reasoning is the paragraphs before the box.
    for a, b in [(12, 18), (9, 15), (14, 21)]:
        l = a * b // math.gcd(a, b)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "text", "content": f"What is the least common multiple of {a} and {b}?"}]},
            {"role": "assistant", "content": [{"type": "text", "content":
                f"The lcm is the product divided by the gcd.\n\nHere gcd({a}, {b}) = {math.gcd(a, b)}, "
                f"so lcm = {a}*{b}/{math.gcd(a, b)} = {l}.\n\nThe answer is $\\boxed{{{l}}}$."}]}]})
    # An interval and a tuple answer, for grading tests.
    rows.append(mci("For which real $x$ is $x^2 - 5x + 6 < 0$?",
                    [("text", "Factor: $(x-2)(x-3) < 0$, negative between the roots."),
                     ("code", "from sympy import symbols, solve_univariate_inequality\nx = symbols('x', real=True)\nprint(solve_univariate_inequality(x**2 - 5*x + 6 < 0, x, relational=False))"),
                     ("execution", "Interval.open(2, 3)")],
                    "The solution set is $\\boxed{(2, 3)}$."))
    rows.append(mci("Find $\\sqrt{72}$ in simplest radical form.",
                    [("text", "$72 = 36 \\cdot 2$, so $\\sqrt{72} = 6\\sqrt{2}$."),
                     ("code", "import sympy as sp\nprint(sp.sqrt(72))"), ("execution", "6*sqrt(2)")],
                    "So $\\sqrt{72} = \\boxed{6\\sqrt{2}}$."))
    return rows


def sci(problem, answer, unit, source, pid, solution=None, comment=""):
    row = {"problem_text": problem, "answer_latex": f" ${answer}$", "answer_number": answer, "unit": unit,
           "source": source, "problemid": pid, "comment": comment}
    if solution is not None:
        row["solution"] = solution
    return row


def science_rows():
    rows = []
    g = 9.8
    for i, (h, src) in enumerate([(20.0, "fund"), (45.0, "class"), (80.0, "fund"), (5.0, "class")]):
        t = math.sqrt(2 * h / g)
        rows.append(sci(f" A stone is dropped from rest from a height of {h:.1f} m. Neglecting air resistance, how long does it take to reach the ground? ",
                        f"{t:.2f}", " $\\mathrm{~s}$", src, f" {i+1}.{i+3} ",
                        solution=(f"From $h = \\frac{{1}}{{2}} g t^2$ we get $t = \\sqrt{{2h/g}}$. "
                                  f"With $h = {h:.1f} \\mathrm{{~m}}$ and $g = 9.8 \\mathrm{{~m/s^2}}$, "
                                  f"$t = \\sqrt{{2 \\times {h:.1f} / 9.8}} = {t:.2f} \\mathrm{{~s}}$.")))
    for i, (n, T, V) in enumerate([(1.0, 298.15, 24.0), (2.0, 300.0, 10.0), (0.5, 273.15, 5.0), (3.0, 350.0, 40.0)]):
        p = n * 8.314 * T / V / 100  # in kPa->bar style: J/L = kPa; /100 gives bar
        rows.append(sci(f"Calculate the pressure exerted by {n} mol of an ideal gas at {T} K in a volume of {V} L.",
                        f"{p:.3f}", "$\\mathrm{bar}$", "atkins", f"1.{i+1}",
                        solution=(f"Use $pV = nRT$, so $p = nRT/V = {n} \\times 8.314 \\mathrm{{~J~K^{{-1}}~mol^{{-1}}}} "
                                  f"\\times {T} \\mathrm{{~K}} / {V} \\mathrm{{~dm^3}} = {p*100:.1f} \\mathrm{{~kPa}} = {p:.3f} \\mathrm{{~bar}}$.")))
    # Answer-only "solutions" (as in SciBench's fund rows): not reasoning.
    for i, (d, t) in enumerate([(3.0, 1.5), (12.0, 4.0), (7.5, 2.5)]):
        v = d / t
        rows.append(sci(f"A cart moves {d} cm in {t} s at constant speed. What is its speed?",
                        f"{v:.2f}", "$\\mathrm{~cm/s}$", "fund", f"2.{i+1}", solution=f" ${v:.2f} \\mathrm{{~cm/s}}$ "))
    # Powers of ten inside the unit.
    for i, (m, r) in enumerate([(1.67e-27, 1.0e-10), (9.11e-31, 5.3e-11), (3.3e-27, 0.74e-10)]):
        inertia = 2 * m * r * r
        mant, exp = f"{inertia:.2e}".split("e")
        rows.append(sci(f"Two atoms of mass {m:.3g} kg each are separated by {2*r:.3g} m. Compute the moment of inertia about the centre of mass.",
                        mant, f"$10^{{{int(exp)}}} \\mathrm{{~kg}} \\mathrm{{~m}}^2$", "quan", f"3.{i+1}",
                        solution=(f"For two equal masses $m$ at distance $r$ from the centre, $I = 2 m r^2 = 2 \\times {m:.3g} \\times ({r:.3g})^2 "
                                  f"= {inertia:.2e} \\mathrm{{~kg~m^2}}$, i.e. {mant} in units of $10^{{{int(exp)}}} \\mathrm{{~kg~m^2}}$.") if i < 2 else None))
    # No solution: these become the held-out accuracy set.
    for i, (q, ans, unit, src) in enumerate([
        ("What is the kinetic energy of a 2.0 kg ball moving at 3.0 m/s?", "9.0", "$\\mathrm{~J}$", "fund"),
        ("Evaluate the integral of $2x$ from 0 to 3.", "9", "", "calculus"),
        ("A sample has mean 10 and standard deviation 2. What is the z-score of 13?", "1.5", "", "stat"),
        ("How many moles are in 36.0 g of water (molar mass 18.0 g/mol)?", "2.00", "$\\mathrm{mol}$", "chemmc"),
        ("Solve $y' = 2y$, $y(0) = 1$ and give $y(1)$.", "7.389", "", "diff"),
        ("The wavelength of a photon is 500 nm. What is its energy?", "3.97", "$10^{-19} \\mathrm{~J}$", "quan"),
        ("Compute the heat needed to warm 1.00 kg of water by 10.0 K (c = 4.18 J/(g K)).", "41.8", "$\\mathrm{~kJ}$", "thermo"),
        ("What is the density of a 2.00 cm cube of mass 21.6 g?", "2.70", "$\\mathrm{~g~cm^{-3}}$", "matter"),
        ("A spring with k = 200 N/m is stretched 0.10 m. Find the stored energy.", "1.0", "$\\mathrm{~J}$", "class"),
        ("Find the number of atoms in 1.00 mol of helium.", "6.022", "$10^{23}$", "chemmc"),
    ]):
        rows.append(sci(q, f" {ans} ", unit, src, f"9.{i+1}", solution="" if i % 2 else None))
    return rows


MALFORMED_MATH = [
    {"messages": [{"role": "assistant", "content": [{"type": "text", "content": "No question. \\boxed{1}"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "content": "What is 2+2?"}]},
                  {"role": "assistant", "content": [{"type": "text", "content": "It is four, I think."}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "content": 42}]},
                  {"role": "assistant", "content": [{"type": "text", "content": "\\boxed{42}"}]}]},
    {"text": "a row without messages"},
    {"messages": [{"role": "user", "content": [{"type": "text", "content": "Hello?"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "content": "   "}]},
                  {"role": "assistant", "content": [{"type": "text", "content": "\\boxed{0}"}]}]},
]
MALFORMED_SCI = [
    {"problem_text": "Missing the answer.", "unit": "m", "source": "fund"},
    {"problem_text": "Bad number.", "answer_number": "about five", "unit": "m", "source": "fund"},
    {"problem_text": 3.14, "answer_number": "1", "unit": "", "source": "class"},
    {"problem_text": "   ", "answer_number": "1", "unit": "", "source": "class"},
]


def write(name, rows, extra_lines=()):
    with open(HERE / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


if __name__ == "__main__":
    write("mathcodeinstruct.jsonl", math_rows())
    write("scibench.jsonl", science_rows())
    write("malformed_mathcodeinstruct.jsonl", MALFORMED_MATH, extra_lines=['{"messages": [ this is not json'])
    write("malformed_scibench.jsonl", MALFORMED_SCI, extra_lines=["not json at all"])
