"""Finding final answers in text: the last \\boxed{...} with balanced braces."""
from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if absent."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    while start >= 0:
        content = _braced_after(text, start)
        if content is not None:
            return content.strip()
        start = max(text.rfind(cmd, 0, start) for cmd in _BOX_COMMANDS)
    return None


def _braced_after(text: str, start: int) -> str | None:
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in _BOX_COMMANDS:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the box was cut off
