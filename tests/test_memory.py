"""Activation checkpointing chosen by memory: the arithmetic that picks the layers, the per-layer switch, and the same
losses whatever number of layers recompute (checkpointing changes memory, never the numbers)."""

import pytest

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


def test_the_probe_measures_compiled_layers_and_a_failed_policy_leaves_them_eager(tmp_path, tiny_model_dir,
                                                                                   tiny_trainer, monkeypatch):
    # compiled layers keep less per layer than eager ones (~0.7 GiB at rows of 16,384 on an H200, 2026-12-04), so the
    # policy has to probe the layers as they will train; nothing is traced here (compile is lazy, the probe raises)
    from llmhelpers.training import memory
    from llmhelpers.training.run import TrainingRun

    seen = []

    def probe(trainer, cfg):
        seen.append([getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(trainer.model)])
        raise RuntimeError("does not fit")

    monkeypatch.setattr(memory, "choose_checkpointed_layers", probe)
    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), accuracy_callback=False,
                      compile_layers=True)
    trainer, *_ = tiny_trainer(cfg)
    try:
        with TrainingRun(trainer, cfg):
            raise AssertionError("the policy's error should stop the run before training")
    except RuntimeError as err:
        assert "does not fit" in str(err)
    assert seen == [[True, True]]
    assert not any(getattr(layer, "_compiled_call_impl", None) for layer in decoder_layers(trainer.model))


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


def test_each_run_sets_its_own_memory_cap_so_a_smaller_earlier_one_does_not_hold(monkeypatch):
    """A notebook cell re-run without memory_limit_gib after a run with one (or the next card of a size sweep in one
    process) must not be held to the old cap: torch's per-process fraction outlives the run that set it."""
    import torch

    from llmhelpers.training.memory import cap_memory

    total = 140 * GIB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": total}))
    fractions = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: fractions.append(f))
    assert cap_memory(make_config("smoke", memory_limit_gib=13.0), "cuda") == 13 * GIB
    assert cap_memory(make_config("smoke", memory_limit_gib=0.0), "cuda") == total
    assert cap_memory(make_config("smoke", memory_limit_gib=200.0), "cuda") == total  # never over the card
    assert fractions == [13 / 140, 1.0, 1.0]


def test_a_probe_step_over_the_cap_means_every_layer_recomputes_or_nothing_fits(monkeypatch):
    import torch

    from llmhelpers.training import memory

    class Model:
        def zero_grad(self, set_to_none):
            self.zeroed = set_to_none

    trainer = type("T", (), {"model": Model()})()
    monkeypatch.setattr(memory, "set_checkpointed_layers", lambda model, n: n)
    peaks = iter([10 * GIB, torch.OutOfMemoryError("probe")])

    def step(trainer, batch):
        peak = next(peaks)
        if isinstance(peak, Exception):
            raise peak
        return peak

    monkeypatch.setattr(memory, "_peak_of_step", step)
    peak_all, peak_probe = memory._probe(trainer, {}, 28)
    assert (peak_all, peak_probe) == (10 * GIB, float("inf")) and trainer.model.zeroed
    assert layers_that_fit(24 * GIB, peak_all, peak_probe, 4, 28) == 28  # no layer known to fit: all recompute
    peaks = iter([torch.OutOfMemoryError("probe")])
    assert memory._probe(trainer, {}, 28) is None  # over even with all recomputing: drop the dense base, or say so


def test_the_probe_measures_each_configuration_after_its_warm_up_steps(monkeypatch):
    """Compiled layers: a graph's first calls compile and autotune, and training's second batch compiles a graph for
    any sizes (so training's steps compile nothing after the probe; the overcount on an H200 was autocast's). The
    probe runs the warm-up batches before each measured step and counts only the measured one."""
    from llmhelpers.training import memory

    class Model:
        def zero_grad(self, set_to_none):
            pass

    trainer = type("T", (), {"model": Model()})()
    checkpointed, calls = [], []
    monkeypatch.setattr(memory, "set_checkpointed_layers", lambda model, n: checkpointed.append(n))
    peaks = {"worst": iter([10 * GIB, 11 * GIB]), "first": iter([12 * GIB, 20 * GIB]), "half": iter([9 * GIB] * 2)}

    def step(trainer, batch):
        calls.append((checkpointed[-1], batch["name"]))
        return next(peaks[batch["name"]])

    monkeypatch.setattr(memory, "_peak_of_step", step)
    worst = {"name": "worst"}
    assert memory._probe(trainer, worst, 28, warmup=({"name": "first"}, {"name": "half"})) == (10 * GIB, 11 * GIB)
    assert calls == [(28, "first"), (28, "half"), (28, "worst"), (24, "first"), (24, "half"), (24, "worst")]
    calls.clear()
    peaks["worst"] = iter([10 * GIB, 11 * GIB])
    assert memory._probe(trainer, worst, 28) == (10 * GIB, 11 * GIB) and len(calls) == 2  # eager: one step each


