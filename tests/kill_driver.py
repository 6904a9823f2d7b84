"""Runs `python -m llmhelpers` with a fault injected, for tests/test_reliability.py.

    python tests/kill_driver.py MODE STEP BATCH_LOG -- <llmhelpers.cli arguments>

MODE "step": SIGKILL in the middle of optimizer step STEP+1 (after STEP steps completed).
MODE "save": SIGKILL while checkpoint STEP is being written: after the adapter weights, before the
optimizer state and trainer_state.json. MODE "none": no fault. Every micro-batch is logged as
(step it belongs to, hash of its input ids) to BATCH_LOG, to compare the data a run trained on.
"""
import hashlib
import os
import signal
import sys

from transformers import Trainer

mode, step, batch_log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
args = sys.argv[sys.argv.index("--") + 1:]

original_step = Trainer.training_step


def training_step(self, model, inputs, *a, **kw):
    if mode == "step" and self.state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
    digest = hashlib.sha1(inputs["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]
    with open(batch_log, "a") as f:
        f.write(f"{self.state.global_step + 1} {digest}\n")
    return original_step(self, model, inputs, *a, **kw)


original_save = Trainer._save_optimizer_and_scheduler


def save_optimizer_and_scheduler(self, output_dir):
    if mode == "save" and self.state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_save(self, output_dir)


Trainer.training_step = training_step
Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler

from llmhelpers.cli import main  # noqa: E402

sys.exit(main(args))
