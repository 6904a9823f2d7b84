"""Compare the per-step training loss of two runs (e.g. 1 GPU and 2 GPUs).

    python bench/compare_losses.py OUTPUT_DIR_A OUTPUT_DIR_B

Reads runs/*/log_history.json under each output dir. The runs see the same data but in a different
order (the length-grouped sampler's mega-batches depend on the per-device batch), so single steps
differ by batch composition; the curves are compared as 5-step moving averages.
"""
import json
import sys
from pathlib import Path


def losses(out_dir: str) -> dict[int, float]:
    (path,) = Path(out_dir).glob("runs/*/log_history.json")
    return {r["step"]: r["loss"] for r in json.loads(path.read_text()) if "loss" in r}


def smooth(xs, w=5):
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


if __name__ == "__main__":
    a, b = losses(sys.argv[1]), losses(sys.argv[2])
    steps = sorted(set(a) & set(b))
    sa, sb = smooth([a[s] for s in steps]), smooth([b[s] for s in steps])
    rel = [abs(x - y) / x for x, y in zip(sa, sb)]
    print(json.dumps({"steps": len(steps), "first": [a[steps[0]], b[steps[0]]], "last": [a[steps[-1]], b[steps[-1]]],
                      "max_rel_diff_smoothed": max(rel), "mean_rel_diff_smoothed": sum(rel) / len(rel)}))
    for s, x, y in zip(steps, sa, sb):
        if s % 5 == 0:
            print(f"step {s:4d}  A {x:.4f}  B {y:.4f}")
