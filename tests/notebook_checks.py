"""Structure checks on LLM.ipynb. The pytest suite checks what holds for any copy a user saves (short cells,
one parameters cell); `.ci/run` also checks the committed file carries no outputs:

    python tests/notebook_checks.py --committed LLM.ipynb
"""
import sys
from pathlib import Path

import nbformat

MAX_CELL_LINES = 15


def notebook_problems(path: Path, committed: bool = False) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if committed and (cell.outputs or cell.execution_count is not None):
            problems.append(f"cell {i} has outputs: clear them before committing (JupyterLab: Kernel > Restart "
                            "Kernel and Clear Outputs of All Cells…, then save; or use the nbstripout filter, README)")
        logic = [l for l in cell.source.splitlines() if l.strip() and not l.startswith(("import ", "from "))]
        if len(logic) > MAX_CELL_LINES:
            problems.append(f"cell {i} has {len(logic)} lines: move logic into llmhelpers")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1 or not all(k in params[0].source for k in ("PROFILE", "OVERRIDES", "make_config")):
        problems.append("there must be one cell tagged 'parameters' that sets PROFILE, holds OVERRIDES and builds "
                        "cfg with make_config")
    return problems


def pristine_notebook(path: Path):
    """The notebook as the tests run it: outputs cleared and the parameters cell as committed (git's HEAD), so a
    user's saved outputs and edited OVERRIDES or PROFILE never change what the test command checks. Other edits to
    the notebook are kept (they are changes to test). Without git, the parameters cell is taken as it is."""
    import subprocess

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    try:
        text = subprocess.run(["git", "show", f"HEAD:./{Path(path).name}"], cwd=Path(path).parent,
                              capture_output=True, text=True, check=True).stdout
        committed = nbformat.reads(text, as_version=4)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return nb
    params = lambda book: [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    if len(params(nb)) == 1 and len(params(committed)) == 1:
        params(nb)[0].source = params(committed)[0].source
    return nb


if __name__ == "__main__":
    committed = "--committed" in sys.argv
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    found = [f"{p}: {msg}" for p in paths for msg in notebook_problems(Path(p), committed)]
    print("\n".join(found) or "notebook checks passed")
    sys.exit(1 if found else 0)
