"""Activation checkpointing chosen by memory: as few decoder layers recompute their activations as the worst batch of
the run allows, decided before step 1, after deciding whether the frozen base stays dequantized (dequantize_once).

Recomputing every layer (full checkpointing) costs about a third of a training step; keeping every layer's
activations is the fastest and needs the most memory. In between, the first `n` layers recompute and the rest keep
theirs. `choose_checkpointed_layers` measures, on the GPU, one training step on the worst batch the run can meet
(a packed row of `pack_tokens` tokens, or `per_device_train_batch_size` sequences of `max_length`) with every layer
checkpointed and with a few layers not, which gives the memory of one layer's activations, then picks the smallest
`n` whose peak fits `memory_limit_gib` (default: the GPU's memory) with a margin. The probe steps leave the model,
its gradients, the RNG streams and the trainer's counters as they were.
"""
from __future__ import annotations

MARGIN_GIB = 2.0  # allocator fragmentation (reserved over allocated), the optimizer's states, CUDA graphs of others
PROBE_LAYERS = 4  # layers left uncheckpointed in the second probe step


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model, n: int) -> int:
    """The first `n` decoder layers recompute in the backward pass, the others keep their activations. Needs
    gradient checkpointing switched on (prepare_for_lora), which gives every layer its checkpoint function. A
    ResumableSFTTrainer keeps the choice (`trainer.checkpointed_layers`) across the Trainer's own switching-on."""
    layers = decoder_layers(model)
    n = max(0, min(n, len(layers)))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
    return n


def layers_that_fit(limit: float, peak_all: float, peak_probe: float, probe_layers: int, n_layers: int,
                    margin: float = MARGIN_GIB * 2**30) -> int:
    """How many layers must recompute so that the peak stays under `limit - margin` bytes: each layer that keeps its
    activations adds (peak_probe - peak_all) / probe_layers to the peak measured with all checkpointed."""
    per_layer = max(0.0, (peak_probe - peak_all) / probe_layers)
    room = limit - margin - peak_all
    if room < 0:
        return n_layers  # even full checkpointing is over the limit: the run will say so at its first step
    if per_layer == 0:
        return 0
    keep = min(n_layers, int(room // per_layer))
    return n_layers - keep


def worst_batch(trainer, cfg) -> dict:
    """The largest micro-batch the run can meet, every token trained on: a packed row of pack_tokens tokens made of
    max_example_tokens sequences, or per_device_train_batch_size padded sequences of max_example_tokens."""
    import torch

    device = trainer.args.device
    vocab = trainer.model.config.vocab_size
    if cfg.pack_tokens:
        n = cfg.pack_tokens
        positions = torch.arange(n) % cfg.max_example_tokens
        ids = torch.randint(10, vocab - 10, (1, n), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids.to(device), "labels": ids.to(device), "position_ids": positions[None].to(device)}
    shape = (cfg.sft.per_device_train_batch_size, cfg.max_example_tokens)
    ids = torch.randint(10, vocab - 10, shape, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "labels": ids.to(device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=device)}


def _peak_of_step(trainer, batch) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if not hasattr(trainer, "current_gradient_accumulation_steps"):  # set by the training loop, read by the step
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.training_step(trainer.model, dict(batch))
    torch.cuda.synchronize()
    trainer.model.zero_grad(set_to_none=True)
    return float(torch.cuda.max_memory_allocated())


def choose_checkpointed_layers(trainer, cfg) -> dict:
    decided = _choose(trainer, cfg)
    trainer.checkpointed_layers = decided["checkpointed_layers"] if cfg.sft.activation_checkpointing else None
    return decided


def _keep_dense(trainer, cfg, cuda: bool) -> int:
    """The frozen base dequantized once (cfg.dequantize_once; llmhelpers.model.fused_lora.keep_dense_base): "auto"
    keeps it on a GPU, to be dropped again if the worst step does not fit with it. Returns its bytes."""
    from llmhelpers.model.fused_lora import keep_dense_base

    return keep_dense_base(trainer.model, cfg.dequantize_once == "on" or (cfg.dequantize_once == "auto" and cuda))


def _choose(trainer, cfg) -> dict:
    """Decide whether the base stays dequantized (cfg.dequantize_once), then measure and set the number of
    checkpointed layers for this run (CUDA with gradient checkpointing on and checkpoint_layers = -1); otherwise apply
    checkpoint_layers as given (-1: all). Returns what was decided and why."""
    import copy

    import torch

    gib = lambda b: round(b / 2**30, 2)
    n_layers = len(decoder_layers(trainer.model))
    cuda = torch.cuda.is_available()
    dense = _keep_dense(trainer, cfg, cuda)
    chosen = lambda n, why: {"checkpointed_layers": n, "of": n_layers, "why": why, "dequantized_base_bytes": dense}
    if not cfg.sft.activation_checkpointing:
        return chosen(0, "activation_checkpointing off")
    if cfg.checkpoint_layers >= 0:
        return chosen(set_checkpointed_layers(trainer.model, cfg.checkpoint_layers), "checkpoint_layers set")
    if not cuda:
        return chosen(set_checkpointed_layers(trainer.model, n_layers), "no GPU to measure: all layers recompute")
    limit = cfg.memory_limit_gib * 2**30 if cfg.memory_limit_gib else torch.cuda.get_device_properties(
        trainer.args.device).total_memory
    total = torch.cuda.get_device_properties(trainer.args.device).total_memory
    if cfg.memory_limit_gib:  # the run itself stays within it too (e.g. to check a smaller card's setting)
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), trainer.args.device)
    state = (torch.get_rng_state(), torch.cuda.get_rng_state_all(), trainer._total_train_tokens,
             copy.deepcopy(trainer._metrics))
    batch = worst_batch(trainer, cfg)
    was_training = trainer.model.training
    trainer.model.train()
    try:
        peak_all, peak_probe = _probe(trainer, batch, n_layers)
        if dense and cfg.dequantize_once == "auto" and peak_all + MARGIN_GIB * 2**30 > limit:
            from llmhelpers.model.fused_lora import keep_dense_base

            dense = keep_dense_base(trainer.model, False)  # even all layers recomputing do not fit with it
            torch.cuda.empty_cache()
            peak_all, peak_probe = _probe(trainer, batch, n_layers)
    finally:
        torch.set_rng_state(state[0])
        torch.cuda.set_rng_state_all(state[1])
        trainer._total_train_tokens, trainer._metrics = state[2], state[3]
        trainer.model.train(was_training)
        torch.cuda.empty_cache()
    n = set_checkpointed_layers(trainer.model, layers_that_fit(limit, peak_all, peak_probe, PROBE_LAYERS, n_layers))
    return {"checkpointed_layers": n, "of": n_layers, "why": "measured", "limit_gib": gib(limit),
            "dequantized_base_bytes": dense, "peak_all_checkpointed_gib": gib(peak_all),
            "per_layer_gib": gib((peak_probe - peak_all) / PROBE_LAYERS),
            "expected_peak_gib": gib(peak_all + (n_layers - n) * (peak_probe - peak_all) / PROBE_LAYERS)}


def _probe(trainer, batch, n_layers: int) -> tuple[float, float]:
    """The peak of one step on the worst batch with every layer checkpointed, and with PROBE_LAYERS layers not."""
    set_checkpointed_layers(trainer.model, n_layers)
    peak_all = _peak_of_step(trainer, batch)
    set_checkpointed_layers(trainer.model, n_layers - PROBE_LAYERS)
    return peak_all, _peak_of_step(trainer, batch)
