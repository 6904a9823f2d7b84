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


def test_after_the_memory_probe_the_training_steps_compile_nothing(tiny_model_dir, tiny_trainer, tmp_path,
                                                                    monkeypatch):
    """With compiled layers the probe's steps compile the graphs training runs (its worst packed row collated as
    training's rows are, then a row of other sizes: the graph for any sizes), so what it measures is what trains and
    the training steps after it compile no new graph (until 2026-12-04 they compiled two: other kwargs, then sizes)."""
    import torch._dynamo
    import transformers
    from torch._dynamo.utils import counters

    from llmhelpers.training import memory
    from llmhelpers.training.compiled import compile_layers

    torch._dynamo.reset()
    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir),
                      accuracy_callback=False, max_steps=4, eval_steps=100, save_steps=100, lora_dropout=0.0,
                      compile_layers=True, packing=True, max_length=2048, pad_to_multiple_of=2048,
                      per_device_train_batch_size=1)
    trainer = tiny_trainer(cfg)[0]
    n = compile_layers(trainer.model)
    for name in ("synchronize", "reset_peak_memory_stats"):  # the probe's CUDA counters, absent on the CPU
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    batch, warmup = memory.probe_batches(trainer, cfg)
    assert len(warmup) == 2
    trainer.model.train()
    memory._probe(trainer, batch, n, warmup)  # every layer recomputing, then none (2 layers < PROBE_LAYERS)
    probed = counters["frames"]["total"]
    assert probed >= 2  # what the probe compiled

    compiled_by_step = []

    class Count(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            compiled_by_step.append(counters["frames"]["total"] - probed)

    trainer.add_callback(Count())
    run_training(trainer, cfg)  # on the CPU the policy has every layer recompute: a configuration the probe ran
    assert compiled_by_step == [0, 0, 0, 0]
