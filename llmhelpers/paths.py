"""Where bundled files live, independent of the current directory."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def samples_dir() -> Path:
    return REPO_ROOT / "data" / "samples"


def resolve(path: str | Path) -> Path:
    """A relative path is looked up in the current directory first, then the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p
