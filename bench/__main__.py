"""One entry point over the benchmarks and GPU checks: `python -m bench <name> [its arguments]`.

    python -m bench list                                    # what can run, and the configurations of each
    python -m bench train --configs default,fits-24gb       # the project's training path (train_throughput.py)
    python -m bench train --configs default,unsloth-mb16x1  # ... beside Unsloth (its own process: train_unsloth.py)
    python -m bench eval --configs default --requests 2000  # the evaluation engine (eval_engine.py)
    python -m bench check packing                           # a GPU correctness check: exits 1 when it fails

Each script runs in its own process (one configuration's memory never counts against the next's), its result JSON
goes to `--out` (default `bench/results/<date>-<gpu>-<name>.json`), and the harness adds what a later reader needs
to compare it: the commit, whether the tree had changes, the GPU, the library versions and the exact command
(`common.provenance`). A check's exit status is passed on.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the scripts' shared helpers (common.py)

# name -> (script, what it measures or checks)
MEASUREMENTS = {
    "train": ("train_throughput.py", "training tokens/s, memory and MFU of the project's path per configuration"),
    "unsloth": ("train_unsloth.py", "Unsloth's own training path on the same model, rows and measurement"),
    "sizes": ("train_sizes.py", "the bigger distills under the default recipe: peak memory and speed"),
    "eval": ("eval_engine.py", "evaluation generation throughput of the engine (and the old generate() path)"),
    "tools": ("tool_eval_speed.py", "evaluation with tool execution on the small profile's fine-tuned model"),
    "real-weights": ("real_weights.py", "SmolLM2-135M before and after fine-tuning: the before/after table"),
    "grpo-rollouts": ("grpo_rollouts.py", "GRPO steps: the engine's rollouts against TRL's default generation"),
    "grpo": ("grpo_real_weights.py", "GRPO after SFT on SmolLM2-135M: held-out-template accuracy before and after"),
    "profile-train": ("profile_train.py", "where a training step spends its time"),
    "profile-engine": ("profile_engine.py", "where a decode step spends its time"),
    "sandbox-spawn": ("sandbox_spawn.py", "how long starting a code sandbox stalls the process that starts it (CPU)"),
}
CHECKS = {
    "packing": ("packing_check.py", "padding-free training is exact"),
    "fused-lora": ("fused_lora_check.py", "the fused LoRA layer equals peft's forward and gradients"),
    "pipeline": ("gpu_pipeline_check.py", "the full profile end to end through the CLI"),
    "sandbox": ("sandbox_check.py", "the code sandbox's containment on this kernel"),
    "sampling": ("sampling_check.py", "top-p on the GPU draws the reference distribution; new settings reuse graphs"),
    "engine-greedy": ("engine_greedy_check.py",
                      "the engine's greedy tokens equal model.generate's, or differ at a bf16 tie"),
}
UNSLOTH_PREFIX = "unsloth-"


def configurations(script: str) -> list[str]:
    """The registry of a script: its CONFIGS names, read without importing it (the import needs a GPU stack)."""
    import ast

    tree = ast.parse((HERE / script).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONFIGS" for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            return [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    return []


def default_out(name: str) -> Path:
    from common import gpu_name

    gpu = gpu_name().lower().replace("nvidia ", "").split()[0] if gpu_name() else "cpu"
    return HERE / "results" / f"{time.strftime('%Y-%m-%d')}-{gpu}-{name}.json"


def harness_options(args: list[str], *names: str):
    """The options the harness itself reads (`--out`, `--configs`), and the arguments left for the script."""
    parser = argparse.ArgumentParser(add_help=False)  # a script's own --help passes through
    for name in names:
        parser.add_argument(name)
    return parser.parse_known_args(args)


def run_script(script: str, args: list[str]) -> int:
    """The script in its own process, with bench/ importable as its scripts expect."""
    print(f"$ python bench/{script} {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE.parent).returncode


def stamp(out: Path, command: list[str]) -> None:
    """Add the provenance to a result the script wrote (a check writes its own)."""
    if not out.exists():
        return
    from common import provenance

    result = json.loads(out.read_text())
    if isinstance(result, dict) and "provenance" not in result:
        result["provenance"] = {**provenance(), "harness_command": " ".join(command)}
        out.write_text(json.dumps(result, indent=2))


def train(args: list[str], command: list[str]) -> int:
    """`--configs` may mix the project's configurations and Unsloth's (`unsloth-<name>`): each set runs in its own
    process and the runs land in one result file."""
    known, rest = harness_options(args, "--out", "--configs")
    out = Path(known.out or default_out("train"))
    names = (known.configs or "default").split(",")
    ours = [n for n in names if not n.startswith(UNSLOTH_PREFIX)]
    theirs = [n.removeprefix(UNSLOTH_PREFIX) for n in names if n.startswith(UNSLOTH_PREFIX)]
    unknown = sorted(set(ours) - set(configurations("train_throughput.py"))) + \
        [UNSLOTH_PREFIX + n for n in sorted(set(theirs) - set(configurations("train_unsloth.py")))]
    if unknown:
        sys.stderr.write(f"unknown configurations {unknown}: `python -m bench list` shows them\n")
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    status, merged = 0, None
    for script, chosen, part in (("train_throughput.py", ours, out), ("train_unsloth.py", theirs,
                                                                       out.with_suffix(".unsloth.json"))):
        if not chosen:
            continue
        status |= run_script(script, [*rest, "--configs", ",".join(chosen), "--out", str(part)])
        if part.exists():
            result = json.loads(part.read_text())
            merged = result if merged is None else {**merged, "runs": merged.get("runs", []) + result.get("runs", [])}
            if part != out:
                part.unlink()
    if merged is not None:
        out.write_text(json.dumps(merged, indent=2))
        stamp(out, command)
        print(f"results: {out}")
    return status


def main(argv: list[str]) -> int:
    command = ["python", "-m", "bench", *argv]
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__)
        for title, table in (("measurements", MEASUREMENTS), ("checks (python -m bench check <name>)", CHECKS)):
            print(f"{title}:")
            for name, (script, what) in table.items():
                configs = configurations(script)
                print(f"  {name:<16}{what}" + (f"\n  {'':<16}configurations: {', '.join(configs)}" if configs else ""))
        print(f"  (train also takes Unsloth's: {', '.join(UNSLOTH_PREFIX + c for c in configurations('train_unsloth.py'))})")
        return 0
    name, args = argv[0], argv[1:]
    if name == "train":
        return train(args, command)
    if name == "check":
        if not args or args[0] not in CHECKS:
            sys.stderr.write(f"python -m bench check <{'|'.join(CHECKS)}>\n")
            return 2
        known, rest = harness_options(args[1:], "--out")
        return run_script(CHECKS[args[0]][0], [*rest, "--out", known.out or str(default_out(f"{args[0]}-check"))])
    if name not in MEASUREMENTS:
        sys.stderr.write(f"unknown benchmark {name!r}: `python -m bench list` shows them\n")
        return 2
    known, rest = harness_options(args, "--out")
    out = Path(known.out or default_out(name))
    out.parent.mkdir(parents=True, exist_ok=True)
    status = run_script(MEASUREMENTS[name][0], [*rest, "--out", str(out)])
    stamp(out, command)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
