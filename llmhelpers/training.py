"""The trainer, resume-or-start logic, and saving.

Training consumes the features from `chat.encode` (input_ids + completion_mask): TRL sees
a pre-tokenized dataset and only turns the mask into labels. Everything a run writes lives
under `cfg.run_dir` (one folder per training-relevant config), so re-running the cell
resumes the same run, a finished run is not trained again, and a changed hyperparameter
starts its own run beside it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTTrainer

from .environment import free_bytes

CONFIG_NAME = "finetune_config.json"


class DiskSpaceError(RuntimeError):
    """Not enough free disk for the next write; raised before writing, so nothing is half-written."""


def checkpoint_bytes(model, cfg) -> int:
    """Expected size of one checkpoint: adapters (fp32), optimizer state, tokenizer and small files."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = 2 if "8bit" in cfg.optim else 8  # two Adam moments, 1 or 4 bytes each
    return trainable * (4 + optimizer) + 30 * 2**20


def ensure_free_space(path: Path, need: int, what: str) -> None:
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(f"{what} needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at "
                             f"{path}. Free some space (old runs under outputs/*/runs) or set output_dir elsewhere.")


class DiskGuard(TrainerCallback):
    """Before each checkpoint save, checks that one more checkpoint fits (with 50% margin); if not,
    stops with a clear error while the previous checkpoint is still complete."""

    def __init__(self, cfg, model):
        self.cfg, self.need = cfg, int(checkpoint_bytes(model, cfg) * 1.5)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:
            ensure_free_space(self.cfg.run_dir, self.need, f"checkpoint {state.global_step}")


class ThroughputMeter(TrainerCallback):
    """Trained-sequence tokens per second between log events, from TRL's global `num_tokens` count."""

    def __init__(self):
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


class ResumableSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with two changes for runs that lose nothing:

    - length-grouped batches in an order fixed by (seed, epoch), so a resume trains on exactly the data
      the uninterrupted run would have (EpochSeededLengthGroupedSampler);
    - a checkpoint counts as complete only after all its files and its folder are fsynced and a
      `checkpoint_complete.json` marker is written (then fsynced too).
    """

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.is_world_process_zero():
            mark_complete(Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}")
        self.accelerator.wait_for_everyone()


def run_callbacks(cfg, model) -> list:
    """The callbacks every run gets: a tokens/s meter (trainer.throughput) and the disk guard."""
    return [ThroughputMeter(), DiskGuard(cfg, model)]


def build_trainer(cfg, model, tokenizer, data, callbacks=(), **sft_overrides):
    """The notebook's trainer cell in one call (used by the CLI and the tests)."""
    check_ready_to_train(cfg, model, data)
    trainer = ResumableSFTTrainer(
        model=model,
        args=cfg.sft_config(**sft_overrides),
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
    from .data import data_key
    from .modeling import check_lora_matches, check_model_matches

    check_model_matches(model, cfg)
    check_lora_matches(model, cfg)
    if getattr(data, "key", None) is not None and data.key != data_key(cfg):
        raise ValueError("the data in memory was built with other data settings (sources, samples, max_length, "
                         "split or seed) than this config: re-run the data cell (section 4, build_datasets).")


# --- checkpoints: completeness, validation, setting aside ------------------------------------------------
COMPLETE_MARKER = "checkpoint_complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed as it is, and guessing would change the run."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(checkpoint: Path) -> None:
    """fsync every file and folder of the checkpoint, then write the marker (fsynced, renamed into place)."""
    for path in sorted(checkpoint.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(checkpoint)
    tmp = checkpoint / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": sorted(p.name for p in checkpoint.iterdir() if not p.name.startswith("."))}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(checkpoint / COMPLETE_MARKER)
    _fsync_path(checkpoint)


def _safetensors_problem(path: Path) -> str | None:
    """None if the header parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name}: header length {n} does not fit a {size}-byte file"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"{path.name}: unreadable ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name}: truncated ({size} bytes, the header describes {8 + n + max(ends, default=0)})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save files are zip archives: a truncated or garbage file fails the central directory or a CRC."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"{path.name}: unreadable ({err})"
    return f"{path.name}: member {bad} is corrupt" if bad else None


def checkpoint_problem(path: Path) -> tuple[str, str] | None:
    """None for a resumable checkpoint, else (kind, detail) with kind 'incomplete', 'damaged' or
    'no_optimizer_state'."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        return "incomplete", "cut off before it was marked complete"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return "damaged", f"trainer_state.json unreadable ({err})"
    weights = [path / n for n in ("adapter_model.safetensors", "model.safetensors") if (path / n).exists()]
    if not weights:
        return "damaged", "no adapter_model.safetensors"
    problems = [p for p in (_safetensors_problem(w) for w in weights) if p]
    problems += [p for p in (_torch_file_problem(f) for f in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")))
                 if p]
    if problems:
        return "damaged", "; ".join(problems)
    missing = [n for n in ("optimizer.pt", "scheduler.pt") if not (path / n).exists()]
    if missing:
        return "no_optimizer_state", f"{', '.join(missing)} missing"
    return None


def _step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    run_dir = Path(run_dir)
    return sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0), key=_step) \
        if run_dir.is_dir() else []


def is_complete_checkpoint(path: Path) -> bool:
    return checkpoint_problem(path) is None


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint, or None; looks only, never moves anything."""
    return next((p for p in reversed(checkpoints(run_dir)) if checkpoint_problem(p) is None), None)


def set_aside(path: Path, kind: str) -> Path:
    """Rename a checkpoint out of the Trainer's sight (never deleted): kind-checkpoint-N-<time>."""
    aside = path.with_name(f"{kind}-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside


def set_aside_folders(run_dir: Path) -> list[tuple[str, int]]:
    """(name, bytes) of every checkpoint set aside in this run folder, for the run report."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("*-checkpoint-*") if p.is_dir()] if run_dir.is_dir() else []
    return [(p.name, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) for p in sorted(found)]


def choose_resume_checkpoint(run_dir: Path, allow_fresh_optimizer: bool = False) -> Path | None:
    """The newest intact checkpoint. Newer incomplete or damaged ones are set aside, with a message.

    A checkpoint whose optimizer or scheduler state is missing would resume with a fresh optimizer and
    restart the warm-up: that is an error unless allow_fresh_optimizer=True.
    """
    for path in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        kind, detail = problem
        if kind == "no_optimizer_state":
            if allow_fresh_optimizer:
                print(f"resuming {path.name} without its optimizer state ({detail}): allow_fresh_optimizer=True, "
                      "so the optimizer and the learning-rate warm-up start over")
                return path
            raise CheckpointError(
                f"{path} has no optimizer state ({detail}). Resuming would restart the optimizer and the warm-up. "
                "Restore the files, or pass allow_fresh_optimizer=True (--allow-fresh-optimizer) to do it anyway.")
        aside = set_aside(path, kind)
        print(f"checkpoint {path.name} is {kind} ({detail}): moved to {aside.name}; trying the previous one")
    return None


# --- one writer per run folder ----------------------------------------------------------------------------
class RunLockedError(RuntimeError):
    """Another live process is writing this run folder."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a reused pid apart); None where /proc is missing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """A lock file (pid, host, start time) held while a process writes a run folder.

    A second process fails at once with who holds it. A lock left by a dead process on this host is taken
    over, and the takeover is reported. Re-entrant within one process (the notebook kernel, the CLI).
    """

    NAME = "run.lock"
    _held: dict[str, int] = {}

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.took_over: dict | None = None

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _write_new(self) -> bool:
        tmp = self.path.with_name(f".{self.NAME}.{os.getpid()}")
        tmp.write_text(json.dumps(self._mine()))
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lock exists: no half-written lock is ever seen
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def acquire(self) -> "RunLock":
        key = str(self.path.resolve())
        if RunLock._held.get(key):
            RunLock._held[key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._write_new():
            try:
                holder = json.loads(self.path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                break  # left by this process (an interrupted cell): it is ours
            if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                    and not _alive(holder["pid"], holder.get("start")):
                self.took_over = holder
                self.path.unlink(missing_ok=True)
                print(f"took over {self.path}: its process {holder['pid']} (since {holder.get('since')}) is gone")
                continue
            raise RunLockedError(
                f"another process is writing this run: {self.path} is held by pid {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('since')}. Wait for it, stop it, or use another output_dir. "
                "If that process is gone (another machine, a crash), delete the lock file.")
        RunLock._held[key] = 1
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        RunLock._held[key] = RunLock._held.get(key, 1) - 1
        if RunLock._held[key] <= 0:
            RunLock._held.pop(key, None)
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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
    from .runs import record_run

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
        cfg.save(run_dir / CONFIG_NAME)
        resume = choose_resume_checkpoint(run_dir, allow_fresh_optimizer)
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


def _load_finished(trainer, cfg, last: Path):
    """A finished run re-run: its weights (the best checkpoint if kept, else the last) and its state, no step."""
    from transformers.trainer_utils import TrainOutput

    state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    best = state.best_model_checkpoint
    source = Path(best) if cfg.load_best_model_at_end and best and Path(best).is_dir() else last
    trainer._load_from_checkpoint(str(source))
    trainer.state = state
    done = cfg.run_dir / RUN_COMPLETE
    metrics = json.loads(done.read_text()) if done.exists() else {
        "global_step": state.global_step,
        "train_loss": next((r["train_loss"] for r in reversed(state.log_history) if "train_loss" in r), None)}
    print(f"this run already finished at step {state.global_step}: nothing trained; weights loaded from "
          f"{source.name}. To train it again, run start_over(cfg) first.")
    return TrainOutput(state.global_step, metrics.get("train_loss"), metrics)


def train(trainer, cfg, allow_fresh_optimizer: bool = False):
    """Resume the run with this config if it has a checkpoint, else start it; a finished run is a no-op.

    Holds the run's lock throughout. Afterwards the main process writes log_history.json (losses per step),
    run_complete.json (final metrics) and the run's line in the runs index.
    """
    from .runs import record_run

    if Path(trainer.args.output_dir).resolve() != cfg.run_dir.resolve():
        raise ValueError(f"this trainer was built for the run in {trainer.args.output_dir}, but cfg is now the run "
                         f"{cfg.run_name}: re-run the cell that builds the trainer (section 6), then this one.")
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
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
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


def atomic_save(save_fn, target: Path) -> Path:
    """Write into a temporary sibling folder, then rename: a cut-off save never looks complete."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_fn(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    return target


def save_adapters(model, tokenizer, cfg, target: Path | None = None) -> Path:
    """Adapters (safetensors), tokenizer and config JSON in one folder."""
    def write(folder: Path):
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        cfg.save(folder / CONFIG_NAME)

    from .runs import record_run

    target = Path(target or cfg.final_dir)
    ensure_free_space(target.parent, checkpoint_bytes(model, cfg), "saving the adapters")
    saved = atomic_save(write, target)
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
