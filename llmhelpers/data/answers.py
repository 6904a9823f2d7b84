"""Finding final answers in text: the last \\boxed{...} with balanced braces."""
from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if absent.

    Linear in the text: the braces are matched in one pass, so thousands of unclosed boxes cost no more than one."""
    opens = [m.end() - 1 for m in _BOX.finditer(text)]
    if not opens:
        return None
    closing = _matching_braces(text)
    for i in reversed(opens):
        j = closing.get(i)
        if j is not None:
            return text[i + 1:j].strip()
    return None  # every box was cut off


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each "{" that is closed -> index of its "}"."""
    stack, pairs = [], {}
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs
