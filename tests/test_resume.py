"""Nothing lost: a run killed in a step or in a checkpoint save, in any epoch, padded or packed, resumes as the
uninterrupted run (same data, losses and weights to the bit); a damaged latest checkpoint is set aside and the
newest intact one is resumed; missing optimizer state
stops the run unless asked; checkpoints are fsynced before they count; one writer per run folder."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import interrupted_and_rerun
from llmhelpers.config.profiles import make_config
from llmhelpers.training.checkpoints import (COMPLETE_MARKER, CheckpointError, checkpoint_problem,
                                            choose_resume_checkpoint, last_complete_checkpoint)
from llmhelpers.training.run_lock import RunLock, RunLockedError

pytestmark = pytest.mark.slow  # subprocess trainings and kills: `python -m pytest -m slow`

DRIVER = Path(__file__).parent / "kill_driver.py"
EPOCHS, STEPS_PER_EPOCH = 3, 9  # 35 smoke training rows, 2 x 2 sequences per step


# --- the kill/resume matrix: SIGKILL in a step or while a checkpoint is written, in any epoch, padded or packed;
# the resumed run must be the uninterrupted one: the same micro-batches in the same order (every row once per epoch),
# the same loss at every step, the same recorded train loss and the same final weights, to the bit.
PADDED = ["--max_steps", "-1", "--num_train_epochs", f"{EPOCHS}"]  # 35 smoke rows, 2 x 2 sequences per step
# rows of 1,024 tokens, one per micro-batch: 6 packed rows per epoch
PACKED = ["--max_steps", "12", "--packing", "true", "--max_length", "1024", "--pad_to_multiple_of", "1024",
          "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
          "--train_sampling_strategy", "random", "--gradient_accumulation_steps", "1"]
STEPS = {"padded": EPOCHS * STEPS_PER_EPOCH, "packed": 12}
STEPS_PER_EPOCH_OF = {"padded": STEPS_PER_EPOCH, "packed": 6}


def driver(tmp_path, tiny_model_dir, batches, mode, step):
    """The CLI under tests/kill_driver.py: checkpoints every 3 steps, the loss logged at every step, the accuracy
    callback on (as the smoke profile and the notebook run: issue #29)."""
    out, log = tmp_path / "out", tmp_path / "batches.log"
    args = ["--profile", "smoke", "--output_dir", f"{out}", "--tiny_model_dir", f"{tiny_model_dir}",
            "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--accuracy_callback", "true",
            *(PACKED if batches == "packed" else PADDED)]
    return subprocess.run([sys.executable, str(DRIVER), mode, str(step), str(log), "--", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def per_step(log: Path) -> dict[int, list[str]]:
    out = defaultdict(list)
    for line in log.read_text().splitlines():
        s, h = line.split()
        out[int(s)].append(h)
    return out


def run_record(out: Path) -> tuple[dict, float, dict, dict]:
    """(step -> loss, the recorded train loss, the final adapter weights, step -> tokens trained so far) of the one
    run under `out`."""
    from safetensors.torch import load_file

    run = next((out / "runs").glob("lr*"))
    logs = [r for r in json.loads((run / "log_history.json").read_text()) if "loss" in r]
    recorded = json.loads((run / "run_complete.json").read_text())["train_loss"]
    index = json.loads((out / "runs" / "index.json").read_text())
    assert [r["metrics"]["train_loss"] for r in index.values()] == [recorded]
    return ({r["step"]: r["loss"] for r in logs}, recorded, load_file(run / "final" / "adapter_model.safetensors"),
            {r["step"]: r["num_tokens"] for r in logs})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The reference runs, one per batch layout."""
    runs = {}
    for batches in ("padded", "packed"):
        tmp = tmp_path_factory.mktemp(f"clean-{batches}")
        proc = driver(tmp, tiny_model_dir, batches, "none", 0)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[batches] = per_step(tmp / "batches.log"), run_record(tmp / "out")
    return runs


@pytest.mark.parametrize("batches,mode,kill_at,resume_from", [
    ("padded", "step", 4, 3), ("padded", "save", 6, 3), ("padded", "step", 13, 12), ("padded", "step", 22, 21),
    ("packed", "step", 10, 9)], ids=["step-epoch0", "save-epoch0", "step-epoch1", "step-epoch2", "packed-epoch1"])
def test_a_killed_run_resumes_as_the_uninterrupted_run(tmp_path, tiny_model_dir, uninterrupted, batches, mode,
                                                       kill_at, resume_from):
    import torch

    clean_batches, (clean_losses, clean_recorded, clean_weights, clean_tokens) = uninterrupted[batches]
    steps, per_epoch = STEPS[batches], STEPS_PER_EPOCH_OF[batches]
    assert max(clean_batches) == steps
    killed = driver(tmp_path, tiny_model_dir, batches, mode, kill_at)
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = [p for p in (tmp_path / "out").glob("runs/*") if p.is_dir()]
    assert not (run_dir / "final").exists()
    if mode == "save":  # the cut-off checkpoint exists but has no trainer_state.json
        assert not (run_dir / f"checkpoint-{kill_at}" / "trainer_state.json").exists()
    (tmp_path / "batches.log").unlink()
    resumed = driver(tmp_path, tiny_model_dir, batches, "none", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoint-{resume_from} (step {resume_from} of {steps})" in resumed.stdout
    if mode == "save":
        assert list(run_dir.glob(f"incomplete-checkpoint-{kill_at}-*"))
    after = per_step(tmp_path / "batches.log")
    assert min(after) == resume_from + 1 and max(after) == steps  # no step trained twice, none left out
    different = [s for s in after if after[s] != clean_batches[s]]
    assert not different, f"steps {different} trained on other data than the uninterrupted run"
    epoch = resume_from // per_epoch  # every row seen exactly once in the epoch of the resume, as without the kill
    rows = lambda run: sorted(h for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for h in run[s])
    assert rows({**clean_batches, **after}) == rows(clean_batches)
    losses, recorded, weights, tokens = run_record(tmp_path / "out")
    assert losses == clean_losses  # every step, the resumed ones included, exactly
    # the tokens trained so far at every log, the resumed steps' included (packed rows: their padding left out,
    # added up on the device and read at each log and save)
    assert tokens == clean_tokens and len(tokens) == len(losses)
    assert recorded == pytest.approx(clean_recorded, rel=1e-9)  # the mean over all steps, not the resumed ones
    assert recorded == pytest.approx(sum(clean_losses.values()) / steps, rel=1e-6)
    assert weights.keys() == clean_weights.keys()
    assert all(w.dtype == torch.float32 and torch.equal(w, clean_weights[k]) for k, w in weights.items())


# --- damaged checkpoints --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A smoke run of 4 steps with checkpoints at 2 and 4 (copied per test before damaging it)."""
    from conftest import build_tiny_trainer
    from llmhelpers.training.run import run_training

    cfg = make_config("smoke", output_dir=str(tmp_path_factory.mktemp("ckpt") / "out"),
                      tiny_model_dir=str(tiny_model_dir), max_steps=4, eval_steps=2, save_steps=2,
                      accuracy_callback=False)
    trainer, *_ = build_tiny_trainer(cfg)
    run_training(trainer, cfg)
    return cfg


def truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGE = {
    "truncated adapter": lambda c: truncate(c / "adapter_model.safetensors"),
    "truncated optimizer": lambda c: truncate(c / "optimizer.pt"),
    "garbage rng state": lambda c: (c / "rng_state.pth").write_bytes(os.urandom(2000)),
    "empty trainer state": lambda c: (c / "trainer_state.json").write_text(""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, finished_run, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run)
    assert checkpoint_problem(run / "checkpoint-4") is None
    DAMAGE[damage](run / "checkpoint-4")
    kind, detail = checkpoint_problem(run / "checkpoint-4")
    assert kind == "damaged", detail
    assert choose_resume_checkpoint(run).name == "checkpoint-2"
    assert not (run / "checkpoint-4").exists() and len(list(run.glob("damaged-checkpoint-4-*"))) == 1
    assert "checkpoint-4 is damaged" in capsys.readouterr().out


def test_training_resumes_past_a_damaged_checkpoint_to_the_configured_step(tmp_path, finished_run, tiny_trainer):
    from llmhelpers.training.run import run_training

    cfg = finished_run.replace(output_dir=str(tmp_path / "out"))
    shutil.copytree(finished_run.run_dir, cfg.run_dir)
    (cfg.run_dir / "run_complete.json").unlink()
    truncate(cfg.run_dir / "checkpoint-4" / "optimizer.pt")
    trainer, *_ = tiny_trainer(cfg)
    steps = []
    trainer.add_callback(type("Rec", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, a, s, c, **k: steps.append(s.global_step)})())
    out = run_training(trainer, cfg)
    assert steps == [3, 4] and out.global_step == 4
    assert checkpoint_problem(cfg.run_dir / "checkpoint-4") is None


def test_missing_optimizer_state_is_an_error_unless_allowed(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run)
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    assert checkpoint_problem(run / "checkpoint-4")[0] == "no_optimizer_state"
    with pytest.raises(CheckpointError, match="optimizer.pt missing.*allow_fresh_optimizer"):
        choose_resume_checkpoint(run)
    assert (run / "checkpoint-4").exists()  # nothing moved: the user decides
    assert choose_resume_checkpoint(run, allow_fresh_optimizer=True).name == "checkpoint-4"


def test_checkpoint_counts_only_after_fsync_and_marker(tmp_path, finished_run, monkeypatch):
    from llmhelpers.training import checkpoints

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(finished_run.run_dir / "checkpoint-4", ckpt)
    (ckpt / COMPLETE_MARKER).unlink()
    assert checkpoint_problem(ckpt)[0] == "incomplete"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoints.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                          real_fsync(fd)))
    checkpoints.mark_complete(ckpt)
    files = {str(p) for p in ckpt.iterdir() if p.name != COMPLETE_MARKER}
    marker_at = synced.index(str(ckpt / f".{COMPLETE_MARKER}.tmp"))
    assert files <= set(synced[:marker_at]) and str(ckpt) in synced[:marker_at]  # data first, then the marker
    assert synced[-1] == str(ckpt)  # and the folder holding the renamed marker
    assert checkpoint_problem(ckpt) is None


def test_set_aside_folders_are_reported_with_their_size(tmp_path, finished_run, capsys):
    from llmhelpers.training.run import prepare_run

    cfg = finished_run.replace(output_dir=str(tmp_path / "out"))
    shutil.copytree(finished_run.run_dir, cfg.run_dir)
    truncate(cfg.run_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert prepare_run(cfg).name == "checkpoint-2"
    out = capsys.readouterr().out
    assert "set aside earlier: damaged-checkpoint-4-" in out and " MB)" in out


# --- one writer per run folder ---------------------------------------------------------------------------------
def cli(tmp_path, out, tiny_model_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "llmhelpers", "--profile", "smoke", "--output_dir", f"{out}", "--tiny_model_dir", f"{tiny_model_dir}", "--max_steps", "6",
                             "--eval_steps", "2", "--save_steps", "2", "--accuracy_callback", "false",
                             *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_into_one_folder_one_fails_at_once(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    first, second = cli(tmp_path, out, tiny_model_dir), cli(tmp_path, out, tiny_model_dir)
    results = [p.communicate(timeout=600) + (p.returncode,) for p in (first, second)]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], [r[1][-2000:] for r in results]
    loser = next(r for r in results if r[2] == 1)
    assert "another process is writing this run" in loser[1] and "Traceback" not in loser[1]
    assert not list(out.rglob(RunLock.NAME))  # released by the winner


def test_a_lock_held_by_a_live_process_refuses_and_a_dead_ones_is_taken_over(tmp_path, tiny_model_dir):
    import socket

    from llmhelpers.training.run_lock import _process_start

    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir), max_steps=6,
                      eval_steps=2, save_steps=2, accuracy_callback=False)
    cfg.run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "start": _process_start(holder.pid), "since": "x"}
        (cfg.run_dir / RunLock.NAME).write_text(json.dumps(lock))
        started = time.monotonic()
        proc = cli(tmp_path, tmp_path / "out", tiny_model_dir)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1 and f"held by pid {holder.pid}" in err
        assert not list(cfg.run_dir.glob("checkpoint-*"))
        assert time.monotonic() - started < 60
    finally:
        holder.kill()
        holder.wait()
    proc = cli(tmp_path, tmp_path / "out", tiny_model_dir)  # the holder is dead now
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"its process {holder.pid}" in stdout and "is gone" in stdout
    assert last_complete_checkpoint(cfg.run_dir).name == "checkpoint-6"


