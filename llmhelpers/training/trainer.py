"""The trainer, resume-or-start logic, and saving.

Training consumes the features from `chat.encode` (input_ids + completion_mask): TRL sees
a pre-tokenized dataset and only turns the mask into labels. Everything a run writes lives
under `cfg.run_dir` (one folder per training-relevant config), so re-running the cell
resumes the same run, a finished run is not trained again, and a changed hyperparameter
starts its own run beside it.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTTrainer

from llmhelpers.config.project import CONFIG_NAME
from llmhelpers.storage import ensure_free_space, save_model_folder
from llmhelpers.training.checkpoints import (checkpoint_bytes, checkpoint_step, choose_resume_checkpoint,
                                            last_complete_checkpoint, mark_complete, set_aside_folders)
from llmhelpers.training.packing import PackedMask, trailing_padding
from llmhelpers.training.run_lock import RunLock


class DiskGuard(TrainerCallback):
    """Before each checkpoint save, checks that one more checkpoint fits (with 50% margin); if not,
    stops with a clear error while the previous checkpoint is still complete."""

    def __init__(self, cfg, model):
        self.cfg, self.need = cfg, int(checkpoint_bytes(model, cfg) * 1.5)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:
            ensure_free_space(self.cfg.run_dir, self.need, f"checkpoint {state.global_step}")


class OneLineError:
    """Shown by Jupyter as its one-line message: IPython prints `_render_traceback_()` instead of a traceback whose
    frames are the library's, not the user's (the message says what happened and what to do)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class TrainingDiverged(OneLineError, RuntimeError):
    """The loss or a trained weight became NaN or infinite: the run stops, before any checkpoint holds it."""


