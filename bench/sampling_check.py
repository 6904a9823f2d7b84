"""Does the engine's sampling on this GPU draw what it promises, and do new settings reuse the CUDA graphs?

- the Triton top-p sampler (and the sorted reference) against the exact nucleus distribution, with temperature and top-p given as device tensors (as the
  engine keeps them): the same support and frequencies within sampling noise;
- the engine (R1-1.5B architecture, random bf16 weights) run with one SamplingParams and then with other temperature
  and top-p values: no decode graph is captured again for a width already seen, and the second run's tokens differ
  (the new values are read inside the graphs); greedy runs repeat exactly.

    python -m bench check sampling
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from common import finish_check, random_r1_model
    from llmhelpers.inference.engine import Engine
    from llmhelpers.inference.sampling import SamplingParams, sample_top_p_sorted, sample_top_p_triton
    from llmhelpers.inference.scheduler import Request

    torch.manual_seed(0)
    logits = (torch.randn(1, 151936, device="cuda") * 3).expand(4096, -1).contiguous()
    temperature, top_p = torch.tensor(0.6, device="cuda"), torch.tensor(0.95, device="cuda")
    rows = torch.arange(4096, device="cuda")  # one key per draw, as the engine's draw_seed gives them
    drawn = torch.cat([sample_top_p_triton(logits, temperature, top_p, rows + s * 4096) for s in range(8)])
    ref = torch.cat([sample_top_p_sorted(logits, 0.6, 0.95, rows + (s + 8) * 4096) for s in range(8)])
    # the exact nucleus of softmax(logits / 0.6) at top-p 0.95, and its renormalised probabilities
    probs = (logits[0].float() / 0.6).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    keep = order[(sorted_p.cumsum(0) - sorted_p) < 0.95]
    exact = torch.zeros_like(probs)
    exact[keep] = probs[keep] / probs[keep].sum()
    freq = {name: torch.bincount(x, minlength=probs.numel()).float() / x.numel() for name, x in
            (("triton", drawn), ("sorted", ref))}
    distribution = {"draws": drawn.numel(), "nucleus_size": int(keep.numel()),
                    "triton_outside_nucleus": int(((freq["triton"] > 0) & (exact == 0)).sum()),
                    "sorted_outside_nucleus": int(((freq["sorted"] > 0) & (exact == 0)).sum()),
                    "triton_max_gap_to_exact": float((freq["triton"] - exact).abs().max()),
                    "sorted_max_gap_to_exact": float((freq["sorted"] - exact).abs().max())}

    model = AutoModelForCausalLM.from_pretrained(random_r1_model(), dtype=torch.bfloat16).cuda().eval()
    prompts = [list(range(100 + i, 140 + i)) for i in range(48)]
    engine = Engine(model, slots=16, max_len=200)

    def run(sampling):
        requests = [Request(p, 64) for p in prompts]
        engine.run(requests, sampling, eos=-1)
        return [r.new_ids for r in requests], len(engine.graphs)

    first, graphs_first = run(SamplingParams(temperature=0.6, top_p=0.95, seed=0))
    second, graphs_second = run(SamplingParams(temperature=1.2, top_p=0.5, seed=0))
    repeat, graphs_repeat = run(SamplingParams(temperature=0.6, top_p=0.95, seed=0))
    greedy_a, graphs_greedy = run(SamplingParams(temperature=0.0))
    greedy_b, _ = run(SamplingParams(temperature=0.0))
    engine_result = {"graphs_after_first": graphs_first, "graphs_after_new_values": graphs_second,
                     "graphs_after_greedy": graphs_greedy, "new_values_change_tokens": first != second,
                     "same_settings_same_tokens": first == repeat, "greedy_repeats": greedy_a == greedy_b,
                     "graphs_after_repeat": graphs_repeat}
    passed = (distribution["triton_outside_nucleus"] == 0 and distribution["triton_max_gap_to_exact"] < 0.01
              and graphs_second == graphs_first == graphs_repeat and graphs_greedy > graphs_first
              and engine_result["new_values_change_tokens"] and engine_result["same_settings_same_tokens"]
              and engine_result["greedy_repeats"])
    finish_check({"distribution": distribution, "engine": engine_result}, args.out, passed,
                 "the Triton sampler never draws outside the exact nucleus and its frequencies are within 0.01 of "
                 "the nucleus' renormalised probabilities (32,768 draws); other temperature/top-p values capture no graph and change the tokens; the same "
                 "seed and settings repeat; greedy is its own graphs and repeats")


if __name__ == "__main__":
    main()
