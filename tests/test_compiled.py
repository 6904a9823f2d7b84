"""compile_layers (issue #31, lever 2): each decoder layer compiled for the training steps trains the same weights as
the eager layers (float rounding apart), keeps the same run, and is undone when training stops."""
import pytest
import torch

from llmhelpers.config.profiles import make_config
from llmhelpers.training.memory import decoder_layers
from llmhelpers.training.run import run_training

pytestmark = pytest.mark.slow  # torch.compile on the CPU: about half a minute


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_train_what_the_eager_layers_train_and_are_undone_after(tmp_path, tiny_model_dir,
                                                                                tiny_trainer, capsys):
    def train(compiled: bool):
        cfg = make_config("smoke", output_dir=str(tmp_path / f"out-{compiled}"), tiny_model_dir=str(tiny_model_dir),
                          accuracy_callback=False, max_steps=3, eval_steps=3, save_steps=3, lora_dropout=0.0,
                          compile_layers=compiled)
        trainer = tiny_trainer(cfg)[0]
        out = run_training(trainer, cfg)
        assert not any(getattr(layer, "_compiled_call_impl", None) for layer in decoder_layers(trainer.model))
        return cfg, out, lora_weights(trainer.model)

    eager_cfg, eager, eager_weights = train(False)
    compiled_cfg, compiled, compiled_weights = train(True)
    assert "decoder layers compiled for training" in capsys.readouterr().out
    assert compiled_cfg.run_name == eager_cfg.run_name  # a speed setting: the same run
    assert compiled.training_loss == pytest.approx(eager.training_loss, rel=1e-4)
    # Adam moves a weight by up to about the learning rate per step whatever its gradient's size, so float rounding
    # in a near-zero gradient shows as a difference of a fraction of that; 1% of one step's move is the bound
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-4, atol=0.01 * eager_cfg.sft.learning_rate)
