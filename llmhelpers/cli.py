"""Headless training: the notebook's steps in order, for `python -m llmhelpers` and
`accelerate launch -m llmhelpers` (one process per GPU, DDP).

    python -m llmhelpers --profile smoke
    accelerate launch --config_file configs/accelerate_ddp.yaml -m llmhelpers --profile full --learning_rate 1e-4

Every setting is a flag of its own name: SFTConfig's (--learning_rate, --report_to wandb, --max_steps), LoraConfig's
(--r, --use_dora true, --use_rslora true), BitsAndBytesConfig's (--bnb_4bit_quant_type) and the project's
(--math_samples, --eval_set math500); defaults come from configs/<profile>.yaml, or from --config (a saved config).

Each process loads its own 4-bit model on its own device; the Trainer shards the data per
process; only the main process writes checkpoints, adapters, logs and evaluation files, and it
holds the run folder's lock for the whole run. After training it does what the notebook's later
cells do, as the settings ask: the adapters with the project's model card, --evaluate, the merge
(--merge_after_training true), the GGUF (--gguf_outtype), the push (--hub_repo_id). Re-running a
finished run trains nothing, reports its metrics and keeps every folder it wrote (only missing
ones are written).
"""
from __future__ import annotations

import json
import os
import sys
import time

from llmhelpers.config.arguments import parse
from llmhelpers.config.project import FinetuneConfig


def _launcher_rank() -> int:
    """This process's rank as accelerate/torchrun set it; 0 for a plain `python -m` run. Read from the
    environment because the process group does not exist yet when the lock must be taken."""
    return int(os.environ.get("RANK", "0"))


def run(cfg: FinetuneConfig, evaluate_after: bool = False, allow_fresh_optimizer: bool = False) -> dict:
    from llmhelpers.training.run_lock import RunLock

    if _launcher_rank() != 0:
        return _run(cfg, evaluate_after, allow_fresh_optimizer)
    with RunLock(cfg.run_dir):  # one writer per run folder, from the first read to the last write
        return _run(cfg, evaluate_after, allow_fresh_optimizer)


def _run(cfg: FinetuneConfig, evaluate_after: bool, allow_fresh_optimizer: bool) -> dict:
    from llmhelpers.data.sources import build_datasets, load_examples
    from llmhelpers.evaluation.protocol import AccuracyCallback, evaluation_set
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer, trainable_parameters
    from llmhelpers.training.run import run_training
    from llmhelpers.training.trainer import build_trainer, throughput_meter

    started = time.perf_counter()
    loaded = load_examples(cfg)  # bad data fails here, before the tokenizer and model are loaded
    tokenizer = load_tokenizer(cfg)
    data = build_datasets(cfg, tokenizer, loaded)
    model = attach_lora(load_base_model(cfg), cfg)
    trainer = build_trainer(cfg, model, tokenizer, data)
    main = trainer.is_world_process_zero()
    if main:
        print(data.report)
        print(trainable_parameters(model))
    if cfg.accuracy_callback:
        AccuracyCallback(evaluation_set(data, cfg), tokenizer, cfg).attach(trainer)
    seconds = {"loading": time.perf_counter() - started}  # each phase's wall time: where a run's time went
    started = time.perf_counter()
    output = run_training(trainer, cfg, allow_fresh_optimizer=allow_fresh_optimizer)
    seconds["training"] = time.perf_counter() - started
    result = {"rank": trainer.args.process_index, "world_size": trainer.args.world_size,
              "global_step": output.global_step, "train_loss": output.training_loss,
              "micro_batches_seen_by_this_rank": trainer.args.gradient_accumulation_steps * output.global_step,
              "sequences_per_micro_batch": "packed" if cfg.pack_tokens else trainer.args.per_device_train_batch_size,
              "tokens_per_second": throughput_meter(trainer).steady(), "run_dir": str(cfg.run_dir)}
    if main:
        result.update(finish_run(cfg, trainer, tokenizer, data, evaluate_after, seconds))
        print("time by phase: " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))
    result["seconds"] = {name: round(value, 1) for name, value in seconds.items()}
    trainer.accelerator.wait_for_everyone()
    return result


class MergeCheckFailed(RuntimeError):
    pass


