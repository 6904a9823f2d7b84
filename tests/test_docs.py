"""Every Python snippet in the documents runs: on the tiny model and a saved tiny adapter, with the few strings that
name the real model, a GPU or a long budget replaced (each replacement must still find its text, so a changed
snippet cannot slip past the test)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "QUICK_START.md", "FINETUNING_GUIDE.md", "BENCHMARKS.md"]
SNIPPETS = [(doc, i, block) for doc in DOCS
            for i, block in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.DOTALL))]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter") / "final"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_the_documents_hold_python_snippets():
    assert len(SNIPPETS) >= 1 and any(doc == "FINETUNING_GUIDE.md" for doc, _, _ in SNIPPETS)


@pytest.mark.parametrize("doc,index,code", SNIPPETS, ids=[f"{d}#{i}" for d, i, _ in SNIPPETS])
def test_a_documented_snippet_runs(doc, index, code, tiny_model_dir, tiny_adapter, capsys):
    replacements = {
        '"outputs/deepseek-r1-math-science/runs/<run name>/final"': repr(str(tiny_adapter)),
        '"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"': repr(str(tiny_model_dir)),
        'device_map="cuda"': 'device_map="cpu"',
        "max_new_tokens=4096": "max_new_tokens=8",
    }
    for old, new in replacements.items():
        code = code.replace(old, new)
    assert "deepseek-ai/" not in code and '"cuda"' not in code, f"{doc} snippet {index} needs the real model or a GPU"
    scope = {"__name__": "__main__"}
    exec(compile(code, f"{doc} snippet {index}", "exec"), scope)
    if "OVERRIDES" in scope:  # a parameters-cell example: its keys and values must make a valid config
        from llmhelpers.config.profiles import make_config

        make_config("full", **scope["OVERRIDES"])
    else:
        assert capsys.readouterr().out.strip(), f"{doc} snippet {index} printed nothing"


def test_the_documented_cpu_torch_is_the_one_ci_installs():
    ci = re.search(r'pip install -q "torch==([\d.]+)"', (ROOT / ".ci" / "run").read_text()).group(1)
    for doc in ("README.md", "QUICK_START.md"):
        text = " ".join((ROOT / doc).read_text().split())  # a line break is a space
        assert f"torch=={ci} --index-url https://download.pytorch.org/whl/cpu" in text, f"{doc} pins another torch"
    assert "LLM_PROFILE=smoke jupyter lab LLM.ipynb" in (ROOT / "QUICK_START.md").read_text()


def test_the_loss_plot_has_whole_step_ticks():
    import matplotlib

    matplotlib.use("Agg")
    from llmhelpers.plots import loss_curve

    fig = loss_curve({"step": list(range(1, 11)), "loss": [1.0] * 10, "eval_step": [], "eval_loss": []})
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 10]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