class StopOnNonFinite(TrainerCallback):
    """Stops the run at the first log, evaluation or save after a step whose loss was not finite, or before a save
    of non-finite trained weights (a NaN gradient reaches the weights through the optimizer step). The Trainer would
    go on: its logging filters NaN losses out (logging_nan_inf_filter), so a run of NaN adapters ended "finished"
    with a train loss of 0.0. Checked only when the Trainer logs, evaluates or saves: one GPU sync then, none per step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if not (control.should_log or control.should_evaluate or control.should_save or control.should_training_stop
                or state.global_step >= state.max_steps):
            return
        import torch

        what = None
        bad = nonfinite_steps_on_every_rank(self.trainer.llm_nonfinite_steps, args.device)
        if bad > 0:
            what = f"the loss was not finite in {bad} step(s) up to this one (on any process)"
        elif control.should_save:
            weights = [p for p in self.trainer.model.parameters() if p.requires_grad]
            if weights and not bool(torch.stack([torch.isfinite(p).all() for p in weights]).all()):
                what = "a trained weight is not finite"
        if what:
            raise TrainingDiverged(f"training diverged at step {state.global_step}: {what}")


def nonfinite_steps_on_every_rank(flag, device) -> int:
    """The count of non-finite loss steps summed over the processes: each rank sees only its own loss, and a rank
    that stopped alone would leave the others waiting in their next collective until the timeout. Every rank calls
    this at the same steps (the Trainer's log/eval/save decisions depend on the step only)."""
    import torch
    import torch.distributed as dist

    count = torch.zeros((), dtype=torch.int64, device=device) if flag is None else flag.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
    return int(count)


class ThroughputMeter(TrainerCallback):
    """Trained-sequence tokens per second between log events, from TRL's global `num_tokens` count."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.last: tuple[float, float] | None = None
        self.samples: list[tuple[int, float]] = []  # (step, tokens/s)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "num_tokens" not in logs:
            return
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        if self.last is not None and now > self.last[0] and tokens > self.last[1]:
            self.samples.append((state.global_step, (tokens - self.last[1]) / (now - self.last[0])))
        self.last = (now, tokens)

    def steady(self, skip: int = 3) -> float | None:
        """Median tokens/s, leaving out the first windows (kernel compilation, allocator warm-up)."""
        xs = sorted(v for _, v in self.samples[skip:]) or sorted(v for _, v in self.samples)
        return xs[len(xs) // 2] if xs else None


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping, drawn from `seed + epoch` instead of the global torch RNG.

    The stock sampler draws each epoch's order from the global RNG when the epoch starts. A resume in
    the middle of epoch >= 1 rebuilds that order before the checkpoint's RNG state is restored, so the
    rest of the run trained on a different order (rows skipped, rows repeated). Seeded per epoch, the
    order depends only on (seed, epoch): the same after any resume, and the same on every DDP rank.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's dataloader calls this at each epoch
        self.epoch = epoch

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


TOTALS_NAME = "run_totals.json"  # per checkpoint: the sums a resume continues (loss, tokens)


class KeepCheckpointedLayers(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from llmhelpers.training.memory import set_checkpointed_layers

        if self.trainer.checkpointed_layers is not None:
            set_checkpointed_layers(self.trainer.model, self.trainer.checkpointed_layers)


class EpochSeededRandomSampler:
    """A random order per epoch drawn from `seed + epoch` (the packed rows' order): the same after any resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ResumableSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with what packed rows and runs that lose nothing need:

    - packed rows (`pack_tokens`) attend per sequence: the document mask of `llmhelpers.training.packing` in every training
      and evaluation step, and the padding to the row's fixed length left out of the token count;
    - the number of layers that recompute their activations (`llmhelpers.training.memory`) kept across the Trainer's
      own switching-on of checkpointing;
    - batches in an order fixed by (seed, epoch), length-grouped or packed rows, so a resume trains on exactly the
      data the uninterrupted run would have (EpochSeededLengthGroupedSampler, EpochSeededRandomSampler);
    - fp32 LoRA weights (TRL casts them to bf16 for a 4-bit base): Adam's small late updates are not rounded
      away, checkpoints hold exactly the weights in memory, and a resume continues from them bit for bit (a bf16
      checkpoint loaded by peft comes back as fp32, so before this a resumed run trained other numbers);
    - the recorded `train_loss` is the mean over every step of the run, a resumed one included, and TRL's
      `num_tokens` counts the whole run's tokens (each checkpoint carries both sums, `run_totals.json`); the
      Trainer's own loss is the mean over one call's steps, and TRL's count restarts or runs on;
    - calling `train` again on the same trainer (a notebook cell re-run after Kernel > Interrupt) starts from the
      state a fresh trainer has: a new optimizer and scheduler over the model's current parameters (the old ones
      would step tensors that loading the checkpoint replaced), no leftover gradients, counters or meters;
    - a checkpoint counts as complete only after all its files and its folder are fsynced and a
      `checkpoint_complete.json` marker is written (then fsynced too).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torch

        for name, param in self.model.named_parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16) \
                    and "lora_magnitude_vector" not in name:
                param.data = param.data.float()
        self._loss_sum_before = 0.0  # the sum of per-step losses of the steps before this call (a resume)
        self._own_optimizer = self.optimizer is None  # built by the trainer, so it can be built again
        self._calls = 0
        # the data settings it was built with (TRL may replace the dataset object): train() checks them
        self.llm_data_key = getattr(kwargs.get("train_dataset"), "llm_data_key", None)
        # how many layers recompute (llmhelpers.training.memory); re-applied at each train start, after the Trainer
        # has switched checkpointing on for every layer
        self.checkpointed_layers: int | None = None
        self.add_callback(KeepCheckpointedLayers(self))
        # steps whose loss was not finite (a device tensor: counted without a sync; StopOnNonFinite reads it)
        self.llm_nonfinite_steps = None
        self.add_callback(StopOnNonFinite(self))
        # packed rows (pack_tokens): each sequence attends only to itself (llmhelpers.training.packing)
        self.packed_mask = PackedMask(self.model) if self.padding_free else None
        # TensorBoard events straight into the run folder: `tensorboard --logdir <output_dir>/runs` lists each run
        # under its name (the default is a runs/<date>_<host> folder inside it)
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = self.args.output_dir

    def create_model_card(self, *args, **kwargs):
        """Nothing: TRL's generic card ("a fine-tuned version of [None]") would sit in the run folder beside the
        project's own (write_model_card, in final/ and merged/)."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        from transformers.trainer_utils import TrainOutput

        if self._calls:
            self._start_afresh()
        self._calls += 1
        totals = run_totals_at(resume_from_checkpoint) if resume_from_checkpoint else {}
        self._loss_sum_before = totals.get("loss_sum", 0.0)
        self._total_train_tokens = totals.get("num_tokens", 0)
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        return TrainOutput(out.global_step, out.metrics.get("train_loss", out.training_loss), out.metrics)

    def _start_afresh(self) -> None:
        """What a second train() call must not inherit from the first (an interrupted one, typically)."""
        from collections import defaultdict

        if not self._own_optimizer:
            raise RuntimeError("this trainer was given its own optimizer, which cannot be rebuilt for a second "
                               "train(): re-run the cell that builds the trainer, then this one")
        self.optimizer = self.lr_scheduler = None
        for stale in ("_optimizers", "_schedulers"):  # accelerate keeps what it prepared; the old ones are dead
            getattr(self.accelerator, stale, []).clear()
        self.model_wrapped = self.model
        self.model.zero_grad(set_to_none=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "reset"):
                callback.reset()

    def training_step(self, model, inputs, *args, **kwargs):
        import torch

        if self.packed_mask is None:
            loss = super().training_step(model, inputs, *args, **kwargs)
        else:
            with self.packed_mask.applied(self.model, inputs):  # forward and backward (checkpoint recomputation too)
                loss = super().training_step(model, inputs, *args, **kwargs)
            # TRL counted the whole row; the padding that makes every row pack_tokens long is not trained on
            padding = torch.tensor(trailing_padding(inputs["position_ids"]), device=inputs["position_ids"].device)
            self._total_train_tokens -= int(self.accelerator.gather_for_metrics(padding).sum().item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int64)
        self.llm_nonfinite_steps = bad if self.llm_nonfinite_steps is None else self.llm_nonfinite_steps + bad
        return loss

    def prediction_step(self, model, inputs, *args, **kwargs):
        if self.packed_mask is None:
            return super().prediction_step(model, inputs, *args, **kwargs)
        with self.packed_mask.applied(self.model, inputs):
            return super().prediction_step(model, inputs, *args, **kwargs)

    def _session_loss_sum(self) -> float:
        """Sum of the per-step losses of this call so far (logged windows plus the window not yet logged)."""
        from transformers.trainer_pt_utils import nested_gather

        pending = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item()
        return self._total_loss_scalar + pending

    def log(self, logs, *args, **kwargs):
        if "train_loss" in logs:  # the end of train(): the whole run's mean, not this call's
            steps = self.state.global_step - self._initial_global_step
            logs["train_loss"] = (self._loss_sum_before + logs["train_loss"] * steps) / max(self.state.global_step, 1)
        return super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        import torch

        sampler = super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if isinstance(sampler, LengthGroupedSampler):
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            return EpochSeededRandomSampler(len(sampler.data_source), seed)
        return sampler

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        loss_sum = self._loss_sum_before + self._session_loss_sum()  # a collective: every rank takes part
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.is_world_process_zero():
            checkpoint = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            (checkpoint / TOTALS_NAME).write_text(json.dumps({
                "global_step": self.state.global_step, "loss_sum": loss_sum,
                "num_tokens": int(getattr(self, "_total_train_tokens", 0))}))
            mark_complete(checkpoint)
        self.accelerator.wait_for_everyone()


def run_totals_at(checkpoint) -> dict:
    """{"loss_sum": sum of the per-step training losses, "num_tokens": tokens trained} up to this checkpoint.
    Checkpoints written before the sums were kept: rebuilt from the log (exact when logging_steps divides the
    checkpoint's step)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / TOTALS_NAME).exists():
        return json.loads((checkpoint / TOTALS_NAME).read_text())
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    total, last, tokens = 0.0, 0, 0
    for row in history:
        if "loss" in row:
            total += row["loss"] * (row["step"] - last)
            last = row["step"]
            tokens = int(row.get("num_tokens", tokens))
    return {"loss_sum": total, "num_tokens": tokens}


def run_callbacks(cfg, model) -> list:
    """The callbacks every run gets: a tokens/s meter (trainer.throughput) and the disk guard; with
    early_stopping_patience, transformers' EarlyStoppingCallback on the eval loss."""
    callbacks = [ThroughputMeter(), DiskGuard(cfg, model)]
    if cfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return callbacks


def build_trainer(cfg, model, tokenizer, data, callbacks=(), **sft_overrides):
    """The notebook's trainer cell in one call (used by the CLI and the tests)."""
    check_ready_to_train(cfg, model, data)
    args = dataclasses.replace(cfg.trainer_args(), **sft_overrides)
    check_optimizer_resumes(args.optim, args.world_size)
    trainer = ResumableSFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=run_callbacks(cfg, model) + list(callbacks),
    )
    return trainer