def finish_run(cfg: FinetuneConfig, trainer, tokenizer, data, evaluate_after: bool, seconds: dict) -> dict:
    """The notebook's steps after training, as the settings ask: the adapters with the project's model card, the
    evaluation (--evaluate), the merge (merge_after_training), the GGUF and its Modelfile (gguf_outtype), the push
    (hub_repo_id). A run that had already finished keeps every folder and file it has: only what is missing is
    written, so re-running a command never replaces a finished run's weights or cards."""
    from llmhelpers.data.chat import render_prompt
    from llmhelpers.data.sources import demo_examples
    from llmhelpers.evaluation.protocol import comparison_table, evaluate_base_and_finetuned, evaluation_set
    from llmhelpers.export.gguf import export_gguf, verify_gguf, write_modelfile
    from llmhelpers.export.model_card import push_to_hub, write_model_card
    from llmhelpers.model.merging import merge_adapters
    from llmhelpers.training.run import save_adapters

    finished_before = getattr(trainer, "llm_already_finished", False)
    written, result = set(), {}
    started = time.perf_counter()  # each phase's wall time goes into `seconds`, the caller's

    def phase(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - started
        started = now

    def kept(path) -> bool:
        if finished_before and path.exists():
            print(f"kept {path} (written when this run finished; start over with --fresh to replace it)")
            return True
        return False

    adapter_dir = cfg.final_dir
    if not kept(adapter_dir):
        adapter_dir = save_adapters(trainer.model, tokenizer, cfg)
        written.add(adapter_dir)
    result["adapter_dir"] = str(adapter_dir)
    phase("saving")
    results = None
    if evaluate_after:
        results = evaluate_base_and_finetuned(cfg, tokenizer, evaluation_set(data, cfg), model=trainer.model,
                                              adapter_dir=adapter_dir)
        print(comparison_table(results))
        result["accuracy"] = {r.label: r.accuracy for r in results}
        phase("evaluation")
    if cfg.merge_after_training and not kept(cfg.merged_dir):
        prompts = [render_prompt(e, tokenizer) for e in demo_examples()]
        check = merge_adapters(cfg, tokenizer, prompts, adapter_dir)
        print(check)
        written.add(cfg.merged_dir)
        if not check["ok"]:
            raise MergeCheckFailed(f"the merged model's logits differ from base + adapters beyond the tolerance "
                                   f"({check['mean_abs_diff']:.3g} > {check['tolerance']:g}); {cfg.merged_dir} "
                                   "should not be used")
        result["merged_dir"] = check["path"]
        phase("merge")
    for folder, kind in ((adapter_dir, "adapters"), (cfg.merged_dir, "merged")):
        if folder in written:
            print(write_model_card(folder, cfg, kind, data.report, results))
    phase("saving")
    gguf_file = cfg.run_dir / "gguf" / "model.gguf"
    if cfg.gguf_outtype and cfg.merged_dir.exists() and (cfg.merged_dir in written or not kept(gguf_file)):
        export_gguf(cfg.merged_dir, gguf_file, cfg.gguf_outtype, overwrite=True)
        print(verify_gguf(gguf_file, cfg.merged_dir), write_modelfile(gguf_file), sep="\n")
        result["gguf"] = str(gguf_file)
        phase("gguf")
    elif cfg.gguf_outtype and not cfg.merged_dir.exists():
        print("no GGUF: it is exported from the merged model; add --merge_after_training true")
    if cfg.hub_repo_id:
        print(push_to_hub(adapter_dir, cfg.hub_repo_id, private=cfg.hub_private))
        phase("upload")
    return result


CLI_WORDS = {"start over": "re-run this command with --fresh", "resume": "re-run this command"}


def main(argv: list[str] | None = None) -> int:
    from llmhelpers.training import run as run_module

    notebook_words = dict(run_module.WORDS)
    run_module.WORDS.update(CLI_WORDS)  # the messages name this command's flags, not the notebook's cells
    try:
        return _main(argv)
    finally:
        run_module.WORDS.update(notebook_words)  # main() called in a notebook's or test's process


def _main(argv: list[str] | None) -> int:
    args, cfg = parse(argv, prog="llmhelpers", description=__doc__)
    try:
        from llmhelpers.environment import preflight

        preflight(cfg)  # the GPU the config needs and a writable output_dir, before anything loads
    except (ValueError, TypeError) as err:
        sys.stderr.write(f"llmhelpers: error: {err}\n")
        raise SystemExit(2) from None
    if args.fresh and _launcher_rank() == 0:
        from llmhelpers.training.run import start_over

        start_over(cfg)  # the other ranks only read the run folder after the trainer's first barrier
    from llmhelpers.data.sources import DataError
    from llmhelpers.storage import DiskSpaceError
    from llmhelpers.training.checkpoints import CheckpointError
    from llmhelpers.training.run_lock import RunLockedError
    from llmhelpers.training.run import TrainingInterrupted
    from llmhelpers.training.trainer import TrainingDiverged

    try:
        result = run(cfg, evaluate_after=args.evaluate, allow_fresh_optimizer=args.allow_fresh_optimizer)
    except (DataError, RunLockedError, CheckpointError, DiskSpaceError, FileNotFoundError, TrainingDiverged,
            MergeCheckFailed) as err:
        sys.stderr.write(f"llmhelpers: error: {err}\n")  # a clear message, not a traceback
        return 1
    except TrainingInterrupted as err:
        sys.stderr.write(f"llmhelpers: {err}\n")
        return 130
    # One write per line: with several processes on one pipe, print's separate newline can interleave.
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0
