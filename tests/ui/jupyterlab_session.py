"""A user's session in a real JupyterLab, driven in headless Chromium (not part of `python -m pytest`).

    apt-get install chromium chromium-driver && pip install selenium
    python tests/ui/jupyterlab_session.py --out /tmp/ui-shots

It copies the repository's notebook into a fresh folder, starts JupyterLab there with LLM_PROFILE=smoke, then:
1. Run All, waits for every cell, screenshots the parameters, training and attention sections;
2. edits the SFTConfig cell (learning rate and steps), re-runs it and the config cell, then re-runs from the
   trainer cell to the end, as a user tweaking a hyperparameter does;
3. re-runs the training cell once more (a finished run: nothing is trained);
4. turns `eval_without_tools` off in OVERRIDES and re-runs only the parameters and config cells and the three
   accuracy cells (base, fine-tuned, table);
5. in the GRPO section, edits the GRPOConfig cell (learning rate), re-runs it, the GRPO config and trainer cells and
   the GRPO training cell (a new GRPO run), then the training cell once more (finished: nothing trained);
and fails if any cell shows a traceback. Screenshots and a JSON summary go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parents[2]
SFT_EDIT = ("    learning_rate=2e-4,", "    learning_rate=1e-4,\n    max_steps=10,")
GRPO_EDIT = ("    learning_rate=5e-6, ", "    learning_rate=1e-5, ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(workdir: Path, port: int, token: str) -> subprocess.Popen:
    env = {**os.environ, "LLM_PROFILE": "smoke"}
    return subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True",
                             f"--ServerApp.root_dir={workdir}", "--allow-root"],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "lab.log", "w"))


def browser() -> webdriver.Chrome:
    opts = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(flag)
    opts.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


# The notebook panel: headless Chromium never focuses the window, so shell.currentWidget stays null.
NB = "Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.content && w.sessionContext)"
JS_STATE = """
const nb = """ + NB + """;
if (!nb || !nb.content || !nb.sessionContext || !nb.sessionContext.session) return null;
const cells = nb.content.widgets;
return {
  kernel: nb.sessionContext.session.kernel ? nb.sessionContext.session.kernel.status : 'none',
  prompts: cells.filter(c => c.model.type === 'code').map(c => c.model.executionCount),
  running: document.querySelectorAll('.jp-InputArea-prompt').length
           ? Array.from(document.querySelectorAll('.jp-InputArea-prompt')).filter(p => p.textContent.includes('*')).length : 0,
  errors: cells.map((c, i) => [i, c.model.type === 'code' ? c.model.outputs.toJSON()
                                   .filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue) : []])
               .filter(x => x[1].length),
};
"""


def wait_idle(driver, timeout: float = 300, settle: float = 3.0) -> dict:
    deadline, idle_since, state = time.time() + timeout, None, None
    while time.time() < deadline:
        state = driver.execute_script(JS_STATE)
        if state and state["kernel"] == "idle" and state["running"] == 0:
            idle_since = idle_since or time.time()
            if time.time() - idle_since > settle:
                return state
        else:
            idle_since = None
        time.sleep(1)
    driver.save_screenshot("/tmp/ui-timeout.png")
    raise TimeoutError(f"the notebook did not finish: last state {state} (screenshot /tmp/ui-timeout.png)")


def cell_index(driver, prefix: str) -> int:
    return driver.execute_script(
        f"return {NB}.content.widgets.findIndex(c => c.model.sharedModel.getSource().startsWith(arguments[0]));",
        prefix)


def select(driver, index: int) -> None:
    driver.execute_script(f"const panel = {NB}; window.jupyterapp.shell.activateById(panel.id);"
                          "const nb = panel.content; nb.activeCellIndex = arguments[0]; nb.deselectAll();"
                          "nb.scrollToItem(arguments[0]);", index)
    time.sleep(1)


def command(driver, name: str) -> None:
    driver.execute_script(f"window.jupyterapp.shell.activateById({NB}.id);"
                          "window.jupyterapp.commands.execute(arguments[0]); return null;", name)  # not awaited:
    # a long run would outlast selenium's script timeout (wait_idle watches it instead)


def outputs_of(driver, index: int) -> str:
    return driver.execute_script(
        f"return JSON.stringify({NB}.content.widgets[arguments[0]].model.outputs.toJSON());", index)


def texts_of(driver, index: int) -> str:
    """The printed text of a cell (its stream outputs), without figures."""
    return "".join(o.get("text", "") for o in json.loads(outputs_of(driver, index)) if o.get("output_type") == "stream")


def shot(driver, out: Path, name: str, index: int | None = None) -> str:
    if index is not None:
        select(driver, index)
    path = out / f"{name}.png"
    driver.save_screenshot(str(path))
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/ui-shots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lab-"))
    shutil.copy(ROOT / "LLM.ipynb", workdir / "LLM.ipynb")
    port, token = free_port(), "uitest"
    lab = start_lab(workdir, port, token)
    driver = browser()
    summary = {"workdir": str(workdir), "shots": []}
    try:
        for _ in range(60):
            try:
                driver.get(f"http://127.0.0.1:{port}/lab/tree/LLM.ipynb?token={token}")
                break
            except Exception:
                time.sleep(1)
        for _ in range(120):
            if driver.execute_script(JS_STATE):
                break
            time.sleep(1)
        wait_idle(driver, settle=5)
        print("notebook open, kernel idle", flush=True)
        t0 = time.time()
        command(driver, "notebook:run-all-cells")
        time.sleep(3)
        state = wait_idle(driver)
        summary["run_all_seconds"] = round(time.time() - t0, 1)
        summary["run_all_errors"] = state["errors"]
        summary["unexecuted_code_cells"] = sum(p is None for p in state["prompts"])
        params = cell_index(driver, 'PROFILE = os.environ.get("LLM_PROFILE"')
        trainer_cell = cell_index(driver, "check_ready_to_train(cfg, model, data)")
        train_cell = cell_index(driver, "with TrainingRun(trainer, cfg)")
        runs_cell = cell_index(driver, "print(runs_table(")
        summary["shots"] += [shot(driver, out, "1-parameters", params), shot(driver, out, "2-recipe", cell_index(driver, "cfg = make_config(")),
                             shot(driver, out, "3-training", train_cell), shot(driver, out, "4-runs", runs_cell),
                             shot(driver, out, "5-attention", cell_index(driver, "attn_model = ")),
                             shot(driver, out, "5a-tool-replay", cell_index(driver, "with tool_runner(")),
                             shot(driver, out, "5b-base-vs-tuned", cell_index(driver, "prompts = [render_prompt(")),
                             shot(driver, out, "5c-accuracy", cell_index(driver, "eval_problems = "))]
        summary["tool_replay_output"] = outputs_of(driver, cell_index(driver, "with tool_runner("))
        grpo_train = cell_index(driver, "if RUN_GRPO:\n    with TrainingRun(")
        grpo_table = cell_index(driver, "if RUN_GRPO:\n    with finetuned_for_evaluation(")
        summary["grpo_run_all_output"] = texts_of(driver, grpo_train)
        summary["grpo_table_output"] = texts_of(driver, grpo_table)[-1500:]
        summary["shots"] += [shot(driver, out, "5d-grpo-training", grpo_train),
                             shot(driver, out, "5e-grpo-table", grpo_table)]

        # A user edits the SFTConfig cell and re-runs it and the config cell, then the cells from the trainer on.
        sft_cell, cfg_cell = cell_index(driver, "sft_config = "), cell_index(driver, "cfg = make_config(")
        driver.execute_script(
            f"const c = {NB}.content.widgets[arguments[0]].model.sharedModel;"
            "c.setSource(c.getSource().replace(arguments[1], arguments[2]));", sft_cell, *SFT_EDIT)
        for cell in (sft_cell, cfg_cell):
            select(driver, cell)
            command(driver, "notebook:run-cell")
            wait_idle(driver)
        summary["edited_parameters_output"] = outputs_of(driver, cfg_cell)
        select(driver, trainer_cell)
        command(driver, "notebook:run-all-below")
        time.sleep(3)
        state = wait_idle(driver)
        summary["rerun_errors"] = state["errors"]
        summary["rerun_train_output"] = outputs_of(driver, train_cell)[-600:]
        summary["rerun_runs_table"] = outputs_of(driver, runs_cell)
        summary["shots"] += [shot(driver, out, "6-rerun-training", train_cell),
                             shot(driver, out, "7-rerun-runs", runs_cell)]

        # The finished run's training cell, once more.
        select(driver, train_cell)
        command(driver, "notebook:run-cell")
        state = wait_idle(driver)
        summary["finished_rerun_output"] = outputs_of(driver, train_cell)[-600:]
        summary["shots"].append(shot(driver, out, "8-finished-rerun", train_cell))

        # An evaluation-only tweak: no second grading without tools; re-run the parameters and the accuracy cell only.
        driver.execute_script(
            f"const c = {NB}.content.widgets[arguments[0]].model.sharedModel;"
            "c.setSource(c.getSource().replace(arguments[1], arguments[2]));", params, "OVERRIDES = {}",
            'OVERRIDES = {"eval_without_tools": False}')
        for cell in (params, cfg_cell):
            select(driver, cell)
            command(driver, "notebook:run-cell")
            wait_idle(driver)
        # the three accuracy cells: the base, the fine-tuned model, the table
        for cell in (cell_index(driver, "eval_problems = "), cell_index(driver, "with finetuned_for_evaluation("),
                     cell_index(driver, "results = [base_result")):
            select(driver, cell)
            command(driver, "notebook:run-cell")
            state = wait_idle(driver)
        accuracy_cell = cell_index(driver, "results = [base_result")
        summary["accuracy_rerun_output"] = outputs_of(driver, accuracy_cell)[-1500:]
        summary["shots"].append(shot(driver, out, "9-accuracy-rerun", accuracy_cell))

        # The GRPO section: a changed learning rate in its GRPOConfig cell is a new GRPO run; re-run, it is finished.
        grpo_recipe = cell_index(driver, "grpo_config = ")
        driver.execute_script(
            f"const c = {NB}.content.widgets[arguments[0]].model.sharedModel;"
            "c.setSource(c.getSource().replace(arguments[1], arguments[2]));", grpo_recipe, *GRPO_EDIT)
        for cell in (grpo_recipe, cell_index(driver, "rl_cfg = make_grpo_config("),
                     cell_index(driver, "rl_trainer = ResumableGRPOTrainer("), grpo_train):
            select(driver, cell)
            command(driver, "notebook:run-cell")
            state = wait_idle(driver)
        summary["grpo_rerun_output"] = texts_of(driver, grpo_train)
        summary["shots"].append(shot(driver, out, "10-grpo-new-run", grpo_train))
        select(driver, grpo_train)
        command(driver, "notebook:run-cell")
        state = wait_idle(driver)
        summary["grpo_finished_output"] = texts_of(driver, grpo_train)
        summary["shots"].append(shot(driver, out, "11-grpo-finished", grpo_train))
        summary["final_errors"] = state["errors"]
    finally:
        driver.quit()
        lab.terminate()
        lab.wait(timeout=30)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    ok = not (summary["run_all_errors"] or summary["rerun_errors"] or summary["final_errors"]
              or summary["unexecuted_code_cells"])
    ok = ok and "already finished at step 10" in summary["finished_rerun_output"]
    ok = ok and "[executed in the sandbox]" in summary["tool_replay_output"]
    ok = ok and "finetuned-no-tools" not in summary["accuracy_rerun_output"]
    ok = ok and "grpo-lr1e-5" in summary["grpo_rerun_output"] and "the policy starts from" in summary["grpo_rerun_output"]
    ok = ok and "already finished at step 2" in summary["grpo_finished_output"]
    ok = ok and "\ngrpo " in summary["grpo_table_output"]
    ok = ok and not any("Traceback" in summary[k] or "attempting to log" in summary[k]
                        for k in ("grpo_run_all_output", "grpo_rerun_output", "grpo_finished_output"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
