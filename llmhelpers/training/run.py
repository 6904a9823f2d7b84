"""A training run's lifecycle: its lock, the choice between resuming and starting, the memory policy, its records.

The notebook's training cell reads

    with TrainingRun(trainer, cfg) as run:  # the lock; says whether it resumes, starts, or is finished
        result = trainer.train(resume_from_checkpoint=run.checkpoint)

Everything a run writes lives under `cfg.run_dir` (one folder per training-relevant config), so re-running the cell
resumes the same run, a finished run is not trained again, and a changed hyperparameter starts its own run beside it.
On the way out the run writes log_history.json, run_complete.json and its line in the runs index; an interrupt
becomes one line that says which checkpoint was kept.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from llmhelpers.storage import ensure_free_space, save_model_folder
from llmhelpers.training.checkpoints import (RUN_COMPLETE, checkpoint_bytes, checkpoint_step,
                                            choose_resume_checkpoint, finished, last_complete_checkpoint,
                                            set_aside_folders)
from llmhelpers.training.run_lock import RunLock
from llmhelpers.training.runs import record_run
from llmhelpers.training.trainer import OneLineError, TrainingDiverged, check_built_with

# How messages name the two ways on, in the notebook's words; the CLI puts its own (llmhelpers.cli.CLI_WORDS).
WORDS = {"start over": "run start_over(cfg)", "resume": "re-run the training cell"}


class TrainingInterrupted(OneLineError, KeyboardInterrupt):
    """Kernel > Interrupt or Ctrl-C during training: says what was kept and what to do."""


class TrainingRun:
    """`with TrainingRun(trainer, cfg) as run:` holds this run's lock (one writer per run folder) for the block.

    On entry it checks that the trainer was built for `cfg`'s run (else names the step to re-run), chooses the
    checkpoint to resume from (`run.checkpoint`: the last intact one, None to start, the last one of a finished run,
    which `trainer.train` loads without training), prints that choice, and, for a run that trains, gives a new run
    fresh adapters, checks the disk and decides how many layers recompute their activations (training/memory.py).
    On exit it writes the run's records, turns an interrupt into a one-line `TrainingInterrupted` naming the
    checkpoint kept, and records a divergence as failed. Under several processes only the main one holds the lock
    and writes records; every rank enters and chooses the same checkpoint.
    """

    def __init__(self, trainer, cfg, allow_fresh_optimizer: bool = False):
        self.trainer, self.cfg, self.allow_fresh_optimizer = trainer, cfg, allow_fresh_optimizer
        self.checkpoint: str | None = None
        self.finished = False
        self.memory: dict | None = None  # the activation-checkpointing decision (training/memory.py)
        self.main = trainer.is_world_process_zero()
        self._lock = RunLock(cfg.run_dir) if self.main else None
        self._compiled = False  # its decoder layers compiled for training (compile_layers), undone on exit

    def __enter__(self) -> "TrainingRun":
        trainer, cfg = self.trainer, self.cfg
        check_trainer_matches(trainer, cfg)
        if self._lock:
            self._lock.acquire()
        try:
            resume = prepare_run(cfg, self.allow_fresh_optimizer)
            self.checkpoint = str(resume) if resume else None
            self.finished = finished(resume)
            if not self.finished:
                self._prepare_training(resume)
        except BaseException:
            self._release()
            raise
        trainer.llm_run = self
        trainer.llm_last_output = None  # what this block trains (a block that trains nothing records nothing)
        return self

    def _prepare_training(self, resume: Path | None) -> None:
        trainer, cfg = self.trainer, self.cfg
        trainer.llm_nonfinite_steps = None
        if resume is None:
            start_adapters(trainer, cfg)
        ensure_free_space(cfg.run_dir, int(checkpoint_bytes(trainer.model, cfg) * 1.5), "training")
        if self.main:
            record_run(cfg, status="training")
        if not trainer.llm_memory_policy:  # GRPO: its GRPOConfig's activation_checkpointing, as written
            return
        if cfg.compile_layers:
            # before the memory policy, so that its probe steps measure the layers that will train: compiled layers
            # keep ~0.7 GiB less per layer at rows of 16,384 than eager ones (H200, 2026-12-04), so fewer recompute
            from llmhelpers.training.compiled import compile_layers

            count = compile_layers(trainer.model)
            self._compiled = True
            if self.main:
                print(f"{count} decoder layers compiled for training (compile_layers; the first step compiles)")
        from llmhelpers.training.memory import choose_checkpointed_layers

        self.memory = decided = choose_checkpointed_layers(trainer, cfg)
        if self.main:
            print(f"activation checkpointing: {decided['checkpointed_layers']} of {decided['of']} layers recompute "
                  f"({decided['why']}" + (f": {decided['per_layer_gib'] or 'no'} GiB per layer kept, expected peak "
                                          f"{decided['expected_peak_gib']} of {decided['limit_gib']} GiB)"
                                          if decided["why"] == "measured" else ")")
                  + (f"; the 4-bit base kept dequantized ({decided['dequantized_base_bytes'] / 2**30:.2f} GiB, "
                     "dequantize_once)" if decided.get("dequantized_base_bytes") else ""))

    def __exit__(self, exc_type, exc, tb) -> bool:
        trainer, cfg = self.trainer, self.cfg
        trainer.llm_run = None
        try:
            if exc_type is None:
                self._write_records()
            elif issubclass(exc_type, KeyboardInterrupt) and not issubclass(exc_type, TrainingInterrupted):
                raise TrainingInterrupted(interrupt_message(trainer, cfg)) from None  # one line, not 135 of traceback
            elif issubclass(exc_type, TrainingDiverged):
                kept = last_complete_checkpoint(cfg.run_dir)
                message = (f"{exc}. Kept {kept or 'no checkpoint'} (written before it); nothing after it is saved. "
                           f"Lower learning_rate or check the data and the settings, then {WORDS['start over']} or "
                           "resume.")
                if self.main:
                    record_run(cfg, status="failed", error=message)
                raise TrainingDiverged(message) from None
        finally:
            self._release()
        return False

    def _write_records(self) -> None:
        trainer = self.trainer
        if not self.main:
            return
        output = trainer.llm_last_output
        if output is None:  # the block ended without training: nothing to record
            return
        if not self.finished:
            self._record_finished({"global_step": output.global_step, **output.metrics,
                                   "best_eval_loss": trainer.state.best_metric})
            return
        if getattr(trainer, "llm_records_incomplete", False):  # killed after its last checkpoint, or damaged
            self._record_finished(output.metrics)
            print("the run's records were incomplete (killed after its last checkpoint?): written from "
                  f"{Path(self.checkpoint).name}")
        print(f"this run already finished at step {trainer.state.global_step}: nothing trained; weights loaded "
              f"from {trainer.llm_loaded_from}. To train it again, {WORDS['start over']} first.")

    def _record_finished(self, metrics: dict) -> None:
        """log_history.json (losses per step), run_complete.json (final metrics) and the runs index's line."""
        cfg = self.cfg
        (cfg.run_dir / "log_history.json").write_text(json.dumps(self.trainer.state.log_history, indent=1))
        (cfg.run_dir / RUN_COMPLETE).write_text(json.dumps(metrics, indent=1))
        record_run(cfg, status="finished", metrics=metrics)

    def _release(self) -> None:
        if self._compiled:  # for the training steps only (llmhelpers.training.compiled)
            from llmhelpers.training.compiled import uncompile_layers

            uncompile_layers(self.trainer.model)
            self._compiled = False
        if self._lock:
            self._lock.release()

    def __repr__(self) -> str:
        state = ("finished: nothing to train" if self.finished else
                 f"resuming from {self.checkpoint}" if self.checkpoint else "starting from step 0")
        return f"TrainingRun({self.cfg.run_name}: {state})"


