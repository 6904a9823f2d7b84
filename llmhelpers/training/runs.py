"""The runs index: one line per run under `output_dir/runs`, with its key hyperparameters and results.

`TrainingRun` records a run when it starts and when it finishes, `save_adapters` adds where the adapters
went, and `runs_table(output_dir)` shows them side by side (the notebook prints it after training).
The index is `output_dir/runs/index.json`; several processes may update it, so writes take a file
lock and replace the file atomically.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

INDEX = "index.json"
# The hyperparameters shown for every run; everything else that differs from the profile is in "changed".
KEY_SETTINGS = ("learning_rate", "r", "lora_alpha", "max_length", "per_device_train_batch_size",
                "gradient_accumulation_steps", "num_train_epochs", "max_steps", "max_example_tokens", "math_samples",
                "model_id")


def index_path(output_dir) -> Path:
    return Path(output_dir) / "runs" / INDEX


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_index(output_dir) -> dict[str, dict]:
    path = index_path(output_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def rebuilt_index(output_dir) -> dict[str, dict]:
    """The index rebuilt from the run folders (each holds its finetune_config.json; a finished one its
    run_complete.json): what record_run starts from when index.json cannot be read."""
    index = {}
    configs = [*(Path(output_dir) / "runs").glob("*/finetune_config.json"),
               *(Path(output_dir) / "runs").glob("*/grpo_config.json")]
    for run in sorted(configs):
        folder = run.parent
        try:
            metrics = json.loads((folder / "run_complete.json").read_text())
        except (OSError, ValueError):
            metrics = None
        index[folder.name] = {"run": folder.name, "run_dir": str(folder), "rebuilt": True,
                              "status": "finished" if isinstance(metrics, dict) else "unknown",
                              **({"metrics": metrics} if isinstance(metrics, dict) else {})}
    return index


def _index_for_update(output_dir) -> dict[str, dict]:
    path = index_path(output_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    except (OSError, ValueError):
        pass
    aside = path.with_name(f"index.damaged-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.replace(aside)
    print(f"{path} could not be read: kept as {aside.name}, and the index rebuilt from the run folders")
    return rebuilt_index(output_dir)


def record_run(cfg, **fields) -> dict:
    """Create or update this run's entry; `fields` (status, metrics, adapter_dir, ...) are merged in. An index that
    cannot be read is kept aside and rebuilt from the run folders: no other run's entry is lost."""
    from llmhelpers.config.profiles import changed_settings, flat_settings

    path = index_path(cfg.output_dir)
    with _locked(path):
        index = _index_for_update(cfg.output_dir)
        entry = index.get(cfg.run_name, {"created": time.strftime("%Y-%m-%d %H:%M:%S")})
        if hasattr(cfg, "index_settings"):  # a GRPO run (llmhelpers.config.grpo)
            settings, changed = cfg.index_settings()
        else:
            settings = {k: v for k, v in flat_settings(cfg).items() if k in KEY_SETTINGS}
            changed = changed_settings(cfg)
        entry.update(run=cfg.run_name, run_dir=str(cfg.run_dir), profile=cfg.profile, settings=settings,
                     changed=changed,
                     updated=time.strftime("%Y-%m-%d %H:%M:%S"))
        entry.update(fields)
        index[cfg.run_name] = entry
        tmp = path.with_name(f".{INDEX}.{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True, default=str))
        tmp.replace(path)
    return entry


def runs_table(output_dir) -> str:
    """The index as text: run, status, step, final train loss, best eval loss, adapters."""
    index = read_index(output_dir)
    if not index:
        return f"no runs recorded under {Path(output_dir) / 'runs'} yet"
    head = f"{'run':<40}{'status':>13}{'step':>7}{'train loss':>12}{'eval loss':>11}  adapters"
    lines = [head, "-" * len(head)]
    for name, e in sorted(index.items(), key=lambda kv: kv[1].get("created", "")):
        m = e.get("metrics", {})
        loss = m.get("train_loss")
        best = m.get("best_eval_loss")
        adapters = e.get("adapter_dir")
        if adapters and Path(adapters).parent == Path(e.get("run_dir", "")):
            adapters = f"{Path(adapters).name}/"  # inside the run folder, the usual case
        lines.append(f"{name:<40}{e.get('status', '?'):>13}{m.get('global_step', ''):>7}"
                     f"{'' if loss is None else f'{loss:.4f}':>12}{'' if best is None else f'{best:.4f}':>11}"
                     f"  {adapters or '-'}")
    lines.append(f"(run folders in {Path(output_dir) / 'runs'}; all settings in index.json)")
    return "\n".join(lines)
