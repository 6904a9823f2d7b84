"""Synthetic MathCodeInstruct-schema rows with learnable arithmetic reasoning, for GPU runs of the
real CLI without network (the datasets cannot be downloaded there).

    python bench/synth_data.py /tmp/synth_mci.jsonl 4000
"""
import json
import math
import random
import sys


def row(rng: random.Random) -> dict:
    steps = max(3, min(120, int(math.exp(rng.gauss(math.log(25), 0.6)))))  # lognormal length, median ~700 tokens
    total, lines = 0, []
    for k in range(steps):
        x = rng.randrange(1, 1000)
        lines.append(f"Step {k + 1}: add {x} to {total} to get {total + x}.")
        total += x
    code = "total = 0\nfor x in values:\n    total += x\nprint(total)"
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "content": f"Add up {steps} numbers step by step."}]},
        {"role": "assistant", "content": [
            {"type": "text", "content": "\n".join(lines)},
            {"type": "code", "content": code},
            {"type": "execution", "content": str(total)},
            {"type": "text", "content": f"The total is $\\boxed{{{total}}}$."}]}]}


if __name__ == "__main__":
    path, n = sys.argv[1], int(sys.argv[2])
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(row(rng)) + "\n")
