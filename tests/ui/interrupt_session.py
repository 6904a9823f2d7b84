"""A user's JupyterLab session with typing, a LoRA change and Kernel > Interrupt, driven in headless Chromium
(selenium); not part of `python -m pytest` (it needs Chromium and takes minutes). `jupyterlab_session.py` beside it
covers Run All, edited parameters and re-runs; this one covers what issue #23 found: an interrupted training cell
re-run on the same trainer.

    apt-get install chromium chromium-driver && pip install selenium
    python tests/ui/interrupt_session.py CLONE_DIR SCREENSHOT_DIR

CLONE_DIR is a fresh clone whose environment is the active one. The session: open LLM.ipynb in JupyterLab 4
(LLM_PROFILE=smoke), Run > Run All Cells; edit the recipe cells by typing into them (LoRA rank 8; in SFTConfig a
learning rate and 60 steps) and run them and the config cell, then Run > Run Selected Cell and All Below from the
LoRA step's cell; Kernel > Interrupt Kernel during
training; re-run the training cell alone; the same in the GRPO section (40 steps typed into its GRPOConfig cell, run
from its config cell, interrupted during GRPO training, its training cell re-run alone); then save. Prints what each step showed and writes a screenshot per step.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

clone, shots = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
shots.mkdir(parents=True, exist_ok=True)
PORT = 8899
# every cell in the page (JupyterLab 4 otherwise renders only the cells in view), as a user's own setting
settings = shots / "lab-settings"
(settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True, exist_ok=True)
(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
    json.dumps({"windowingMode": "none"}))
lab = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={PORT}", "--allow-root",
                        "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True"],
                       cwd=clone, env={**os.environ, "LLM_PROFILE": "smoke", "JUPYTERLAB_SETTINGS_DIR": str(settings)}, stdout=subprocess.DEVNULL,
                       stderr=open(shots / "jupyter.log", "w"))
options = webdriver.ChromeOptions()
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1600,1200", "--disable-dev-shm-usage"):
    options.add_argument(flag)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
step = 0


def shot(name: str) -> None:
    global step
    step += 1
    driver.save_screenshot(str(shots / f"{step:02d}-{name}.png"))


def menu(top: str, item: str) -> None:
    driver.find_element(By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel') and text()='{top}']").click()
    time.sleep(0.5)
    driver.find_element(By.XPATH, f"//div[contains(@class,'lm-Menu-itemLabel') and text()='{item}']").click()


def cells():
    return driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")


def cell_index(prefix: str) -> int:
    for i, cell in enumerate(cells()):
        if cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").text.replace("\u200b", "").lstrip().startswith(prefix):
            return i
    raise LookupError(prefix)


def output(i: int) -> str:
    return cells()[i].find_element(By.CSS_SELECTOR, ".jp-Cell-outputWrapper").text


def idle(timeout: float = 900) -> None:
    """Until the kernel is idle and no cell is queued or running ([*])."""
    end = time.time() + timeout
    time.sleep(2)
    while time.time() < end:
        busy = driver.execute_script(
            "return [...document.querySelectorAll('.jp-InputPrompt')].some(e => e.textContent.includes('*'))")
        if not busy:
            return
        time.sleep(1)
    raise TimeoutError("the kernel stayed busy")


def select(i: int) -> None:
    cell = cells()[i]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()
    time.sleep(0.3)


def interrupt_during(cell: int, steps: int, after: int) -> int:
    """Run > Run Selected Cell and All Below has started; Kernel > Interrupt Kernel once the training cell's progress
    bar ([ 13/60 00:02 < ...) has passed `after` of `steps`. Returns the step the bar showed."""
    seen = 0
    for _ in range(2400):
        match = re.findall(rf"\[\s*(\d+)/{steps}\b", output(cell))
        seen = int(match[-1]) if match else 0
        if after <= seen < steps:
            break
        time.sleep(0.05)
    menu("Kernel", "Interrupt Kernel")
    idle()
    return seen


def run_below_and_interrupt(first: int, cell: int, steps: int, after: int, what: str) -> str:
    """Run > Run Selected Cell and All Below from `first`, interrupted while `cell` trains (interrupt_during); prints
    where the progress bar was and the cell's last line, returns what the cell printed."""
    select(first)
    menu("Run", "Run Selected Cell and All Below")
    seen = interrupt_during(cell, steps, after)
    said = output(cell)
    print(f"{what} interrupted (progress bar at {seen}/{steps}); the cell ends with:",
          said.strip().splitlines()[-1] if said.strip() else "(nothing)")
    return said


def rerun_and_report(cell: int, what: str, words: tuple[str, ...], name: str) -> str:
    """rerun(cell), print the lines of its output that hold one of `words`, screenshot it as `name`."""
    said = rerun(cell)
    print(f"re-run {what} cell said:", " | ".join(l for l in said.splitlines() if any(w in l for w in words))[:800])
    driver.execute_script("arguments[0].scrollIntoView({block: 'end'})", cells()[cell])
    shot(name)
    return said


def rerun(cell: int) -> str:
    """The cell alone, again (Shift+Enter); what it printed."""
    select(cell)
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    idle()
    return output(cell)


try:
    for _ in range(60):
        try:
            driver.get(f"http://localhost:{PORT}/lab/tree/LLM.ipynb")
            break
        except Exception:
            time.sleep(1)
    time.sleep(8)
    shot("opened")
    menu("Run", "Run All Cells")
    idle()
    errors = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    print("run all: error outputs:", len(driver.find_elements(By.CSS_SELECTOR, ".jp-RenderedText[data-mime-type="
                                                                          "'application/vnd.jupyter.error']")),
          "stderr outputs:", len(errors), "figures:", len(driver.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage")))
    train_cell = cell_index("with TrainingRun(")
    print("run all: training cell said:", output(train_cell)[-300:].replace("\n", " | "))
    shot("run-all")

    # edit the recipe cells by typing, as a user does: LoRA rank 8; in SFTConfig a learning rate and 60 steps
    def retype(i: int, lines: list[str]) -> None:
        select(i)
        editor = cells()[i].find_element(By.CSS_SELECTOR, ".cm-content")
        editor.click()
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(Keys.DELETE).perform()
        for n, line in enumerate(lines):
            editor.send_keys(line)
            if n < len(lines) - 1:
                editor.send_keys(Keys.ENTER)  # the editor indents the next line: remove it, the text has its own
                ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.HOME).key_up(Keys.SHIFT).send_keys(Keys.DELETE).perform()
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        idle()

    lora_cell, sft_cell = cell_index("lora_config = "), cell_index("sft_config = ")
    lora_text = cells()[lora_cell].find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").text
    sft_text = cells()[sft_cell].find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").text
    retype(lora_cell, lora_text.replace("    r=16,", "    r=8,").splitlines())
    retype(sft_cell, sft_text.replace("    learning_rate=2e-4,", "    learning_rate=1e-3,")
           .replace("    num_train_epochs=3.0,", "    num_train_epochs=3.0,\n    max_steps=60,").splitlines())
    print("edited LoRA cell:", cells()[lora_cell].find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").text.replace("\n", " | ")[:300])
    print("SFTConfig cell said:", output(sft_cell)[:300].replace("\n", " | "))
    shot("edited-recipe")
    # the recipe's object as the config cell shows it: a profile change kept where the cell says otherwise
    select(cell_index("cfg = make_config("))
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    idle()
    print("config cell said:", output(cell_index("cfg = make_config("))[:600].replace("\n", " | "))
    shot("config-cell")

    # from the LoRA cell down, then Kernel > Interrupt Kernel in the middle of training
    said = run_below_and_interrupt(cell_index("model = prepare_for_lora("), train_cell, 60, after=14, what="SFT")
    print("traceback lines shown:", len(said.splitlines()))
    driver.execute_script("arguments[0].scrollIntoView({block: 'end'})", cells()[train_cell])
    shot("interrupted")

    # re-run the training cell alone
    rerun_and_report(train_cell, "training", ("resum", "train_loss", "global_step"), "rerun-training")

    # the GRPO section: 40 steps typed into its GRPOConfig cell, run from its config cell, interrupted in training
    grpo_cell = cell_index("grpo_config = ")
    grpo_text = cells()[grpo_cell].find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").text
    retype(grpo_cell, grpo_text.replace("    max_steps=200,", "    max_steps=40,").splitlines())
    grpo_train = cell_index("if RUN_GRPO:\n    with TrainingRun(")
    run_below_and_interrupt(cell_index("rl_cfg = make_grpo_config("), grpo_train, 40, after=5, what="GRPO")
    shot("grpo-interrupted")
    rerun_and_report(grpo_train, "GRPO training", ("resum", "train_loss", "starting"), "grpo-rerun-training")
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    time.sleep(3)
    shot("saved")
finally:
    driver.quit()
    lab.terminate()
    lab.wait(timeout=30)