def throughput_meter(trainer) -> ThroughputMeter | None:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ThroughputMeter)), None)


def check_ready_to_train(cfg, model, data) -> None:
    """Refuse, naming the cell to re-run, when the model or data in memory were built under other settings. The
    earliest stale step is named (model, then data, then LoRA), so one message says where to re-run from."""
    from llmhelpers.model.loading import check_lora_matches, check_model_matches

    check_model_matches(model, cfg)
    check_data_matches(getattr(data, "key", None), cfg)
    check_lora_matches(model, cfg)


def check_optimizer_resumes(optim, world_size: int) -> None:
    """bitsandbytes' paged optimizers train on several GPUs but cannot resume there: the first step after loading
    their state fails ("Error invalid argument ... pythonInterface.cpp", measured on 2 x H200 with
    paged_adamw_8bit; bitsandbytes issues #782 and #1708). Refuse before step 1 rather than after a kill."""
    name = getattr(optim, "value", optim)
    if world_size > 1 and "paged" in str(name):
        raise ValueError(f"SFTConfig optim={name!r} cannot resume a run on {world_size} processes (bitsandbytes' "
                         "paged optimizers fail on the first step after a resume there): use "
                         "optim='adamw_torch_fused' (the recipe's) or a non-paged one such as 'adamw_8bit'.")


