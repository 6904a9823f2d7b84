"""Word problems with exact answers, written in MathCodeInstruct's schema, for the `small` profile: a real 135M model
(SmolLM2-135M-Instruct) can learn them in minutes, and a held-out set shows whether it did.

Each problem is text -> a ```python block -> its execution output -> a sentence with the \\boxed{} answer, as
MathCodeInstruct writes its rows (the output is what the code prints, computed here by running it). Arithmetic,
percentages, unit conversions and small linear equations, with integer answers.

    python -m llmhelpers.data.synthetic --out data/small      # writes the three files below (seeded: always the same)

- train.jsonl: TRAIN_SIZE problems from the TRAIN_TEMPLATES;
- heldout.jsonl: HELDOUT_SIZE problems from the same templates with new numbers (no (template, numbers) pair of the
  training file);
- heldout_templates.jsonl: NEW_TEMPLATE_SIZE problems from templates never seen in training;
- practice_templates.jsonl: PRACTICE_SIZE problems from those new templates with other numbers (no (template,
  numbers) pair of heldout_templates.jsonl): what GRPO practises on before heldout_templates.jsonl grades it
  (issue #33), as SFT trains on train.jsonl before heldout.jsonl grades it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TRAIN_SIZE, HELDOUT_SIZE, NEW_TEMPLATE_SIZE = 4000, 600, 300
PRACTICE_SIZE = 400  # 100 per new template: "trip" has 200 number pairs, 75 of them held out
SEED = 2026


@dataclass(frozen=True)
class Template:
    name: str
    draw: Callable[[random.Random], dict]  # the numbers of one problem
    question: str  # str.format fields from draw
    plan: str  # the reasoning before the code
    code: str  # runs and prints the answer
    final: str  # the answer sentence; {answer} is boxed


def _change(r):
    price, count = r.randint(2, 19), r.randint(2, 9)
    return {"price": price, "count": count, "paid": (price * count // 10 + 1 + r.randint(0, 3)) * 10}


def _percent_of(r):
    pct = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80])
    return {"pct": pct, "n": r.randint(1, 200) * (100 // _gcd(pct, 100))}


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _discount(r):
    pct = r.choice([10, 20, 25, 30, 40, 50])
    return {"pct": pct, "price": r.randint(2, 300) * (100 // _gcd(pct, 100))}


def _linear(r):
    a, x = r.randint(2, 12), r.randint(-20, 30)
    b = r.randint(-40, 40)
    return {"a": a, "b": b, "c": a * x + b, "sign": "+" if b >= 0 else "-", "abs_b": abs(b)}


def _ratio(r):
    a, b = r.sample(range(1, 10), 2)
    return {"a": a, "b": b, "total": (a + b) * r.randint(2, 40)}


def _mean(r):
    values = [r.randint(10, 99) for _ in range(4)]
    values[-1] -= sum(values) % 4  # a whole mean
    return dict(zip("abcd", values))


def _increase(r):
    old = r.randint(2, 400) * 4
    pct = r.choice([25, 50, 75, 100, 125, 150])
    return {"old": old, "new": old * (100 + pct) // 100}


TRAIN_TEMPLATES = [
    Template("change", _change,
             "A store sells notebooks for ${price} each. Maria buys {count} notebooks and pays with ${paid}. "
             "How many dollars of change does she get?",
             "The notebooks cost {count} times ${price}; the change is what she paid minus that cost.",
             "price = {price}\ncount = {count}\npaid = {paid}\nprint(paid - price * count)",
             "Maria gets $\\boxed{{{answer}}}$ dollars of change."),
    Template("percent_of", _percent_of, "What is {pct}% of {n}?",
             "{pct}% of a number is the number times {pct}/100.",
             "n = {n}\npct = {pct}\nprint(n * pct // 100)",
             "{pct}% of {n} is $\\boxed{{{answer}}}$."),
    Template("discount", _discount,
             "A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?",
             "The sale price is the price minus {pct}% of it, that is the price times (100 - {pct})/100.",
             "price = {price}\npct = {pct}\nprint(price * (100 - pct) // 100)",
             "The sale price is $\\boxed{{{answer}}}$ dollars."),
    Template("km_to_m", lambda r: {"km": r.randint(1, 40), "m": r.randint(1, 999)},
             "A runner covers {km} km and {m} m. How many meters is that in total?",
             "One kilometer is 1000 meters, so the total is {km} * 1000 + {m} meters.",
             "km = {km}\nm = {m}\nprint(km * 1000 + m)",
             "The runner covers $\\boxed{{{answer}}}$ meters."),
    Template("hours_to_minutes", lambda r: {"h": r.randint(1, 12), "m": r.randint(1, 59)},
             "A movie lasts {h} hours and {m} minutes. How many minutes is that?",
             "One hour is 60 minutes, so the length is {h} * 60 + {m} minutes.",
             "hours = {h}\nminutes = {m}\nprint(hours * 60 + minutes)",
             "The movie lasts $\\boxed{{{answer}}}$ minutes."),
    Template("linear", _linear, "Solve for $x$: ${a}x {sign} {abs_b} = {c}$.",
             "Move the constant to the right side, then divide by {a}: $x = ({c} - ({b})) / {a}$.",
             "a = {a}\nb = {b}\nc = {c}\nprint((c - b) // a)",
             "Therefore $x = \\boxed{{{answer}}}$."),
    Template("distance", lambda r: {"v": r.randint(20, 120), "t": r.randint(2, 9)},
             "A car drives at {v} km/h for {t} hours. How many kilometers does it travel?",
             "Distance is speed times time.",
             "speed = {v}\nhours = {t}\nprint(speed * hours)",
             "The car travels $\\boxed{{{answer}}}$ km."),
    Template("mean", _mean, "The test scores of four students are {a}, {b}, {c} and {d}. What is their mean score?",
             "The mean is the sum of the scores divided by 4.",
             "scores = [{a}, {b}, {c}, {d}]\nprint(sum(scores) // len(scores))",
             "The mean score is $\\boxed{{{answer}}}$."),
    Template("rate", lambda r: {"rate": r.randint(3, 40), "hours": r.randint(2, 25)},
             "A machine makes {rate} parts per hour. How many hours does it need to make {total} parts?",
             "The time is the number of parts divided by the rate.",
             "total = {total}\nrate = {rate}\nprint(total // rate)",
             "It needs $\\boxed{{{answer}}}$ hours."),
    Template("increase", _increase,
             "The price of a bike rose from ${old} to ${new}. By what percent did the price rise?",
             "The rise is ${new} - ${old}; as a percent of the old price it is (new - old) / old * 100.",
             "old = {old}\nnew = {new}\nprint((new - old) * 100 // old)",
             "The price rose by $\\boxed{{{answer}}}$ percent."),
    Template("rectangle", lambda r: {"w": r.randint(2, 60), "l": r.randint(2, 60)},
             "A rectangular garden is {l} m long and {w} m wide. What is its perimeter in meters?",
             "The perimeter of a rectangle is twice the sum of its length and width.",
             "length = {l}\nwidth = {w}\nprint(2 * (length + width))",
             "The perimeter is $\\boxed{{{answer}}}$ meters."),
    Template("ratio", _ratio,
             "Two friends share ${total} in the ratio {a}:{b}. How many dollars does the first friend get?",
             "The first friend gets {a} of every {a} + {b} parts of the total.",
             "total = {total}\na = {a}\nb = {b}\nprint(total * a // (a + b))",
             "The first friend gets $\\boxed{{{answer}}}$ dollars."),
]

# Never in training: other wording, other quantities, the same kinds of arithmetic.
NEW_TEMPLATES = [
    Template("tank", lambda r: {"pct": r.choice([10, 20, 25, 40, 50, 75]), "cap": r.randint(1, 200) * 20},
             "A water tank holds {cap} liters when full. It is {pct}% full. How many liters of water are in it?",
             "The water is {pct}% of the capacity.",
             "capacity = {cap}\npct = {pct}\nprint(capacity * pct // 100)",
             "The tank holds $\\boxed{{{answer}}}$ liters of water."),
    Template("kg_to_g", lambda r: {"kg": r.randint(1, 50), "g": r.randint(1, 999)},
             "A parcel weighs {kg} kg and {g} g. What is its weight in grams?",
             "One kilogram is 1000 grams.",
             "kg = {kg}\ng = {g}\nprint(kg * 1000 + g)",
             "The parcel weighs $\\boxed{{{answer}}}$ grams."),
    Template("number", lambda r: {"k": r.randint(2, 9), "x": r.randint(1, 40), "b": r.randint(1, 50)},
             "{k} times a number, plus {b}, equals {c}. What is the number?",
             "The number is ({c} - {b}) / {k}.",
             "print(({c} - {b}) // {k})",
             "The number is $\\boxed{{{answer}}}$."),
    Template("trip", lambda r: {"v": r.choice([30, 40, 45, 50, 60, 75, 80, 90, 100, 120]), "t": r.randint(1, 20)},
             "A train travels {d} km at a steady {v} km/h. How many minutes does the trip take?",
             "The time in hours is distance over speed; times 60 gives minutes.",
             "distance = {d}\nspeed = {v}\nprint(distance * 60 // speed)",
             "The trip takes $\\boxed{{{answer}}}$ minutes."),
]


def _complete(template: Template, numbers: dict) -> dict:
    """Fields derived from the drawn numbers (a total from a rate and time, an equation's right side)."""
    p = dict(numbers)
    if template.name == "rate":
        p["total"] = p["rate"] * p["hours"]
    if template.name == "number":
        p["c"] = p["k"] * p["x"] + p["b"]
    if template.name == "trip":
        p["d"] = p["v"] * p["t"]
    return p


def run_code(code: str) -> str:
    """What the problem's code prints (our own code, not a model's)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})  # noqa: S102 - the generator's own templates
    return out.getvalue().strip()


def mathcodeinstruct_row(template: Template, numbers: dict, index: int) -> dict:
    p = _complete(template, numbers)
    code = template.code.format(**p)
    answer = run_code(code)
    blocks = [{"type": "text", "content": template.plan.format(**p) + " I compute it with Python."},
              {"type": "code", "content": code}, {"type": "execution", "content": answer},
              {"type": "text", "content": template.final.format(answer=answer, **p)}]
    return {"id": f"{template.name}-{index}", "messages": [
        {"role": "user", "content": [{"type": "text", "content": template.question.format(**p)}]},
        {"role": "assistant", "content": blocks}]}


def _draw(templates, size: int, rng: random.Random, taken: set) -> list[tuple[Template, dict]]:
    out = []
    for _ in range(100 * size):  # a template with too few number choices fails here instead of looping
        if len(out) == size:
            break
        template = templates[len(out) % len(templates)]
        numbers = template.draw(rng)
        key = (template.name, tuple(sorted(numbers.items())))
        if key in taken:
            continue
        taken.add(key)
        out.append((template, numbers))
    if len(out) < size:
        raise ValueError(f"only {len(out)} distinct problems of {size}: widen the templates' number ranges")
    return out


def build(seed: int = SEED, train_size: int = TRAIN_SIZE, heldout_size: int = HELDOUT_SIZE,
          new_template_size: int = NEW_TEMPLATE_SIZE, practice_size: int = PRACTICE_SIZE) -> dict[str, list[dict]]:
    rng, taken, taken_new = random.Random(seed), set(), set()
    train = _draw(TRAIN_TEMPLATES, train_size, rng, taken)
    heldout = _draw(TRAIN_TEMPLATES, heldout_size, rng, taken)  # `taken` holds every training pair: new numbers
    new = _draw(NEW_TEMPLATES, new_template_size, rng, taken_new)
    rng.shuffle(train)
    practice = _draw(NEW_TEMPLATES, practice_size, rng, taken_new)  # drawn last: the files above stay as they were
    rng.shuffle(practice)
    return {"train": [mathcodeinstruct_row(t, p, i) for i, (t, p) in enumerate(train)],
            "heldout": [mathcodeinstruct_row(t, p, i) for i, (t, p) in enumerate(heldout)],
            "heldout_templates": [mathcodeinstruct_row(t, p, i) for i, (t, p) in enumerate(new)],
            "practice_templates": [mathcodeinstruct_row(t, p, i) for i, (t, p) in enumerate(practice)]}


def write(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in build(**kwargs).items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmhelpers.data.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/small")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for name, path in write(args.out, seed=args.seed).items():
        print(f"{name}: {sum(1 for _ in path.open())} problems -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
