"""Activation checkpointing chosen by memory: the arithmetic that picks the layers, the per-layer switch, and the same
losses whatever number of layers recompute (checkpointing changes memory, never the numbers)."""

from llmhelpers.training.memory import decoder_layers, layers_that_fit, set_checkpointed_layers
from llmhelpers.config.profiles import make_config

GIB = 2**30


def test_as_few_layers_recompute_as_fit_the_limit():
    # 28 layers; all checkpointed peaks at 10 GiB, each layer kept adds 1 GiB; 2 GiB margin
    assert layers_that_fit(80 * GIB, 10 * GIB, 14 * GIB, 4, 28) == 0  # everything fits: nothing recomputes
    assert layers_that_fit(24 * GIB, 10 * GIB, 14 * GIB, 4, 28) == 16  # 12 GiB of room: 12 layers keep theirs
    assert layers_that_fit(12 * GIB, 10 * GIB, 14 * GIB, 4, 28) == 28  # no room: all recompute
    assert layers_that_fit(8 * GIB, 10 * GIB, 14 * GIB, 4, 28) == 28  # over even with all: all (the run will say)


def test_the_per_layer_switch_and_unchanged_losses(tmp_path, tiny_model_dir, tiny_trainer):
    from llmhelpers.training.run import run_training

    losses = {}
    for n in (2, 1, 0):
        cfg = make_config("smoke", output_dir=str(tmp_path / f"n{n}"), tiny_model_dir=str(tiny_model_dir),
                          max_steps=3, eval_steps=3, save_steps=3, logging_steps=1, accuracy_callback=False,
                          lora_dropout=0.0, checkpoint_layers=n)
        trainer, *_ = tiny_trainer(cfg)
        run_training(trainer, cfg)
        assert [layer.gradient_checkpointing for layer in decoder_layers(trainer.model)] == [i < n for i in range(2)]
        losses[n] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[0] == losses[1] == losses[2]


def test_without_a_gpu_auto_means_every_layer_recomputes(tmp_path, tiny_model_dir, capsys, tiny_trainer):
    from llmhelpers.training.memory import choose_checkpointed_layers

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), accuracy_callback=False)
    trainer, *_ = tiny_trainer(cfg)
    set_checkpointed_layers(trainer.model, 0)
    decided = choose_checkpointed_layers(trainer, cfg)
    assert decided == {"checkpointed_layers": 2, "of": 2, "why": "no GPU to measure: all layers recompute",
                       "dequantized_base_bytes": 0}  # "auto" keeps the dequantized base only on a GPU
    assert all(layer.gradient_checkpointing for layer in decoder_layers(trainer.model))


def test_dequantize_once_on_keeps_the_base_dequantized_and_says_so(tmp_path, tiny_model_dir, tiny_trainer):
    from llmhelpers.model.fused_lora import DENSE_ATTR
    from llmhelpers.training.memory import choose_checkpointed_layers

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), accuracy_callback=False,
                      dequantize_once="on", lora_dropout=0.0)
    trainer, *_ = tiny_trainer(cfg)
    decided = choose_checkpointed_layers(trainer, cfg)
    assert decided["dequantized_base_bytes"] > 0
    assert any(hasattr(m, DENSE_ATTR) for m in trainer.model.modules())
    off = choose_checkpointed_layers(trainer, cfg.replace(dequantize_once="off"))
    assert off["dequantized_base_bytes"] == 0 and not any(hasattr(m, DENSE_ATTR) for m in trainer.model.modules())
    assert cfg.replace(dequantize_once="off").run_name == cfg.run_name  # the same numbers: the same run