def check_data_matches(key, cfg) -> None:
    from llmhelpers.data.sources import data_key

    if key is not None and key != data_key(cfg):
        raise ValueError("the data in memory was built with other data settings (sources, samples, max_example_tokens, "
                         "split or seed) than this config: re-run the data step (build_datasets) and the "
                         "cells after it.")


# --- starting, resuming, finishing ----------------------------------------------------------------------------
RUN_COMPLETE = "run_complete.json"


def start_over(cfg) -> Path | None:
    """Move this run's folder aside (never deleted), so that the next train() starts from step 0."""
    run_dir = cfg.run_dir
    if not run_dir.exists():
        return None
    with RunLock(run_dir):
        aside = run_dir.with_name(f"{run_dir.name}-old-{time.strftime('%Y%m%d-%H%M%S')}")
        (run_dir / RunLock.NAME).unlink(missing_ok=True)
        run_dir.rename(aside)
    from llmhelpers.training.runs import record_run

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
        if not finished(resume) or not (run_dir / CONFIG_NAME).exists():  # a finished run keeps the config it ran
            cfg.save(run_dir / CONFIG_NAME)
        for name, size in set_aside_folders(run_dir):
            print(f"  set aside earlier: {name} ({size / 1e6:.1f} MB); delete it once you no longer need it")
    state.wait_for_everyone()
    if not state.is_main_process:
        resume = choose_resume_checkpoint(run_dir, allow_fresh_optimizer)
    if state.is_main_process:
        if resume is not None and finished(resume):
            pass  # train() says so, and trains nothing
        elif resume is not None:
            info = json.loads((resume / "trainer_state.json").read_text())
            print(f"resuming from {resume} (step {info.get('global_step')} of {info.get('max_steps')})")
        else:
            print(f"starting a new run in {run_dir}")
    return resume


