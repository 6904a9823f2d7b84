"""The package's shape: one subpackage per subsystem, no import circles (module-level or inside functions), every
module importable on its own."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmhelpers"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}


def imports_of(path: Path) -> set[str]:
    """The llmhelpers modules a file imports, anywhere in it (a function-level import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the package uses absolute ones")
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
        found |= {n for n in names if n in MODULES}
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: imports_of(path) - {name} for name, path in MODULES.items()}
    # a module's package __init__ runs first when it is imported: the packages hold no imports, so no hidden edges
    assert all(not graph[n] for n in MODULES if MODULES[n].name == "__init__.py"), "package __init__ files import"
    cycles = []
    for start in graph:  # depth-first search for a path back to start
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_one_subpackage_per_subsystem():
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == ["config", "data", "evaluation", "export", "inference", "model", "training"]
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert top == ["cli", "environment", "paths", "plots", "rl", "storage"]  # cli, rl: the two commands


# Each subsystem may import only from the layers below it: the model never reaches up into training (issue #30 found
# model.merging importing training.checkpoints), evaluation never into training, and only the commands see everything.
LAYERS = [{"paths", "environment", "plots"}, {"config", "data"}, {"storage"}, {"model"}, {"inference"},
          {"evaluation"}, {"training", "export"}, {"cli", "rl"}]


def test_imports_run_down_the_layers():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    subsystem = lambda module: module.split(".")[1]
    assert {subsystem(m) for m in MODULES if m != "llmhelpers"} == set(level), "a subsystem is missing from LAYERS"
    upward = sorted(f"{name} -> {other}" for name, path in MODULES.items() if name != "llmhelpers"
                    for other in imports_of(path)
                    if other != "llmhelpers" and level[subsystem(other)] > level[subsystem(name)])
    assert not upward, "imports that run up the layers: " + "; ".join(upward)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh set of llmhelpers modules (third-party ones stay loaded: this is about
    the package's own import order)."""
    code = ("import importlib, sys\nbad = []\nfor name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m == 'llmhelpers' or m.startswith('llmhelpers.')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as err:\n        bad.append(f'{name}: {type(err).__name__}: {err}')\n"
            "print('\\n'.join(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code, *sorted(MODULES)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout
