"""Checkpoint files: which are complete and intact, which a resume may use, and setting damaged ones aside."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def checkpoint_bytes(model, cfg) -> int:
    """Expected size of one checkpoint: adapters (fp32), optimizer state, tokenizer and small files."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optim = cfg.trainer_config.optim
    optimizer = 2 if "8bit" in str(getattr(optim, "value", optim)) else 8  # two Adam moments, 1 or 4 bytes each
    return trainable * (4 + optimizer) + 30 * 2**20


# --- checkpoints: completeness, validation, setting aside ------------------------------------------------
COMPLETE_MARKER = "checkpoint_complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed as it is, and guessing would change the run."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(checkpoint: Path) -> None:
    """fsync every file and folder of the checkpoint, then write the marker (fsynced, renamed into place)."""
    for path in sorted(checkpoint.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(checkpoint)
    tmp = checkpoint / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": sorted(p.name for p in checkpoint.iterdir() if not p.name.startswith("."))}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(checkpoint / COMPLETE_MARKER)
    _fsync_path(checkpoint)


def _safetensors_problem(path: Path) -> str | None:
    """None if the header parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name}: header length {n} does not fit a {size}-byte file"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"{path.name}: unreadable ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name}: truncated ({size} bytes, the header describes {8 + n + max(ends, default=0)})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save files are zip archives: a truncated or garbage file fails the central directory or a CRC."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"{path.name}: unreadable ({err})"
    return f"{path.name}: member {bad} is corrupt" if bad else None


def checkpoint_problem(path: Path) -> tuple[str, str] | None:
    """None for a resumable checkpoint, else (kind, detail) with kind 'incomplete', 'damaged' or
    'no_optimizer_state'."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        return "incomplete", "cut off before it was marked complete"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return "damaged", f"trainer_state.json unreadable ({err})"
    weights = [path / n for n in ("adapter_model.safetensors", "model.safetensors") if (path / n).exists()]
    if not weights:
        return "damaged", "no adapter_model.safetensors"
    problems = [p for p in (_safetensors_problem(w) for w in weights) if p]
    problems += [p for p in (_torch_file_problem(f) for f in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")))
                 if p]
    if problems:
        return "damaged", "; ".join(problems)
    missing = [n for n in ("optimizer.pt", "scheduler.pt") if not (path / n).exists()]
    if missing:
        return "no_optimizer_state", f"{', '.join(missing)} missing"
    return None


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    run_dir = Path(run_dir)
    return sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step) \
        if run_dir.is_dir() else []


def is_complete_checkpoint(path: Path) -> bool:
    return checkpoint_problem(path) is None


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint, or None; looks only, never moves anything."""
    return next((p for p in reversed(checkpoints(run_dir)) if checkpoint_problem(p) is None), None)


def set_aside(path: Path, kind: str) -> Path:
    """Rename a checkpoint out of the Trainer's sight (never deleted): kind-checkpoint-N-<time>."""
    aside = path.with_name(f"{kind}-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside


def set_aside_folders(run_dir: Path) -> list[tuple[str, int]]:
    """(name, bytes) of every checkpoint set aside in this run folder, for the run report."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("*-checkpoint-*") if p.is_dir()] if run_dir.is_dir() else []
    return [(p.name, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) for p in sorted(found)]


def choose_resume_checkpoint(run_dir: Path, allow_fresh_optimizer: bool = False) -> Path | None:
    """The newest intact checkpoint. Newer incomplete or damaged ones are set aside, with a message.

    A checkpoint whose optimizer or scheduler state is missing would resume with a fresh optimizer and
    restart the warm-up: that is an error unless allow_fresh_optimizer=True.
    """
    for path in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        kind, detail = problem
        if kind == "no_optimizer_state":
            if allow_fresh_optimizer:
                print(f"resuming {path.name} without its optimizer state ({detail}): allow_fresh_optimizer=True, "
                      "so the optimizer and the learning-rate warm-up start over")
                return path
            raise CheckpointError(
                f"{path} has no optimizer state ({detail}). Resuming would restart the optimizer and the warm-up. "
                "Restore the files, or pass allow_fresh_optimizer=True (--allow-fresh-optimizer) to do it anyway.")
        aside = set_aside(path, kind)
        print(f"checkpoint {path.name} is {kind} ({detail}): moved to {aside.name}; trying the previous one")
    return None


RUN_COMPLETE = "run_complete.json"  # in the run folder: the finished run's metrics


def finished(checkpoint: Path | None) -> bool:
    """Whether this checkpoint is the last step of its run."""
    if checkpoint is None:
        return False
    info = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return info.get("max_steps", 0) > 0 and info["global_step"] >= info["max_steps"]


class NoTrainedAdapters(FileNotFoundError):
    """A run whose trained adapters were asked for has none yet (it has not finished)."""

    def _render_traceback_(self) -> list[str]:  # Jupyter shows the message, not the library's frames
        return [f"{type(self).__name__}: {self}"]


def trained_adapters(cfg) -> Path:
    """The adapters a finished SFT run trained: its final/ folder when they were saved there, else the checkpoint its
    trainer ends on (the best one with load_best_model_at_end, else the last), which holds the same adapters."""
    if (cfg.final_dir / "adapter_model.safetensors").is_file():
        return cfg.final_dir
    last = last_complete_checkpoint(cfg.run_dir) if cfg.run_dir.is_dir() else None
    if last is None or not finished(last):
        raise NoTrainedAdapters(f"the SFT run {cfg.run_name} has not finished (no adapters in {cfg.final_dir}, no "
                                "final checkpoint): train it first, or start GRPO from the base model "
                                "(start_from='base')")
    best = json.loads((last / "trainer_state.json").read_text()).get("best_model_checkpoint")
    if cfg.trainer_config.load_best_model_at_end and best:
        best_dir = cfg.run_dir / Path(best).name  # recorded relative to the working folder of the time
        if (best_dir / "adapter_model.safetensors").is_file():
            return best_dir
    return last
