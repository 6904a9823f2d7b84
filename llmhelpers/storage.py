"""Writing model folders safely: the disk space checked before a write, and folders written to a temporary sibling
and renamed into place, so a cut-off write never looks complete. Used by training (checkpoints' neighbours: final/)
and by merging (merged/)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmhelpers.environment import free_bytes


class DiskSpaceError(RuntimeError):
    """Not enough free disk for the next write; raised before writing, so nothing is half-written."""


def ensure_free_space(path: Path, need: int, what: str) -> None:
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(f"{what} needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at "
                             f"{path}. Free some space (old runs under outputs/*/runs) or set output_dir elsewhere.")


def save_model_folder(model, tokenizer, cfg, target: Path, need: int, what: str) -> Path:
    """Weights (safetensors), tokenizer and the config JSON in one folder, written atomically after checking that
    `need` bytes are free: the adapters' `final/`, the merged model's `merged/`."""
    from llmhelpers.config.project import CONFIG_NAME

    def write(folder: Path):
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        cfg.save(folder / CONFIG_NAME)

    ensure_free_space(Path(target).parent, need, what)
    return atomic_save(write, Path(target))


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