def test_the_worst_packed_batch_is_collated_as_training_batches_are(tiny_trainer):
    """The probe's worst batch goes through the trainer's collator: it carries what training batches carry (the
    sequences' boundaries and longest length as well as position ids), every token after a sequence's first trained;
    the half-length variant (the compiled layers' warm-up) differs in both."""
    from llmhelpers.training.memory import worst_batch

    trainer, cfg, _, _ = tiny_trainer(packing=True, max_length=2048, pad_to_multiple_of=2048,
                                      per_device_train_batch_size=1)
    training = trainer.data_collator([trainer.train_dataset[0]])
    worst = worst_batch(trainer, cfg)
    assert set(worst) == set(training) and worst["input_ids"].shape == (1, cfg.pack_tokens)
    longest = cfg.max_example_tokens
    starts = list(range(0, cfg.pack_tokens, longest))
    assert worst["cu_seq_lens_q"].tolist() == starts + [cfg.pack_tokens] and worst["max_length_q"] == longest
    assert worst["position_ids"][0, :longest + 1].tolist() == list(range(longest)) + [0]
    assert (worst["labels"] == -100).sum().item() == len(starts)  # each sequence's first token only
    half = worst_batch(trainer, cfg, longest=longest // 2)
    assert len(half["cu_seq_lens_q"]) == 2 * len(starts) + 1 and half["max_length_q"] == longest // 2


def test_the_dense_base_is_counted_before_it_is_made_and_kept_only_where_it_fits(tmp_path, tiny_model_dir,
                                                                                  tiny_trainer):
    from llmhelpers.model.fused_lora import dense_base_bytes, keep_dense_base
    from llmhelpers.training.memory import MARGIN_GIB, dense_fits

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), accuracy_callback=False)
    trainer, *_ = tiny_trainer(cfg)
    counted = dense_base_bytes(trainer.model)
    assert counted > 0 and keep_dense_base(trainer.model, True) == counted
    keep_dense_base(trainer.model, False)
    # a 7B base in bf16 (~13 GiB) beside its 4-bit model (~5.5 GiB) on a 16 GB card's 13 GiB: not kept
    assert not dense_fits(5.5 * GIB, 13 * GIB, 13 * GIB) and dense_fits(5.5 * GIB, 13 * GIB, 21 * GIB)
    assert not dense_fits(0, 11.5 * GIB, 13 * GIB) and dense_fits(0, 11 * GIB, 11 * GIB + MARGIN_GIB * GIB)


