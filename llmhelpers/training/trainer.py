"""The trainer: TRL's SFTTrainer with what packed rows and exact resumes need, and its callbacks.

Training consumes the features from `chat.encode` (input_ids + completion_mask): TRL sees a pre-tokenized dataset
and only turns the mask into labels. The run around the trainer (its lock, the resume choice, the memory policy,
its records) is `llmhelpers.training.run`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTTrainer

from llmhelpers.storage import ensure_free_space
from llmhelpers.training.checkpoints import RUN_COMPLETE, checkpoint_bytes, mark_complete
from llmhelpers.training.packing import PackedMask, trailing_padding_count


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


# The libraries' private members ResumableSFTTrainer overrides, calls or reads, all in this one list; read from
# transformers 5.24 (Trainer) and TRL 1.16 (SFTTrainer). tests/test_training.py checks that each one is still in the
# installed versions' source, so an upgrade that renames one fails there, not in a user's run.
PRIVATE_MEMBERS = {
    ("Trainer", "def _get_train_sampler"): "overridden: the (seed, epoch) samplers",
    ("Trainer", "def _save_checkpoint"): "overridden: the run's sums and the completion marker after its files",
    ("Trainer", "def _load_from_checkpoint"): "called: a finished run's weights",
    ("Trainer", "def _get_output_dir"): "called: the folder _save_checkpoint wrote",
    ("Trainer", "self._tr_loss"): "read: the loss of the steps not yet logged",
    ("Trainer", "self._total_loss_scalar"): "read: the loss of the steps logged",
    ("Trainer", "self._initial_global_step"): "read: the step this train() call started from",
    ("SFTTrainer", "self._total_train_tokens"): "read and set: TRL's num_tokens count",
    ("SFTTrainer", "self._metrics"): "read and reset: TRL's per-mode metric lists",
    ("Accelerator", "self._optimizers"): "cleared: the optimizers accelerate prepared (a second train() call)",
    ("Accelerator", "self._schedulers"): "cleared: likewise the schedulers",
}


class RunTrainer:
    """What every trainer of a run needs, whatever TRL trainer it extends (SFTTrainer, GRPOTrainer):

    - fp32 LoRA weights (TRL casts them to bf16 for a 4-bit base): Adam's small late updates are not rounded
      away, checkpoints hold exactly the weights in memory, and a resume continues from them bit for bit (a bf16
      checkpoint loaded by peft comes back as fp32, so before this a resumed run trained other numbers);
    - it trains only inside its run (`with TrainingRun(trainer, cfg) as run:`), from the checkpoint the run chose; a
      finished run's checkpoint is loaded, weights and state, and nothing is trained;
    - the recorded `train_loss` is the mean over every step of the run, a resumed one included, and TRL's
      `num_tokens` counts the whole run's tokens (each checkpoint carries both sums, `run_totals.json`); the
      Trainer's own loss is the mean over one call's steps, and TRL's count restarts or runs on;
    - calling `train` again on the same trainer (a notebook cell re-run after Kernel > Interrupt) starts from the
      state a fresh trainer has: a new optimizer and scheduler over the model's current parameters (the old ones
      would step tensors that loading the checkpoint replaced), no leftover gradients, counters or meters;
    - a step whose loss is not finite is counted without a sync, and the run stops at the next log or save
      (StopOnNonFinite);
    - between steps the CPU does not wait for the GPU where it need not (batches copied from pinned memory without
      waiting, the parameter count for the FLOP estimate taken once, the packed rows' padding counted on the device):
      it prepares the next step while the GPU finishes this one;
    - a checkpoint counts as complete only after all its files and its folder are fsynced and a
      `checkpoint_complete.json` marker is written (then fsynced too).
    """

    llm_memory_policy = False  # True: TrainingRun chooses the recomputed layers before step 1 (training/memory.py)

    def _init_run(self) -> None:
        import torch

        for name, param in self.model.named_parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16) \
                    and "lora_magnitude_vector" not in name:
                param.data = param.data.float()
        self._loss_sum_before = 0.0  # the sum of per-step losses of the steps before this call (a resume)
        self._own_optimizer = self.optimizer is None  # built by the trainer, so it can be built again
        self._calls = 0
        self.llm_run = None  # the TrainingRun this trainer trains in (llmhelpers.training.run), set by its `with`
        self.llm_last_output = None
        # TRL's trainers each put their own fused LM head on the model's forward (SFT's returns the label mask and
        # token accuracy, GRPO's log-probabilities): the one this trainer installed, put back before it trains
        self._llm_forward = _forward_owner(self.model).__dict__.get("forward")
        # steps whose loss was not finite (a device tensor: counted without a sync; StopOnNonFinite reads it)
        self.llm_nonfinite_steps = None
        # tokens TRL counted that were not trained on (packed rows' padding), on the device until _settle_counts
        self.llm_padding_pending = None
        self._llm_parameter_count = None  # floating_point_ops' count, taken once per train() call
        # batches come from pinned memory (dataloader_pin_memory, on with a GPU): accelerate then copies them to the
        # GPU without first waiting for the GPU's queue to empty (the same values; it waited at every step)
        if self.args.dataloader_pin_memory:
            self.accelerator.dataloader_config.non_blocking = True
        self.add_callback(StopOnNonFinite(self))
        # TensorBoard events straight into the run folder: `tensorboard --logdir <output_dir>/runs` lists each run
        # under its name (the default is a runs/<date>_<host> folder inside it)
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = self.args.output_dir

    def starting_adapters(self, cfg):
        """The saved adapters a run of this trainer starts from at step 0; None: fresh LoRA weights."""
        return None

    def create_model_card(self, *args, **kwargs):
        """Nothing: TRL's generic card ("a fine-tuned version of [None]") would sit in the run folder beside the
        project's own (write_model_card, in final/ and merged/)."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trains inside its run (`with TrainingRun(trainer, cfg) as run:`), from `run.checkpoint`; a finished run's
        checkpoint is loaded, weights and state, and nothing is trained."""
        from transformers.trainer_utils import TrainOutput

        run = self.llm_run
        if run is None:
            raise RuntimeError("train this trainer inside its run, which holds the run's lock, chooses the checkpoint "
                               "and writes the records: `with TrainingRun(trainer, cfg) as run: "
                               "trainer.train(resume_from_checkpoint=run.checkpoint)`")
        if resume_from_checkpoint is True:  # transformers' "the last checkpoint": the run's choice
            resume_from_checkpoint = run.checkpoint
        if str(resume_from_checkpoint or "") != str(run.checkpoint or ""):
            raise ValueError(f"this run continues from {run.checkpoint or 'step 0'} (run.checkpoint), not "
                             f"{resume_from_checkpoint}: pass resume_from_checkpoint=run.checkpoint. To start the "
                             "run over, start_over(cfg) first.")
        if run.finished:
            self.llm_last_output = self._load_finished(Path(run.checkpoint))
            return self.llm_last_output
        if self._calls:
            self._start_afresh()
        self._calls += 1
        owner = _forward_owner(self.model)
        if self._llm_forward is not None and owner.__dict__.get("forward") is not self._llm_forward:
            owner.forward = self._llm_forward  # another trainer (the GRPO section's) was built on this model since
        totals = run_totals_at(resume_from_checkpoint) if resume_from_checkpoint else {}
        self._loss_sum_before = totals.get("loss_sum", 0.0)
        if hasattr(self, "_total_train_tokens"):  # SFTTrainer's count (GRPOTrainer's lives in the trainer state)
            self._total_train_tokens = totals.get("num_tokens", 0)
        self.llm_padding_pending = self._llm_parameter_count = None
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        self.llm_last_output = TrainOutput(out.global_step, out.metrics.get("train_loss", out.training_loss),
                                           out.metrics)
        return self.llm_last_output

    def _load_finished(self, last: Path):
        """A finished run re-run: its weights (the best checkpoint if kept, else the last) and its state, no step.
        Its metrics come from run_complete.json, or from the checkpoint when the run was killed after it (the run
        then completes its records)."""
        from transformers.trainer_utils import TrainOutput

        self.llm_already_finished = True  # the CLI keeps the finished run's folders (llmhelpers.cli.finish_run)
        state = TrainerState.load_from_json(str(last / "trainer_state.json"))
        best = state.best_model_checkpoint
        source = Path(best) if self.args.load_best_model_at_end and best and Path(best).is_dir() else last
        self._load_from_checkpoint(str(source))
        self.state = state
        self.llm_loaded_from = source.name
        metrics = _read_json_object(Path(self.args.output_dir) / RUN_COMPLETE)
        self.llm_records_incomplete = metrics is None
        if metrics is None:
            metrics = {"global_step": state.global_step,
                       "train_loss": run_totals_at(last)["loss_sum"] / max(state.global_step, 1),
                       "best_eval_loss": state.best_metric, "records_completed_from": last.name}
        return TrainOutput(state.global_step, metrics.get("train_loss"), metrics)

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

        loss = self._training_step(model, inputs, *args, **kwargs)
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int64)
        self.llm_nonfinite_steps = bad if self.llm_nonfinite_steps is None else self.llm_nonfinite_steps + bad
        return loss

    def _training_step(self, model, inputs, *args, **kwargs):
        return super().training_step(model, inputs, *args, **kwargs)

    def _session_loss_sum(self) -> float:
        """Sum of the per-step losses of this call so far (logged windows plus the window not yet logged)."""
        from transformers.trainer_pt_utils import nested_gather

        pending = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item()
        return self._total_loss_scalar + pending

    def _settle_counts(self) -> None:
        """Brings counts kept on the device into the Trainer's numbers before they are read (ResumableSFTTrainer)."""

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate (6 x tokens x parameters), with the parameters counted once per train() call:
        transformers walks every module for the count at each step, ~20 ms of CPU per step on the 1.5B model (the
        LoRA wrappers' modules included), time in which the CPU is not feeding the GPU."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._llm_parameter_count is None:
            self._llm_parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._llm_parameter_count

    def log(self, logs, *args, **kwargs):
        self._settle_counts()
        if "train_loss" in logs:  # the end of train(): the whole run's mean, not this call's
            steps = self.state.global_step - self._initial_global_step
            logs["train_loss"] = (self._loss_sum_before + logs["train_loss"] * steps) / max(self.state.global_step, 1)
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self._settle_counts()
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




class ResumableSFTTrainer(RunTrainer, SFTTrainer):
    """TRL's SFTTrainer in a run (RunTrainer), with what packed rows and exact resumes of them need:

    - packed rows (`pack_tokens`) attend per sequence: the document mask of `llmhelpers.training.packing` in every training
      and evaluation step, and the padding to the row's fixed length left out of the token count;
    - the number of layers that recompute their activations (`llmhelpers.training.memory`) kept across the Trainer's
      own switching-on of checkpointing;
    - batches in an order fixed by (seed, epoch), length-grouped or packed rows, so a resume trains on exactly the
      data the uninterrupted run would have (EpochSeededLengthGroupedSampler, EpochSeededRandomSampler).
    """

    llm_memory_policy = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_run()
        # the data settings it was built with (TRL may replace the dataset object): TrainingRun checks them
        self.llm_data_key = getattr(kwargs.get("train_dataset"), "llm_data_key", None)
        # how many layers recompute (llmhelpers.training.memory); re-applied at each train start, after the Trainer
        # has switched checkpointing on for every layer
        self.checkpointed_layers: int | None = None
        self.add_callback(KeepCheckpointedLayers(self))
        # packed rows (pack_tokens): each sequence attends only to itself (llmhelpers.training.packing)
        self.packed_mask = PackedMask(self.model) if self.padding_free else None

    def _training_step(self, model, inputs, *args, **kwargs):
        if self.packed_mask is None:
            return super()._training_step(model, inputs, *args, **kwargs)
        with self.packed_mask.applied(self.model, inputs):  # forward and backward (checkpoint recomputation too)
            loss = super()._training_step(model, inputs, *args, **kwargs)
        # TRL counted the whole row; the padding that makes every row pack_tokens long is not trained on. Added up
        # on the device and taken off TRL's count when the count is read (a log, a checkpoint): reading it here
        # would make the CPU wait for this step's backward, and the GPU then idle while the CPU prepares the next
        # step (bench/profile_train.py --syncs)
        padding = trailing_padding_count(inputs["position_ids"])
        pending = self.llm_padding_pending
        self.llm_padding_pending = padding if pending is None else pending + padding
        return loss

    def _settle_counts(self) -> None:
        """TRL's num_tokens without the padding added up since it was last read. A collective: every rank calls it
        (from log and _save_checkpoint, which every rank runs at the same steps)."""
        pending, self.llm_padding_pending = self.llm_padding_pending, None
        if pending is not None:
            self._total_train_tokens -= int(self.accelerator.gather_for_metrics(pending).sum().item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, *args, **kwargs):
        if self.packed_mask is None:
            return super().prediction_step(model, inputs, *args, **kwargs)
        with self.packed_mask.applied(self.model, inputs):
            return super().prediction_step(model, inputs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        import torch

        sampler = super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if isinstance(sampler, LengthGroupedSampler):
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            return EpochSeededRandomSampler(len(sampler.data_source), seed)
        return sampler


def _forward_owner(model):
    """The module whose forward TRL patches: the base model under peft's wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def _read_json_object(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing, empty or damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    """Refuse, naming the cell to re-run, when the model or data in memory were built under other settings."""
    check_built_with(cfg, model, getattr(data, "key", None))


def check_built_with(cfg, model, data_key) -> None:
    """The model, the data (its key) and the LoRA adapters against cfg. The earliest stale step is named (model, then
    data, then LoRA), so one message says where to re-run from."""
    from llmhelpers.model.loading import check_lora_matches, check_model_matches

    check_model_matches(model, cfg)
    check_data_matches(data_key, cfg)
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