def run_training(trainer, cfg, allow_fresh_optimizer: bool = False):
    """The notebook's training cell as one call (the CLI, the tests and the benches)."""
    with TrainingRun(trainer, cfg, allow_fresh_optimizer) as run:
        return trainer.train(resume_from_checkpoint=run.checkpoint)


def check_trainer_matches(trainer, cfg) -> None:
    """Refuse a trainer built for another run, naming the earliest step to re-run: a changed model, data or LoRA
    setting needs more than a new trainer."""
    if Path(trainer.args.output_dir).resolve() == cfg.run_dir.resolve():
        return
    check_built_with(getattr(cfg, "sft_run", cfg), trainer.model, getattr(trainer, "llm_data_key", None))
    raise ValueError(f"this trainer was built for the run in {trainer.args.output_dir}, but cfg is now the run "
                     f"{cfg.run_name}: re-run the step that builds the trainer ({type(trainer).__name__}(args="
                     "cfg.trainer_args(), ...)), then this one.")


def start_over(cfg) -> Path | None:
    """Move this run's folder aside (never deleted), so that the next training starts from step 0."""
    run_dir = cfg.run_dir
    if not run_dir.exists():
        return None
    with RunLock(run_dir):
        aside = run_dir.with_name(f"{run_dir.name}-old-{time.strftime('%Y%m%d-%H%M%S')}")
        (run_dir / RunLock.NAME).unlink(missing_ok=True)
        run_dir.rename(aside)
    record_run(cfg, status="started over", moved_aside=str(aside), metrics={})
    print(f"start over: the previous checkpoints of this run were moved to {aside}")
    return aside


