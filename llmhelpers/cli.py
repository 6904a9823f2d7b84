"""Headless training: the notebook's steps in order, for `python -m llmhelpers` and
`accelerate launch -m llmhelpers` (one process per GPU, DDP).

    python -m llmhelpers --profile smoke
    accelerate launch --config_file configs/accelerate_ddp.yaml -m llmhelpers --profile full --learning_rate 1e-4

Every setting is a flag of its own name: SFTConfig's (--learning_rate, --report_to wandb, --max_steps), LoraConfig's
(--r, --use_dora true, --use_rslora true), BitsAndBytesConfig's (--bnb_4bit_quant_type) and the project's
(--math_samples, --eval_set math500); defaults come from configs/<profile>.yaml, or from --config (a saved config).

Each process loads its own 4-bit model on its own device; the Trainer shards the data per
process; only the main process writes checkpoints, adapters, logs and evaluation files, and it
holds the run folder's lock for the whole run. Re-running a finished run trains nothing and
reports its metrics.
"""
from __future__ import annotations

import json
import os
import sys

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
    from llmhelpers.evaluation.protocol import AccuracyCallback, comparison_table, evaluate_base_and_finetuned, evaluation_set
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer, trainable_parameters
    from llmhelpers.training.trainer import build_trainer, save_adapters, throughput_meter, train

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
    output = train(trainer, cfg, allow_fresh_optimizer=allow_fresh_optimizer)
    result = {"rank": trainer.args.process_index, "world_size": trainer.args.world_size,
              "global_step": output.global_step, "train_loss": output.training_loss,
              "micro_batches_seen_by_this_rank": trainer.args.gradient_accumulation_steps * output.global_step,
              "sequences_per_micro_batch": "packed" if cfg.pack_tokens else trainer.args.per_device_train_batch_size,
              "tokens_per_second": throughput_meter(trainer).steady(), "run_dir": str(cfg.run_dir)}
    if main:
        adapter_dir = save_adapters(trainer.model, tokenizer, cfg)
        result["adapter_dir"] = str(adapter_dir)
        if evaluate_after:
            examples = evaluation_set(data, cfg)
            results = evaluate_base_and_finetuned(cfg, tokenizer, examples, model=trainer.model,
                                                  adapter_dir=adapter_dir)
            print(comparison_table(results))
            result["accuracy"] = {r.label: r.accuracy for r in results}
    trainer.accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv, prog="llmhelpers", description=__doc__)
    try:
        from llmhelpers.environment import preflight

        preflight(cfg)  # the GPU the config needs and a writable output_dir, before anything loads
    except (ValueError, TypeError) as err:
        sys.stderr.write(f"llmhelpers: error: {err}\n")
        raise SystemExit(2) from None
    if args.fresh and _launcher_rank() == 0:
        from llmhelpers.training.trainer import start_over

        start_over(cfg)  # the other ranks only read the run folder after the trainer's first barrier
    from llmhelpers.data.sources import DataError
    from llmhelpers.training.checkpoints import CheckpointError, DiskSpaceError
    from llmhelpers.training.run_lock import RunLockedError
    from llmhelpers.training.trainer import TrainingDiverged, TrainingInterrupted

    try:
        result = run(cfg, evaluate_after=args.evaluate, allow_fresh_optimizer=args.allow_fresh_optimizer)
    except (DataError, RunLockedError, CheckpointError, DiskSpaceError, FileNotFoundError, TrainingDiverged) as err:
        sys.stderr.write(f"llmhelpers: error: {err}\n")  # a clear message, not a traceback
        return 1
    except TrainingInterrupted as err:
        sys.stderr.write(f"llmhelpers: {str(err).replace('re-run the training cell', 're-run this command')}\n")
        return 130
    # One write per line: with several processes on one pipe, print's separate newline can interleave.
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0
