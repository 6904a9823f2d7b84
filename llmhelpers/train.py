"""Headless training: the notebook's cells in order, for `python -m llmhelpers.train` and
`accelerate launch -m llmhelpers.train` (one process per GPU, DDP).

    python -m llmhelpers.train --profile smoke
    accelerate launch -m llmhelpers.train --config cfg.json --set learning_rate=1e-4

Each process loads its own 4-bit model on its own device; the Trainer shards the data per
process; only the main process writes checkpoints, adapters, logs and evaluation files.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import FinetuneConfig, make_config, parse_override


def build_config(args) -> FinetuneConfig:
    overrides = dict(parse_override(s) for s in args.set)
    if args.config:
        base = FinetuneConfig.load(args.config)
        return FinetuneConfig(**{**base.to_dict(), **overrides})
    return make_config(args.profile, **overrides)


def run(cfg: FinetuneConfig, fresh: bool = False, evaluate_after: bool = False) -> dict:
    from .data import build_datasets, load_examples
    from .environment import check_device_support
    from .evaluation import AccuracyCallback, comparison_table, evaluate_base_and_finetuned, evaluation_set
    from .modeling import attach_lora, load_base_model, load_tokenizer, trainable_parameters
    from .training import build_trainer, save_adapters, train

    check_device_support(cfg)
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
    output = train(trainer, cfg, fresh=fresh)
    result = {"rank": trainer.args.process_index, "world_size": trainer.args.world_size,
              "global_step": output.global_step, "train_loss": output.training_loss,
              "sequences_seen_by_this_rank": trainer.args.per_device_train_batch_size
              * trainer.args.gradient_accumulation_steps * output.global_step,
              "tokens_per_second": trainer.throughput.steady(), "run_dir": str(cfg.checkpoints_dir)}
    if main:
        result["adapter_dir"] = str(save_adapters(trainer.model, tokenizer, cfg))
        if evaluate_after:
            examples = evaluation_set(data, cfg)
            base, tuned = evaluate_base_and_finetuned(cfg, tokenizer, examples, model=trainer.model)
            print(comparison_table([base, tuned]))
            result["accuracy"] = {"base": base.accuracy, "finetuned": tuned.accuracy}
    trainer.accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmhelpers.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", help="full (default) or smoke")
    parser.add_argument("--config", help="a JSON file written by FinetuneConfig.save (overrides --profile)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    parser.add_argument("--fresh", action="store_true", help="start over: move this run's checkpoints aside")
    parser.add_argument("--evaluate", action="store_true", help="grade base vs fine-tuned answers afterwards")
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
        from .environment import check_device_support

        check_device_support(cfg)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    result = run(cfg, fresh=args.fresh, evaluate_after=args.evaluate)
    # One write per line: with several processes on one pipe, print's separate newline can interleave.
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