def prepare_run(cfg, allow_fresh_optimizer: bool = False) -> Path | None:
    """Decide between resuming and starting: returns the checkpoint to resume from, or None.

    Under several processes only the main one touches the disk; the others wait, then read the same answer.
    """
    from accelerate import PartialState

    state = PartialState()
    run_dir = cfg.run_dir
    resume = None
    if state.is_main_process:  # validates (and sets aside) once; the other ranks read the outcome after the barrier
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = choose_resume_checkpoint(run_dir, allow_fresh_optimizer)
        if not finished(resume) or not (run_dir / cfg.config_name).exists():  # a finished run keeps its config
            cfg.save(run_dir / cfg.config_name)
        for name, size in set_aside_folders(run_dir):
            print(f"  set aside earlier: {name} ({size / 1e6:.1f} MB); delete it once you no longer need it")
    state.wait_for_everyone()
    if not state.is_main_process:
        resume = choose_resume_checkpoint(run_dir, allow_fresh_optimizer)
    if state.is_main_process:
        if resume is not None and finished(resume):
            pass  # said on the way out, once the weights are loaded
        elif resume is not None:
            info = json.loads((resume / "trainer_state.json").read_text())
            print(f"resuming from {resume} (step {info.get('global_step')} of {info.get('max_steps')})")
        else:
            print(f"starting a new run in {run_dir}")
    return resume


def start_adapters(trainer, cfg) -> None:
    """A run that starts from step 0: the adapters its trainer starts from (`starting_adapters`: a GRPO run's are the
    SFT run's), else fresh LoRA weights for the seed."""
    folder = trainer.starting_adapters(cfg)
    if folder is None:
        reset_adapters(trainer.model, cfg.seed)
        return
    from llmhelpers.model.loading import load_adapter_weights

    load_adapter_weights(trainer.model, folder)
    print(f"the policy starts from the adapters in {folder}")


def reset_adapters(model, seed: int) -> None:
    """Fresh LoRA weights, the same ones for the same seed: a run that starts from step 0 never starts from
    what an earlier run in this kernel trained."""
    import torch
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, init_lora_weights=True)


def interrupt_message(trainer, cfg) -> str:
    kept = last_complete_checkpoint(cfg.run_dir)
    where = f"training interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}"
    if kept is None:
        return (f"{where}: no checkpoint was written yet, so the next training starts this run from step 0. To do "
                f"so, {WORDS['resume']}.")
    return (f"{where}: kept {kept} (step {checkpoint_step(kept)}); {WORDS['resume']} to resume from it exactly (steps "
            f"after {checkpoint_step(kept)} are trained again), or {WORDS['start over']} to start the run over.")


def save_adapters(model, tokenizer, cfg, target: Path | None = None) -> Path:
    """Adapters (safetensors), tokenizer and config JSON in one folder."""
    saved = save_model_folder(model, tokenizer, cfg, Path(target or cfg.final_dir), checkpoint_bytes(model, cfg),
                              "saving the adapters")
    record_run(cfg, adapter_dir=str(saved))
    return saved


def logged_rows(trainer_or_dir) -> list[dict]:
    """What the Trainer logged, row by row, from a trainer or a checkpoint folder."""
    if hasattr(trainer_or_dir, "state"):
        return trainer_or_dir.state.log_history
    return json.loads((Path(trainer_or_dir) / "trainer_state.json").read_text())["log_history"]


def log_history(trainer_or_dir) -> dict[str, list]:
    """{'step', 'loss', 'eval_step', 'eval_loss'} from a trainer or a checkpoint folder."""
    out = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
    for row in logged_rows(trainer_or_dir):
        if "loss" in row:
            out["step"].append(row["step"])
            out["loss"].append(row["loss"])
        if "eval_loss" in row:
            out["eval_step"].append(row["step"])
            out["eval_loss"].append(row["eval_loss"])
    return out
