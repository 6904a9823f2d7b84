"""LLM.ipynb executed top to bottom in the smoke profile (as CI does), then what it left behind:
adapters, TensorBoard loss series, eval JSONL, the merged model, the attention figure. Also checks
the committed notebook carries no outputs and keeps its cells short."""
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "LLM.ipynb"
MAX_CELL_LINES = 15


def test_committed_notebook_has_no_outputs_and_short_cells():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert not cell.outputs and cell.execution_count is None, f"cell {i} has outputs: clear them before committing"
        logic = [l for l in cell.source.splitlines() if l.strip() and not l.startswith(("import ", "from "))]
        assert len(logic) <= MAX_CELL_LINES, f"cell {i} is long: move logic into llmhelpers"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "LLM_PROFILE" in params[0].source and "OVERRIDES" in params[0].source


RERUN = "cfg = replace(cfg, learning_rate=1e-4, max_steps=10)"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The notebook top to bottom, then, in the same kernel, a changed hyperparameter and every cell from
    the data section on re-run: what a user tweaking the config does."""
    from nbclient import NotebookClient

    workdir = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    data_section = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## 4. Data"))
    nb.cells += [nbformat.v4.new_code_cell(RERUN)] + [nbformat.from_dict(dict(c)) for c in nb.cells[data_section:]]
    env_before = os.environ.get("LLM_PROFILE")
    os.environ["LLM_PROFILE"] = "smoke"  # the kernel inherits it, as with `LLM_PROFILE=smoke jupyter execute`
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("LLM_PROFILE")
        else:
            os.environ["LLM_PROFILE"] = env_before
    return workdir / "outputs" / "smoke", nb


def test_smoke_notebook_leaves_adapters_and_config(smoke_run):
    out, _ = smoke_run
    final = out / "final"
    assert (final / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((final / "finetune_config.json").read_text())["model_id"] == "llmhelpers/tiny-r1"
    assert not list(out.glob(".*tmp*"))


def test_smoke_notebook_logs_a_falling_loss_to_tensorboard(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = smoke_run
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events
    first_run = [e for e in events if e.parent.parent.parent.name == first_run_id(out)]
    series = {}
    for e in first_run:
        acc = EventAccumulator(str(e))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend(acc.Scalars(tag))
    loss = [s.value for s in sorted(series["train/loss"], key=lambda s: s.step)]
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < 0.9 * sum(loss[:5]) / 5, loss  # 30 steps on a tiny model: at least 10% lower
    assert "eval/loss" in series and "eval/accuracy" in series  # the accuracy callback ran at each save


def first_run_id(out):
    from llmhelpers.config import make_config

    return make_config("smoke").run_id


def test_rerun_after_changing_a_hyperparameter_trains_a_new_run(smoke_run):
    out, nb = smoke_run
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2 and first_run_id(out) in runs
    (second,) = [r for r in runs if r != first_run_id(out)]
    saved = json.loads((out / "runs" / second / "finetune_config.json").read_text())
    assert saved["learning_rate"] == 1e-4 and saved["max_steps"] == 10
    assert (out / "runs" / second / "checkpoint-10").exists()
    final = json.loads((out / "final" / "finetune_config.json").read_text())
    assert final["learning_rate"] == 1e-4  # the saved adapters are the re-run's


def test_smoke_notebook_evaluates_merges_and_plots(smoke_run):
    out, nb = smoke_run
    rows = [json.loads(l) for l in (out / "eval" / "finetuned.jsonl").read_text().splitlines()]
    assert rows and {"correct", "finished_thinking", "thinking_tokens", "output"} <= set(rows[0])
    assert len(rows) == len((out / "eval" / "base.jsonl").read_text().splitlines())
    assert (out / "merged" / "model.safetensors").stat().st_size > 0
    assert (out / "merged" / "tokenizer.json").exists()
    assert (out / "attention.png").stat().st_size > 1000
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "'ok': True" in text and "reasoning tokens put" in text and "finetuned acc" in text
