"""The trainer, resume-or-start logic, and saving.

Training consumes the features from `chat.encode` (input_ids + completion_mask): TRL sees
a pre-tokenized dataset and only turns the mask into labels. Checkpoints live under
`cfg.checkpoints_dir` (one folder per training-relevant config), so re-running the cell
resumes the same run and a changed hyperparameter starts its own.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from .environment import free_bytes

CONFIG_NAME = "finetune_config.json"


class DiskSpaceError(RuntimeError):
    """Not enough free disk for the next write; raised before writing, so nothing is half-written."""


def checkpoint_bytes(model, cfg) -> int:
    """Expected size of one checkpoint: adapters (fp32), optimizer state, tokenizer and small files."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = 2 if "8bit" in cfg.optim else 8  # two Adam moments, 1 or 4 bytes each
    return trainable * (4 + optimizer) + 30 * 2**20


def ensure_free_space(path: Path, need: int, what: str) -> None:
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(f"{what} needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at "
                             f"{path}. Free some space (old runs under outputs/*/runs) or set output_dir elsewhere.")


class DiskGuard(TrainerCallback):
    """Before each checkpoint save, checks that one more checkpoint fits (with 50% margin); if not,
    stops with a clear error while the previous checkpoint is still complete."""

    def __init__(self, cfg, model):
        self.cfg, self.need = cfg, int(checkpoint_bytes(model, cfg) * 1.5)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:
            ensure_free_space(self.cfg.checkpoints_dir, self.need, f"checkpoint {state.global_step}")


class ThroughputMeter(TrainerCallback):
    """Trained-sequence tokens per second between log events, from TRL's global `num_tokens` count."""

    def __init__(self):
        self.last: tuple[float, float] | None = None
        self.samples: list[tuple[int, float]] = []  # (step, tokens/s)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "num_tokens" not in logs:
            return
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        if self.last is not None and now > self.last[0] and tokens > self.last[1]:
            self.samples.append((state.global_step, (tokens - self.last[1]) / (now - self.last[0])))
        self.last = (now, tokens)

    def steady(self, skip: int = 3) -> float | None:
        """Median tokens/s, leaving out the first windows (kernel compilation, allocator warm-up)."""
        xs = sorted(v for _, v in self.samples[skip:]) or sorted(v for _, v in self.samples)
        return xs[len(xs) // 2] if xs else None


def build_trainer(cfg, model, tokenizer, data, callbacks=(), **sft_overrides):
    from trl import SFTTrainer

    from .environment import check_device_support

    check_device_support(cfg)
    trainer = SFTTrainer(
        model=model,
        args=cfg.sft_config(**sft_overrides),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.throughput = ThroughputMeter()
    trainer.add_callback(trainer.throughput)
    trainer.add_callback(DiskGuard(cfg, model))
    return trainer


def _step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without it was cut off mid-save."""
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return any((path / name).exists() for name in ("adapter_model.safetensors", "model.safetensors"))


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are renamed aside so nothing picks them up."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = None
    for path in sorted(run_dir.glob("checkpoint-*"), key=_step):
        if is_complete_checkpoint(path):
            found = path
        else:
            aside = path.with_name(f"incomplete-{path.name}-{int(time.time())}")
            path.rename(aside)
            print(f"ignored an incomplete checkpoint (cut off mid-save): moved to {aside.name}")
    return found


def prepare_run(cfg, fresh: bool = False) -> Path | None:
    """Decide between resuming and starting: returns the checkpoint to resume from, or None.

    fresh=True moves this run's old checkpoints aside (never deletes them). Under several
    processes only the main one touches the disk; the others wait, then read the same answer.
    """
    from accelerate import PartialState

    state = PartialState()
    run_dir = cfg.checkpoints_dir
    if state.is_main_process:
        if fresh and run_dir.exists():
            aside = run_dir.with_name(f"{run_dir.name}-old-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"fresh start: previous checkpoints moved to {aside}")
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / CONFIG_NAME)
        last_complete_checkpoint(run_dir)  # renames incomplete checkpoints aside
    state.wait_for_everyone()
    resume = last_complete_checkpoint(run_dir)
    if state.is_main_process:
        if resume is not None:
            info = json.loads((resume / "trainer_state.json").read_text())
            print(f"resuming from {resume} (step {info.get('global_step')} of {info.get('max_steps')})")
        else:
            print(f"starting a new run in {run_dir}")
    return resume


def train(trainer, cfg, fresh: bool = False):
    """Resume the run with this config if it has a checkpoint, else start it.

    Afterwards the main process writes log_history.json (losses per step) into the run folder.
    """
    resume = prepare_run(cfg, fresh=fresh)
    ensure_free_space(cfg.checkpoints_dir, int(checkpoint_bytes(trainer.model, cfg) * 1.5), "training")
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if trainer.is_world_process_zero():
        (cfg.checkpoints_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return output


def atomic_save(save_fn, target: Path) -> Path:
    """Write into a temporary sibling folder, then rename: a cut-off save never looks complete."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_fn(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    return target


def save_adapters(model, tokenizer, cfg, target: Path | None = None) -> Path:
    """Adapters (safetensors), tokenizer and config JSON in one folder."""
    def write(folder: Path):
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        cfg.save(folder / CONFIG_NAME)

    target = Path(target or cfg.final_dir)
    ensure_free_space(target.parent, checkpoint_bytes(model, cfg), "saving the adapters")
    return atomic_save(write, target)


def log_history(trainer_or_dir) -> dict[str, list]:
    """{'step', 'loss', 'eval_step', 'eval_loss'} from a trainer or a checkpoint folder."""
    if hasattr(trainer_or_dir, "state"):
        history = trainer_or_dir.state.log_history
    else:
        history = json.loads((Path(trainer_or_dir) / "trainer_state.json").read_text())["log_history"]
    out = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
    for row in history:
        if "loss" in row:
            out["step"].append(row["step"])
            out["loss"].append(row["loss"])
        if "eval_loss" in row:
            out["eval_step"].append(row["step"])
            out["eval_loss"].append(row["eval_loss"])
    return out
