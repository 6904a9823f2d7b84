"""Where an evaluation run's decode time goes, without a GPU: the engine's scheduler replayed on the workload.

    python bench/decode_time_model.py --profile bench/results/2026-12-03-h200-eval-overlap.json \
        --out bench/results/<date>-cpu-decode-time-model.json

The eval bench's workload (`bench/eval_engine.py`'s `workload`: the same prompts and drawn answer lengths) goes
through the engine's own `Scheduler` (refills, compaction; no model: every answer runs to its drawn length), which
gives each decode step's width and the live tokens its attention reads. From those: the bytes the run must read
(each step the weights once, and every slot's live keys and values) and their time at the datasheet bandwidth, the
lower bound of issue #32; and a model of the run's decode time from a measured engine profile
(`bench/profile_engine.py`'s JSON, or a results file holding one under `profiles.default`): each step's attention at
the profile's measured KV bandwidth (mixed lengths), plus the rest of a step (matmuls, sampler, elementwise kernels)
interpolated by width from the profile's step times (minus their attention), plus the sampler's cost over greedy.
The model leaves out what the profile does not see (imbalance between slots of different lengths, the combine of
split caches at mixed lengths): compare it with a measured run's `decode_s`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_result, provenance  # noqa: E402
from eval_engine import workload  # noqa: E402

from llmhelpers.inference.scheduler import Request, Scheduler  # noqa: E402


def replay(prompts, lengths, slots: int, max_len: int) -> dict[str, list[int]]:
    """Per decode step, as `Engine.run` schedules them: its width, the slots decoding, the tokens its attention reads
    (every slot below the width up to its position: a free slot's is 0) and, as it was before free slots decoded at
    position 0, with each free slot at the ended answer's last position; those of decoding slots alone; and the
    prefill passes."""
    requests = [Request(p, n) for p, n in zip(prompts, lengths)]
    scheduler = Scheduler(requests, slots, max_len, eos=-1)
    steps = {"width": [], "decoding": [], "read": [], "read_stale": [], "live": []}
    last = [0] * slots  # each slot's last position while it held an answer (what the kernel read before 2026-12-03)
    prefills = 0

    def prefill_due(force):
        nonlocal prefills
        while items := scheduler.schedule_prefill(force):
            prefills += 1
            scheduler.postprocess_prefill([(item, 0) for item in items])  # token 0: never the eos (-1)
            force = False

    prefill_due(True)
    while scheduler.running:
        scheduler.compact()
        decoding = scheduler.schedule_decode()
        steps["width"].append(scheduler.width)
        steps["decoding"].append(len(decoding))
        # each slot's cache up to and including its new token
        steps["read"].append(sum(scheduler.positions[s] + 1 for s in range(scheduler.width)))
        for s in scheduler.running:
            last[s] = scheduler.positions[s]
        steps["read_stale"].append(sum(last[s] + 1 for s in range(scheduler.width)))
        steps["live"].append(sum(scheduler.positions[s] + 1 for s in decoding))
        scheduler.postprocess_decode(decoding, [0] * scheduler.width)
        prefill_due(len(decoding) < len(scheduler.running) // 2 or not scheduler.queue)
    steps["prefill_passes"] = prefills
    return steps


def main():
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=487, help="the H200's auto_slots for the workload")
    parser.add_argument("--cap", type=int, default=8192)
    parser.add_argument("--kv-bytes-token", type=int, default=28672, help="R1-1.5B, bf16: 28 layers x 2 x 2 x 128 x 2")
    parser.add_argument("--weight-bytes", type=float, default=3.09e9, help="what a step reads of the weights")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="the datasheet's (H200: 4.8 TB/s)")
    parser.add_argument("--profile", default=None, help="a profile_engine JSON (or a results file with one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    prompts, lengths = workload(args.requests, cap=args.cap)
    max_len = max(map(len, prompts)) + args.cap + 1
    steps = replay(prompts, lengths, args.slots, max_len)
    w, decoding = np.array(steps["width"], dtype=float), np.array(steps["decoding"], dtype=float)
    kv = np.array(steps["read"], dtype=float) * args.kv_bytes_token
    kv_stale = np.array(steps["read_stale"], dtype=float) * args.kv_bytes_token
    live = np.array(steps["live"], dtype=float) * args.kv_bytes_token
    n = len(w)
    res = {"requests": args.requests, "slots": args.slots, "decode_steps": n,
           "prefill_passes": steps["prefill_passes"], "tokens_decoded": int(decoding.sum()),
           "mean_live_tokens_per_decoded_token": round(float(live.sum() / args.kv_bytes_token / decoding.sum()), 1),
           "kv_bytes_read_tb": round(float(kv.sum()) / 1e12, 1),
           "kv_bytes_read_free_slots_at_their_last_position_tb": round(float(kv_stale.sum()) / 1e12, 1),
           "kv_bytes_of_decoding_slots_tb": round(float(live.sum()) / 1e12, 1),
           "weight_bytes_read_tb": round(n * args.weight_bytes / 1e12, 1),
           # the lower bound: what the decoding slots need and the weights once per step, at the datasheet bandwidth
           "bandwidth_bound_decode_s": round(float(live.sum() + n * args.weight_bytes) / args.bandwidth, 1),
           "steps_by_width": {f"{lo}-{hi - 1}": int(((w >= lo) & (w < hi)).sum())
                              for lo, hi in ((1, 16), (16, 64), (64, 128), (128, 256), (256, 400), (400, 10**6))}}
    if args.profile:
        profile = json.loads(Path(args.profile).read_text())
        profile = profile.get("profiles", {}).get("default", profile)
        ms, live_tokens, slots = profile["ms"], profile["live_tokens"], profile["slots"]
        attention_bw = profile["mixed_lengths_attention"]["nsplit4"]["kv_gb_s"] * 1e9
        points = sorted((int(k[len("step_greedy_width"):]), v) for k, v in ms.items()
                        if k.startswith("step_greedy_width") and k[len("step_greedy_width"):].isdigit())
        points.append((slots, ms["step_greedy"]))
        xs = [x for x, _ in points]
        # a step without its attention (at the profile's live tokens per slot), by width
        rest = [t / 1e3 - x * live_tokens * args.kv_bytes_token / attention_bw for x, t in points]
        sampler = (ms["step_sampled_triton"] - ms["step_greedy"]) / 1e3
        attention, attention_stale = kv / attention_bw, kv_stale / attention_bw
        other = np.interp(w, xs, rest) + sampler
        res["model"] = {"profile": args.profile, "attention_kv_gb_s": round(attention_bw / 1e9),
                        "rest_of_step_ms_by_width": {x: round(r * 1e3, 2) for x, r in zip(xs, rest)},
                        "sampler_ms": round(sampler * 1e3, 3),
                        "decode_s": round(float(attention.sum() + other.sum()), 1),
                        "decode_s_free_slots_at_their_last_position": round(float(attention_stale.sum() + other.sum()),
                                                                            1),
                        "attention_s": round(float(attention.sum()), 1), "rest_s": round(float(other.sum()), 1),
                        "rest_s_at_400_or_wider": round(float(other[w >= 400].sum()), 1)}
    res["provenance"] = provenance()
    emit_result(res, args.out)


if __name__ == "__main__":
    main()