def test_the_lock_is_reentrant_in_one_process_and_refuses_another(tmp_path):
    with RunLock(tmp_path):
        with RunLock(tmp_path):  # the CLI holds it for the whole run, train() takes it again
            pass
        assert (tmp_path / RunLock.NAME).exists()
        other = subprocess.run([sys.executable, "-c", "import sys; from llmhelpers.training.run_lock import RunLock\n"
                                f"RunLock({str(tmp_path)!r}).acquire()"], capture_output=True, text=True)
        assert other.returncode != 0 and "RunLockedError" in other.stderr
    assert not (tmp_path / RunLock.NAME).exists()
    with pytest.raises(RunLockedError):
        (tmp_path / RunLock.NAME).write_text(json.dumps({"pid": 1, "host": "another-machine", "since": "x"}))
        RunLock(tmp_path).acquire()


def test_two_processes_taking_over_a_dead_holders_lock_never_both_hold_it(tmp_path):
    """The takeover window widened to a second (the dead holder's liveness check sleeps): one process wins."""
    import socket

    (tmp_path / RunLock.NAME).write_text(json.dumps({"pid": 2**22 - 1, "host": socket.gethostname(), "since": "x"}))
    script = ("import sys, time\nfrom llmhelpers.training import run_lock\n"
              "run_lock._alive = lambda pid, start: time.sleep(1) or False\n"
              f"try:\n    run_lock.RunLock({str(tmp_path)!r}).acquire()\nexcept run_lock.RunLockedError:\n    sys.exit(3)\n"
              "time.sleep(2)")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes == [0, 3]


