"""LLM.ipynb executed top to bottom in the smoke profile (as CI does), then what a user does next in the same
kernel: edit the recipe cells (LoRA rank, learning rate, steps), re-run from there (a second run beside the first),
re-run the finished training cell (nothing trained), and change a model setting (refused). Then what it left behind: per-run
adapters, TensorBoard series, evaluation JSONL, merged model, attention figure, the runs index."""
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "LLM.ipynb"
sys.path.insert(0, str(Path(__file__).parent))
from notebook_checks import notebook_problems, pristine_notebook  # noqa: E402

pytestmark = pytest.mark.slow  # executes the notebook: `python -m pytest -m slow`

# the user's edits to the recipe cells, as (cell text, edited text)
LORA_EDIT = ("    r=16,", "    r=8,")
SFT_EDITS = [("    learning_rate=2e-4,", "    learning_rate=1e-4,"),
             ("    num_train_epochs=3.0,", "    num_train_epochs=3.0,\n    max_steps=10,")]


def user_saved_copy(tmp_path) -> Path:
    """LLM.ipynb as JupyterLab autosaves it after a user followed QUICK_START: outputs, PROFILE and OVERRIDES edited."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="some output\n")]
            cell.execution_count = 1
        if "parameters" in cell.metadata.get("tags", []):
            cell.source = ('PROFILE = "smoke"\nOVERRIDES = {"math_samples": 3}\n'
                           "profile = load_profile(PROFILE)\nprint(profile)")
        if "recipe" in cell.metadata.get("tags", []):
            cell.source = cell.source.replace(*LORA_EDIT)
    (tmp_path / "repo").mkdir(parents=True)
    saved = tmp_path / "repo" / "LLM.ipynb"
    nbformat.write(nb, saved)
    return saved


def test_notebook_structure_holds_even_when_saved_with_outputs_and_edited_parameters(tmp_path):
    """`python -m pytest` must pass after a user edits the parameters and JupyterLab autosaves with outputs."""
    assert notebook_problems(NOTEBOOK) == [], "the notebook's structure is broken (see the list)"
    saved = user_saved_copy(tmp_path)
    assert notebook_problems(saved) == [], "a user's autosaved copy with edited parameters fails the checks"
    problems = notebook_problems(saved, committed=True)  # what .ci/run refuses in a commit
    assert any("has outputs" in p and "Restart Kernel and Clear Outputs of All Cells" in p for p in problems)


def test_the_tests_run_the_committed_parameters_not_a_users_edits(tmp_path):
    import shutil
    import subprocess

    saved = user_saved_copy(tmp_path)
    repo = saved.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)
    git("init", "-q")
    nbformat.write(pristine_notebook(NOTEBOOK), saved)  # commit the pristine notebook, then edit it as the user did
    git("add", "LLM.ipynb")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    shutil.move(str(user_saved_copy(tmp_path / "again")), saved)
    nb = pristine_notebook(saved)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert "OVERRIDES = {}" in params.source and 'PROFILE = "smoke"' not in params.source, \
        "the tests would run a user's edited parameters instead of the committed ones"
    assert any(LORA_EDIT[0] in c.source for c in nb.cells if "recipe" in c.metadata.get("tags", [])), \
        "the tests would run a user's edited recipe instead of the committed one"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_nbstripout_leaves_a_copy_the_commit_check_accepts(tmp_path):
    nbstripout = pytest.importorskip("nbstripout")
    import subprocess

    saved = user_saved_copy(tmp_path)
    subprocess.run([sys.executable, "-m", "nbstripout", str(saved)], check=True)
    assert not [p for p in notebook_problems(saved, committed=True) if "has outputs" in p], nbstripout.__name__


def cell_index(nb, heading: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.source.startswith(heading))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from nbclient import NotebookClient

    workdir = tmp_path_factory.mktemp("notebook")
    nb = pristine_notebook(NOTEBOOK)  # a user's saved outputs and edited parameters do not change the test
    lora_cell, sft_cell = (next(c for c in nb.cells if c.source.startswith(start))
                           for start in ("lora_config = ", "sft_config = "))
    cfg_cell = next(c for c in nb.cells if c.source.startswith("cfg = make_config("))
    edited_lora, edited_sft = nbformat.from_dict(dict(lora_cell)), nbformat.from_dict(dict(sft_cell))
    edited_lora.source = lora_cell.source.replace(*LORA_EDIT)
    for old, new in SFT_EDITS:
        edited_sft.source = edited_sft.source.replace(old, new)
    assert edited_lora.source != lora_cell.source and edited_sft.source.count("\n") == sft_cell.source.count("\n") + 1
    lora_step = cell_index(nb, "## 5. LoRA")
    train_cell = next(c for c in nb.cells[lora_step:] if c.source.startswith("with TrainingRun("))
    refuse = nbformat.v4.new_code_cell(
        'cfg = cfg.replace(bnb_4bit_quant_type="fp4")\n'
        "try:\n    check_ready_to_train(cfg, model, data)\nexcept ValueError as err:\n    print('REFUSED:', err)")
    earliest = nbformat.v4.new_code_cell(  # the training cell re-run after a model setting changed
        "try:\n    with TrainingRun(trainer, cfg) as run:\n        trainer.train(resume_from_checkpoint=run.checkpoint)\n"
        "except ValueError as err:\n    print('EARLIEST:', err)")
    stale = nbformat.v4.new_code_cell(
        'cfg = make_config(PROFILE, bnb=bnb_config, lora=lora_config, sft=sft_config).replace(learning_rate=5e-4)\n'
        "try:\n    with TrainingRun(trainer, cfg) as run:\n        trainer.train(resume_from_checkpoint=run.checkpoint)\n"
        "except ValueError as err:\n    print('STALE TRAINER:', err)")
    # the user edits the LoRA and SFTConfig cells and re-runs from the LoRA config cell's step: config cells, then
    # the LoRA section onwards (the model and data in memory are still right)
    nb.cells += ([edited_lora, edited_sft, nbformat.from_dict(dict(cfg_cell))]
                 + [nbformat.from_dict(dict(c)) for c in nb.cells[lora_step:]]
                 + [nbformat.from_dict(dict(train_cell)), refuse, earliest, stale])
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


def outputs_text(cells) -> str:
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)


def runs(out):
    from llmhelpers.config.profiles import make_config

    first = make_config("smoke").run_dir.name
    second = make_config("smoke", learning_rate=1e-4, max_steps=10, r=8).run_dir.name
    return out / "runs" / first, out / "runs" / second


def test_each_run_keeps_its_own_adapters_evaluation_merge_and_figure(smoke_run):
    out, nb = smoke_run
    for run, lr in zip(runs(out), (3e-3, 1e-4)):
        final = run / "final"
        assert (final / "adapter_model.safetensors").stat().st_size > 0
        assert json.loads((final / "finetune_config.json").read_text())["sft"]["learning_rate"] == lr
        rows = [json.loads(l) for l in (run / "eval" / "finetuned.jsonl").read_text().splitlines()]
        assert rows and {"correct", "finished_thinking", "thinking_tokens", "output"} <= set(rows[0])
        assert len(rows) == len((run / "eval" / "base.jsonl").read_text().splitlines())
        no_tools = [json.loads(l) for l in (run / "eval" / "finetuned-no-tools.jsonl").read_text().splitlines()]
        assert len(no_tools) == len(rows) and {r["tool_calls"] for r in no_tools} == {0}
        assert (run / "merged" / "model.safetensors").stat().st_size > 0
        assert (run / "attention.png").stat().st_size > 10_000
        assert (run / "gguf" / "model.gguf").stat().st_size > 0 and (run / "gguf" / "Modelfile").exists()  # section 12
        assert "pass@1" in (final / "README.md").read_text() and (run / "merged" / "README.md").exists()
    assert not list(out.rglob(".*tmp*"))
    assert not (out / "final").exists() and not (out / "eval").exists()  # nothing shared between runs


def test_tool_execution_is_shown_and_reported(smoke_run):
    _, nb = smoke_run
    text = outputs_text(nb.cells)
    assert "[executed in the sandbox]\n55\n```" in text  # the demo problem's block, run for real
    assert "(the data recorded: '55'; the sandbox printed: '55')" in text
    assert "tools errors timeouts" in text and "finetuned-no-tools" in text
    assert "'max_abs_error_by_type'" in text and "skipped: set hub_repo_id" in text  # GGUF read back; no push


def test_the_index_lists_both_runs(smoke_run):
    from llmhelpers.training.runs import read_index

    out, nb = smoke_run
    index = read_index(out)
    first, second = runs(out)
    assert {first.name, second.name} <= set(index)
    assert index[second.name]["settings"]["learning_rate"] == 1e-4 and index[second.name]["status"] == "finished"
    assert index[second.name]["changed"] == {"learning_rate": 1e-4, "max_steps": 10, "r": 8}
    assert index[first.name]["metrics"]["global_step"] == 30 and index[second.name]["metrics"]["global_step"] == 10
    assert first.name in outputs_text(nb.cells) and second.name.startswith("lr1e-4_r8_b4_s10-")
    table_rows = [l for l in outputs_text(nb.cells).splitlines() if l.startswith(first.name)]
    assert table_rows and table_rows[0].rstrip().endswith("final/"), table_rows  # printed after the adapters saved


def test_smoke_notebook_logs_a_falling_loss_to_tensorboard(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = smoke_run
    first, _ = runs(out)
    series = {}
    for e in first.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(e))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend(acc.Scalars(tag))
    assert {e.parent for e in first.rglob("events.out.tfevents.*")} == {first}  # listed by run name, no date folder
    loss = [s.value for s in sorted(series["train/loss"], key=lambda s: s.step)]
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < 0.9 * sum(loss[:5]) / 5, loss  # 30 steps on a tiny model: at least 10% lower
    assert "eval/loss" in series and "eval/accuracy" in series  # the accuracy callback ran at each save


def test_edited_parameters_train_a_new_run_and_a_finished_rerun_trains_nothing(smoke_run):
    out, nb = smoke_run
    _, second = runs(out)
    saved = json.loads((second / "finetune_config.json").read_text())
    assert saved["sft"]["learning_rate"] == 1e-4 and saved["sft"]["max_steps"] == 10 and saved["lora"]["r"] == 8
    adapter = json.loads((second / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 8  # the LoRA cell's edit is what trained
    assert "kept as written in the cells: learning_rate=0.0001, max_steps=10" in outputs_text(nb.cells)
    assert sorted(p.name for p in second.glob("checkpoint-*")) == ["checkpoint-10"] or \
        max(int(p.name.split("-")[1]) for p in second.glob("checkpoint-*")) == 10
    text = outputs_text(nb.cells)
    assert "this run already finished at step 10: nothing trained" in text
    state = json.loads((second / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10 and not list(second.glob("checkpoint-11"))


def test_a_changed_model_setting_and_a_stale_trainer_are_refused(smoke_run):
    _, nb = smoke_run
    text = outputs_text(nb.cells)
    assert "REFUSED: the model in memory was loaded with bnb_config.bnb_4bit_quant_type='nf4'" in text
    assert "Re-run the step that loads the model (load_base_model)" in text
    assert "STALE TRAINER: this trainer was built for the run" in text and "re-run the step that builds" in text
    # one message names the earliest step to re-run (the model's), not the trainer's first and the model's next
    assert "EARLIEST: the model in memory was loaded with bnb_config.bnb_4bit_quant_type='nf4'" in text


def test_the_notebook_shows_the_recipe_and_its_results(smoke_run):
    _, nb = smoke_run
    text = outputs_text(nb.cells)
    assert "BitsAndBytesConfig" in text and "--- LoraConfig" in text and "train_sampling_strategy" in text
    assert "usable" in text  # the first data report, before the split
    assert "'ok': True" in text and "reasoning tokens put" in text and "pass@1" in text and "hit budget" in text and "maj@k" in text
    committed = "".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert "ResumableSFTTrainer(" in committed and committed.count("get_peft_model(model") == 1  # no second attach
    # the middle's library calls are in the cells, not behind one helper each (issue #30)
    assert "trainer.train(resume_from_checkpoint=run.checkpoint)" in committed
    assert committed.count("evaluate(") >= 3 and "evaluate_base_and_finetuned" not in committed


def test_the_grpo_section_trains_from_each_sft_run_and_grades_its_policy(smoke_run):
    """Section 13 ran in both passes: a GRPO run beside each SFT run (each started from that run's adapters), with its
    adapters, records and graded answers, and the table with the GRPO row."""
    import json

    out, nb = smoke_run
    grpo_runs = sorted((out / "runs").glob("grpo-*"))
    assert len(grpo_runs) == 2
    for run in grpo_runs:
        assert (run / "final" / "adapter_model.safetensors").exists() and (run / "run_complete.json").exists()
        assert json.loads((run / "grpo_config.json").read_text())["start_from"] == "sft"
        assert list((run / "eval").glob("grpo*.jsonl"))
    text = outputs_text(nb.cells)
    assert text.count("the policy starts from the adapters in") == 2 and "\ngrpo " in text.replace("|", " ")


def test_the_recipe_cells_are_configs_full_yaml():
    """The notebook's written-out recipe and configs/full.yaml (what the command line reads) are one recipe: the cells,
    run with PROFILE="full", give the same run as make_config("full")."""
    from llmhelpers.config.profiles import make_config

    nb = nbformat.read(NOTEBOOK, as_version=4)
    imports = next(c for c in nb.cells if c.cell_type == "code" and "from llmhelpers" in c.source)
    cells = [c for c in nb.cells if {"parameters", "recipe"} & set(c.metadata.get("tags", []))]
    namespace = {}
    exec(imports.source, namespace)
    namespace["os"].environ.pop("LLM_PROFILE", None)
    for cell in cells:
        exec(cell.source.replace("print(profile)", ""), namespace)
    cfg = make_config("full", bnb=namespace["bnb_config"], lora=namespace["lora_config"], sft=namespace["sft_config"])
    assert cfg.training_settings() == make_config("full").training_settings()
    assert cfg.run_id == make_config("full").run_id