def test_a_batch_that_does_not_fit_is_answered_with_the_settings_to_change():
    """The memory policy's error named `pack_tokens`, which no cell sets: it names the SFTConfig's own settings, half
    the micro-batch with twice the accumulation (the guide's recipe for a 16 GB card)."""
    from llmhelpers.config.profiles import make_config
    from llmhelpers.training.memory import smaller_batch_advice

    advice = smaller_batch_advice(make_config("full"))
    assert "max_length=8192, pad_to_multiple_of=8192, gradient_accumulation_steps=2" in advice
    assert "16,384 tokens per step" in advice
    padded = make_config("full", packing=False, max_length=2048, pad_to_multiple_of=None,
                         per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert "per_device_train_batch_size=4, gradient_accumulation_steps=4" in smaller_batch_advice(padded)
    tight = make_config("full", max_length=2048, pad_to_multiple_of=2048)  # rows already at max_example_tokens
    assert "max_example_tokens (now 2048)" in smaller_batch_advice(tight)


def test_the_probe_steps_run_the_forward_under_the_autocast_training_runs_under():
    """accelerate wraps the model's forward in autocast when training starts, after the probe; without the same
    wrapping the probe's fused LoRA nodes saved fp32 copies of their inputs (the adapters' dtype), and compiled
    layers compiled for the wrong autocast state. The wrapping is undone after the probe, and left out where the
    model is prepared already or the run has no mixed precision."""
    import contextlib

    import torch

    from llmhelpers.training.memory import forward_as_training_runs_it

    seen = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return self.linear(x)

    class Accelerator:
        native_amp = True

        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

    trainer = type("T", (), {"model": Model(), "accelerator": Accelerator()})()
    x = torch.ones(2, 4)
    with forward_as_training_runs_it(trainer):
        out = trainer.model(x)
    assert seen == [True] and out.dtype == torch.float32  # autocast inside, outputs in fp32 as accelerate gives them
    assert "forward" not in vars(trainer.model) and trainer.model(x).dtype == torch.float32 and seen[-1] is False
    trainer.accelerator.native_amp = False
    with forward_as_training_runs_it(trainer):
        trainer.model(x)
    assert seen[-1] is False  # no mixed precision: the forward as it is
    trainer.accelerator.native_amp, trainer.model._is_accelerate_prepared = True, True
    trainer.model.forward = wrapped = contextlib.nullcontext  # a prepared model's own wrapper stays
    with forward_as_training_runs_it(trainer):
        assert trainer.model.forward is wrapped
    assert trainer.model.forward is wrapped


def test_the_policy_runs_its_probe_under_that_autocast_and_undoes_it(monkeypatch):
    """`_choose` itself (its CUDA calls replaced): the probe's model calls run under training's autocast, and the model
    has its own forward again afterwards, also where the probe fails."""
    import torch

    from llmhelpers.training import memory

    seen = []

    class Accelerator:
        native_amp = True

        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

    class Model(torch.nn.Linear):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)

    model = Model(4, 4)
    trainer = type("T", (), {"model": model, "accelerator": Accelerator(), "_total_train_tokens": 0, "_metrics": {},
                             "args": type("A", (), {"device": "cpu"})()})()
    cfg = make_config("smoke", checkpoint_layers=-1)
    for name, value in {"is_available": lambda: True, "get_rng_state_all": lambda: [],
                        "set_rng_state_all": lambda states: None, "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(memory, "cap_memory", lambda cfg, device: 30 * GIB)
    monkeypatch.setattr(memory, "_keep_dense", lambda *a: 0)
    monkeypatch.setattr(memory, "probe_batches", lambda trainer, cfg: ({}, ()))

    def probe(trainer, batch, n_layers, warmup):
        seen.append(trainer.model(torch.ones(1, 4)).dtype)
        return 10 * GIB, 11 * GIB

    monkeypatch.setattr(memory, "_probe", probe)
    assert memory._choose(trainer, cfg)["why"] == "measured"
    assert seen == [True, torch.float32] and "forward" not in vars(model)  # autocast inside, fp32 out
    monkeypatch.setattr(memory, "_probe", lambda *a: None)  # nothing fits: the policy says so
    with pytest.raises(RuntimeError, match="does not fit"):
        memory._choose(trainer, cfg)
    assert "forward" not in vars(model) and not torch.is_autocast_enabled("cpu")


def test_on_the_real_trainer_the_probe_step_runs_the_layers_as_training_does(tmp_path, tiny_model_dir, tiny_trainer):
    """The tiny PeftModel trainer with bf16 (CPU autocast): a probe step under the wrapping runs its decoder layers
    under autocast as training's steps do (accelerate wraps the forward in `prepare`), and one without it does not
    (the probe before the fix)."""
    import torch

    from llmhelpers.training import memory
    from llmhelpers.training.run import run_training

    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir), max_steps=1,
                      eval_steps=100, save_steps=100, accuracy_callback=False, bf16=True)
    trainer, *_ = tiny_trainer(cfg)
    assert trainer.accelerator.native_amp  # the run has mixed precision: accelerate will autocast training's forward
    seen = []
    memory.decoder_layers(trainer.model)[0].register_forward_pre_hook(
        lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    batch = memory.worst_batch(trainer, cfg)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, dict(batch))  # the probe's step as it was
    with memory.forward_as_training_runs_it(trainer):
        trainer.training_step(trainer.model, dict(batch))
    trainer.model.zero_grad(set_to_none=True)
    assert "forward" not in vars(trainer.model)
    run_training(trainer, cfg)
    assert seen[:2] == [False, True] and seen[2:] and all(seen[2:])  # training's steps (and its evaluation) autocast


def test_under_training_autocast_the_probe_step_saves_fewer_bytes_for_the_backward(tmp_path, tiny_model_dir,
                                                                                   tiny_trainer):
    """What the probe measures: the bytes a step keeps for its backward (every layer keeping its activations). Without
    training's autocast they included fp32 copies of the adapted layers' inputs (the adapters' dtype); on the tiny
    bf16 run on the CPU the wrapped step keeps ~20% fewer bytes, some of them in bf16."""
    import contextlib

    import torch

    from llmhelpers.training import memory

    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir),
                      accuracy_callback=False, bf16=True, checkpoint_layers=0)
    trainer, *_ = tiny_trainer(cfg)
    memory.set_checkpointed_layers(trainer.model, 0)
    batch = memory.worst_batch(trainer, cfg)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1

    def saved_bytes(wrapping):
        kept = {}

        def pack(tensor):
            kept[tensor.dtype] = kept.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), wrapping:
            trainer.training_step(trainer.model, dict(batch))
        trainer.model.zero_grad(set_to_none=True)
        return kept

    before, wrapped = saved_bytes(contextlib.nullcontext()), saved_bytes(memory.forward_as_training_runs_it(trainer))
    assert torch.bfloat16 not in before and wrapped.get(torch.bfloat16, 0) > 0
    assert sum(wrapped.values()) < 0.9 * sum(before.values())