# How messages name the two ways on, in the notebook's words; the CLI puts its own (llmhelpers.cli.CLI_WORDS).
WORDS = {"start over": "run start_over(cfg)", "resume": "re-run the training cell"}


def finished(checkpoint: Path | None) -> bool:
    if checkpoint is None:
        return False
    info = json.loads((checkpoint / "trainer_state.json").read_text())
    return info.get("max_steps", 0) > 0 and info["global_step"] >= info["max_steps"]


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


def _read_json_object(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing, empty or damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _load_finished(trainer, cfg, last: Path):
    """A finished run re-run: its weights (the best checkpoint if kept, else the last) and its state, no step."""
    from transformers.trainer_utils import TrainOutput

    trainer.llm_already_finished = True  # the CLI keeps its folders (llmhelpers.cli.finish_run)
    state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    best = state.best_model_checkpoint
    source = Path(best) if cfg.sft.load_best_model_at_end and best and Path(best).is_dir() else last
    trainer._load_from_checkpoint(str(source))
    trainer.state = state
    done = cfg.run_dir / RUN_COMPLETE
    metrics = _read_json_object(done)
    if metrics is None:  # killed after its last checkpoint, or the file is empty or damaged: complete the records
        metrics = {"global_step": state.global_step,
                   "train_loss": run_totals_at(last)["loss_sum"] / max(state.global_step, 1),
                   "best_eval_loss": state.best_metric, "records_completed_from": last.name}
        if trainer.is_world_process_zero():
            from llmhelpers.training.runs import record_run

            (cfg.run_dir / "log_history.json").write_text(json.dumps(state.log_history, indent=1))
            done.write_text(json.dumps(metrics, indent=1))
            record_run(cfg, status="finished", metrics=metrics)
            print(f"the run's records were incomplete (killed after its last checkpoint?): written from {last.name}")
    print(f"this run already finished at step {state.global_step}: nothing trained; weights loaded from "
          f"{source.name}. To train it again, {WORDS['start over']} first.")
    return TrainOutput(state.global_step, metrics.get("train_loss"), metrics)


class TrainingInterrupted(OneLineError, KeyboardInterrupt):
    """Kernel > Interrupt or Ctrl-C during train(): says what was kept and what to do."""


def interrupt_message(trainer, cfg) -> str:
    kept = last_complete_checkpoint(cfg.run_dir)
    where = f"training interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}"
    if kept is None:
        return (f"{where}: no checkpoint was written yet, so the next train(trainer, cfg) starts this run from "
                f"step 0. To do so, {WORDS['resume']}.")
    return (f"{where}: kept {kept} (step {checkpoint_step(kept)}); {WORDS['resume']} to resume from it exactly (steps "
            f"after {checkpoint_step(kept)} are trained again), or {WORDS['start over']} to start the run over.")


def train(trainer, cfg, allow_fresh_optimizer: bool = False):
    """Resume the run with this config if it has a checkpoint, else start it; a finished run is a no-op.

    Holds the run's lock throughout. Afterwards the main process writes log_history.json (losses per step),
    run_complete.json (final metrics) and the run's line in the runs index.
    """
    from llmhelpers.training.runs import record_run

    if Path(trainer.args.output_dir).resolve() != cfg.run_dir.resolve():
        # name the earliest cell to re-run: a changed model, data or LoRA setting needs more than a new trainer
        from llmhelpers.model.loading import check_lora_matches, check_model_matches

        check_model_matches(trainer.model, cfg)
        check_data_matches(getattr(trainer, "llm_data_key", None), cfg)
        check_lora_matches(trainer.model, cfg)
        raise ValueError(f"this trainer was built for the run in {trainer.args.output_dir}, but cfg is now the run "
                         f"{cfg.run_name}: re-run the step that builds the trainer (ResumableSFTTrainer(args=cfg.trainer_args(), ...)), then this one.")
    main = trainer.is_world_process_zero()
    lock = RunLock(cfg.run_dir) if main else None
    if lock:
        lock.acquire()
    try:
        resume = prepare_run(cfg, allow_fresh_optimizer)
        if finished(resume):
            return _load_finished(trainer, cfg, resume)
        if resume is None:
            reset_adapters(trainer.model, cfg.seed)
        ensure_free_space(cfg.run_dir, int(checkpoint_bytes(trainer.model, cfg) * 1.5), "training")
        if main:
            record_run(cfg, status="training")
        from llmhelpers.training.memory import choose_checkpointed_layers

        decided = choose_checkpointed_layers(trainer, cfg)
        if main:
            print(f"activation checkpointing: {decided['checkpointed_layers']} of {decided['of']} layers recompute "
                  f"({decided['why']}" + (f": {decided['per_layer_gib']} GiB per layer kept, expected peak "
                                          f"{decided['expected_peak_gib']} of {decided['limit_gib']} GiB)"
                                          if decided["why"] == "measured" else ")"))
        trainer.llm_nonfinite_steps = None
        try:
            output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except KeyboardInterrupt:
            raise TrainingInterrupted(interrupt_message(trainer, cfg)) from None  # one line, not 135 of traceback
        except TrainingDiverged as err:
            kept = last_complete_checkpoint(cfg.run_dir)
            message = (f"{err}. Kept {kept or 'no checkpoint'} (written before it); nothing after it is saved. Lower "
                       f"learning_rate or check the data and the settings, then {WORDS['start over']} or resume.")
            if main:
                record_run(cfg, status="failed", error=message)
            raise TrainingDiverged(message) from None
        if main:
            (cfg.run_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
            metrics = {"global_step": output.global_step, **output.metrics,
                       "best_eval_loss": trainer.state.best_metric}
            (cfg.run_dir / RUN_COMPLETE).write_text(json.dumps(metrics, indent=1))
            record_run(cfg, status="finished", metrics=metrics)
        return output
    finally:
        if lock:
            lock.release()


def save_adapters(model, tokenizer, cfg, target: Path | None = None) -> Path:
    """Adapters (safetensors), tokenizer and config JSON in one folder."""
    from llmhelpers.training.runs import record_run

    saved = save_model_folder(model, tokenizer, cfg, Path(target or cfg.final_dir), checkpoint_bytes(model, cfg),
                              "saving the adapters")
    record_run(cfg, adapter_dir=str(saved))
    return saved


def log_history(trainer_or_dir) -> dict[str, list]:
    """{'step', 'loss', 'eval_step', 'eval_loss'} from a trainer or a checkpoint folder."""
    if hasattr(trainer_or_dir, "state"):
        history = trainer_or_dir.state.log_history
    else:
        history = json.loads((Path(trainer_or_dir) / "trainer_state.json").read_text())["log_history"]
    out = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
    for row in history:
        if "loss" in row:
            out["step"].append(row["step"])
            out["loss"].append(row["loss"])
        if "eval_loss" in row:
            out["eval_step"].append(row["step"])
            out["eval_loss"].append(row["eval_loss"])
    return out
