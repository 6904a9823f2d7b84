"""Structure checks on LLM.ipynb. The pytest suite checks what holds for any copy a user saves (short cells, one
parameters cell, the recipe cells); `.ci/run` also checks the committed file carries no outputs:

    python tests/notebook_checks.py --committed LLM.ipynb
"""
import ast
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
        if len(logic) > MAX_CELL_LINES and not _one_statement(cell.source):  # a config written out may be long
            problems.append(f"cell {i} has {len(logic)} lines: move logic into llmhelpers")
    params = tagged(nb, "parameters")
    if len(params) != 1 or not all(k in params[0].source for k in ("PROFILE", "OVERRIDES", "load_profile")):
        problems.append("there must be one cell tagged 'parameters' that sets PROFILE, holds OVERRIDES and loads "
                        "the profile")
    recipe = tagged(nb, "recipe")
    built = {name for cell in recipe for name in ("BitsAndBytesConfig(", "LoraConfig(", "SFTConfig(") if name in cell.source}
    if len(recipe) != 3 or len(built) != 3:
        problems.append("there must be three cells tagged 'recipe' that build BitsAndBytesConfig, LoraConfig and "
                        "SFTConfig")
    return problems


def tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def _one_statement(source: str) -> bool:
    try:
        return len(ast.parse(source).body) == 1
    except SyntaxError:
        return False


def pristine_notebook(path: Path):
    """The notebook as the tests run it: outputs cleared and the parameters and recipe cells (SFT's and GRPO's) as
    committed (git's HEAD), so a user's saved outputs and edited settings never change what the test command checks. Other edits to
    the notebook are kept (they are changes to test). Without git, the cells are taken as they are."""
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
    for tag in ("parameters", "recipe", "grpo-recipe"):
        mine, theirs = tagged(nb, tag), tagged(committed, tag)
        if len(mine) == len(theirs):
            for cell, original in zip(mine, theirs):
                cell.source = original.source
    return nb


if __name__ == "__main__":
    committed = "--committed" in sys.argv
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    found = [f"{p}: {msg}" for p in paths for msg in notebook_problems(Path(p), committed)]
    print("\n".join(found) or "notebook checks passed")
    sys.exit(1 if found else 0)