# --- Kernel > Interrupt, then the training cell re-run on the same trainer (issue #23) ------------------------------
def in_process_run(tiny_trainer, out, tiny_model_dir, interrupt_at=None):
    """A 12-step smoke run in this process; with interrupt_at, a KeyboardInterrupt (what Kernel > Interrupt raises)
    lands after that step, then train() is called again on the same trainer, as a re-run cell does."""
    import torch

    from llmhelpers.training.run import run_training

    cfg = make_config("smoke", output_dir=str(out), tiny_model_dir=str(tiny_model_dir), max_steps=12, eval_steps=3,
                      save_steps=3, logging_steps=1, accuracy_callback=False)
    trainer, *_ = tiny_trainer(cfg)
    message = None
    if interrupt_at:
        message = interrupted_and_rerun(trainer, cfg, interrupt_at)
        # peft's adapter loading may put new Parameter objects in place (it did when it upcast a bf16 checkpoint):
        # an optimizer kept from the interrupted call would step the old ones and train nothing
        for module in trainer.model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.requires_grad:
                    setattr(module, name, torch.nn.Parameter(param.detach().clone()))
    result = run_training(trainer, cfg)
    stepped = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    tokens = [r["num_tokens"] for r in trainer.state.log_history if "loss" in r]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return message, result, losses, tokens, weights


def test_interrupt_then_rerun_on_the_same_trainer_trains_as_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_trainer):
    import torch

    _, clean, clean_losses, clean_tokens, clean_weights = in_process_run(tiny_trainer, tmp_path / "a", tiny_model_dir)
    message, result, losses, tokens, weights = in_process_run(tiny_trainer, tmp_path / "b", tiny_model_dir, interrupt_at=8)
    assert "interrupted at step 8 of 12: kept" in message and "checkpoint-6 (step 6)" in message
    assert "re-run the training cell" in message
    assert {s: losses[s] for s in range(7, 13)} == {s: clean_losses[s] for s in range(7, 13)}
    assert result.training_loss == pytest.approx(clean.training_loss, rel=1e-9)
    assert tokens[-1] == clean_tokens[-1]  # the whole run's count, not the interrupted call's added on
    assert all(torch.equal(w, clean_weights[n]) for n, w in weights.items())
