"""Activation checkpointing chosen by memory: as few decoder layers recompute their activations as the worst batch of
the run allows, decided before step 1, after deciding whether the frozen base stays dequantized (dequantize_once).

Recomputing every layer (full checkpointing) costs about a third of a training step; keeping every layer's
activations is the fastest and needs the most memory. In between, the first `n` layers recompute and the rest keep
theirs. `choose_checkpointed_layers` measures, on the GPU, one training step on the worst batch the run can meet
(a packed row of `pack_tokens` tokens, or `per_device_train_batch_size` sequences of `max_length`) with every layer
checkpointed and with a few layers not, which gives the memory of one layer's activations, then picks the smallest
`n` whose peak fits `memory_limit_gib` (default: the GPU's memory) with a margin. The worst batch goes through the
trainer's collator and its forward runs under training's autocast (`forward_as_training_runs_it`), so the probe
runs the path training runs; with compiled layers (`compile_layers`) each measured step comes after the steps that
compile the graphs training will run (`probe_batches`). The probe steps leave the model, its gradients, the RNG
streams and the trainer's counters as they were.
"""
from __future__ import annotations

import contextlib

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


def worst_batch(trainer, cfg, longest: int | None = None) -> dict:
    """The largest micro-batch the run can meet, every token trained on: a packed row of pack_tokens tokens made of
    sequences of max_example_tokens (or `longest`), collated by the trainer's own collator so that it carries what
    training batches carry (position ids, the sequences' boundaries and longest length), or
    per_device_train_batch_size padded sequences of max_example_tokens (or `longest`)."""
    import torch

    device = trainer.args.device
    vocab = trainer.model.config.vocab_size
    longest = longest or cfg.max_example_tokens
    generator = torch.Generator().manual_seed(0)
    if cfg.pack_tokens:
        n = cfg.pack_tokens
        lengths = [longest] * (n // longest) + ([n % longest] if n % longest else [])
        ids = torch.randint(10, vocab - 10, (n,), generator=generator).tolist()
        batch = trainer.data_collator([{"input_ids": ids, "labels": ids, "seq_lengths": lengths}])
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    shape = (cfg.sft.per_device_train_batch_size, longest)
    ids = torch.randint(10, vocab - 10, shape, generator=generator)
    return {"input_ids": ids.to(device), "labels": ids.to(device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=device)}


def probe_batches(trainer, cfg) -> tuple[dict, tuple]:
    """The worst batch the probe measures, and the batches it runs before (compiled layers: training's first batch
    compiles a graph for that batch's sizes and its second one a graph for any sizes, which every later step runs;
    the probe's steps compile those two first, so that it measures the graph training runs and training's own steps
    compile nothing)."""
    batch = worst_batch(trainer, cfg)
    if not cfg.compile_layers:  # TrainingRun compiles the layers before the policy runs
        return batch, ()
    return batch, (batch, worst_batch(trainer, cfg, longest=max(1, cfg.max_example_tokens // 2)))


@contextlib.contextmanager
def forward_as_training_runs_it(trainer):
    """The model's forward wrapped as accelerate's `prepare` wraps it when training starts (autocast to the run's
    mixed precision, outputs in fp32), for the steps the memory probe runs before that. Without it the probe's
    forward ran without autocast, so the fused LoRA nodes saved their inputs cast to the fp32 adapters' dtype, and
    compiled layers compiled graphs for another autocast state, which training then compiled again (on an H200 a
    probe step counted 21.1 GiB with 8 layers keeping their activations where training held 17.4 with the same 8,
    and 1.24 GiB per compiled layer where training held ~0.52; training's warm-up compiled for 24 s, 2026-12-04)."""
    from accelerate.utils import convert_outputs_to_fp32

    model, accelerator = trainer.model, trainer.accelerator
    if getattr(model, "_is_accelerate_prepared", False) or not accelerator.native_amp:
        yield  # prepared already (a second run of the same trainer), or no mixed precision: as training runs it
        return
    own = "forward" in vars(model)  # an instance attribute (another wrapper) to put back, or the class's method
    original = model.forward

    def autocast_forward(*args, **kwargs):
        with accelerator.autocast():
            return original(*args, **kwargs)

    model.forward = convert_outputs_to_fp32(autocast_forward)
    try:
        yield
    finally:
        if own:
            model.forward = original
        else:
            del model.forward


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


def _keep_dense(trainer, cfg, cuda: bool, limit: float | None = None) -> int:
    """The frozen base dequantized once (cfg.dequantize_once; llmhelpers.model.fused_lora.keep_dense_base): "auto"
    keeps it on a GPU where it fits beside what is allocated with the margin (a 7B base in bf16 is ~13 GiB: not on a
    16 GB card), to be dropped again if the worst step does not fit with it. Returns its bytes."""
    from llmhelpers.model.fused_lora import dense_base_bytes, keep_dense_base

    on = cfg.dequantize_once == "on" or (cfg.dequantize_once == "auto" and cuda)
    if on and cfg.dequantize_once == "auto" and limit is not None:
        import torch

        on = dense_fits(torch.cuda.memory_allocated(trainer.args.device), dense_base_bytes(trainer.model), limit)
    return keep_dense_base(trainer.model, on)


def dense_fits(allocated: float, dense: float, limit: float, margin: float = MARGIN_GIB * 2**30) -> bool:
    return allocated + dense + margin <= limit


def smaller_batch(cfg) -> dict | None:
    """The SFTConfig settings for half the micro-batch with twice the accumulation, so an optimizer step still holds
    as many tokens (the guide's recipe for a 16 GB card); None where the micro-batch cannot be halved (a packed row
    already as short as the longest example, or one padded sequence)."""
    sft = cfg.sft
    accumulation = 2 * sft.gradient_accumulation_steps
    if cfg.pack_tokens:
        half = cfg.pack_tokens // 2
        if half < cfg.max_example_tokens:
            return None
        return {"max_length": half, "pad_to_multiple_of": half, "gradient_accumulation_steps": accumulation}
    if sft.per_device_train_batch_size > 1:
        return {"per_device_train_batch_size": sft.per_device_train_batch_size // 2,
                "gradient_accumulation_steps": accumulation}
    return None


def smaller_batch_advice(cfg) -> str:
    """What to set when one micro-batch does not fit (smaller_batch), by the settings' own names."""
    settings = smaller_batch(cfg)
    if settings is None:
        rows = " and with it the packed rows (max_length)" if cfg.pack_tokens else ""
        return f"lower max_example_tokens (now {cfg.max_example_tokens}){rows}"
    what = "packed rows" if cfg.pack_tokens else "micro-batch"
    same = f"{cfg.pack_tokens * cfg.sft.gradient_accumulation_steps:,} tokens" if cfg.pack_tokens else "sequences"
    written = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"halve the {what} in the SFTConfig: {written} (the same {same} per step)"


def cap_memory(cfg, device) -> float:
    """The bytes this run may use: cfg.memory_limit_gib, or the whole GPU. Torch's per-process cap is set to it
    either way, so a run after one with a smaller limit (a notebook cell re-run, the next card of a size sweep) is
    not held to the old one."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    limit = min(cfg.memory_limit_gib * 2**30, total) if cfg.memory_limit_gib else total
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    return limit


def _choose(trainer, cfg) -> dict:
    """Decide whether the base stays dequantized (cfg.dequantize_once), then measure and set the number of
    checkpointed layers for this run (CUDA with gradient checkpointing on and checkpoint_layers = -1); otherwise apply
    checkpoint_layers as given (-1: all). Returns what was decided and why."""
    import copy

    import torch

    gib = lambda b: round(b / 2**30, 2)
    n_layers = len(decoder_layers(trainer.model))
    cuda = torch.cuda.is_available()
    limit = cap_memory(cfg, trainer.args.device) if cuda else None
    dense = _keep_dense(trainer, cfg, cuda, limit)
    chosen = lambda n, why: {"checkpointed_layers": n, "of": n_layers, "why": why, "dequantized_base_bytes": dense}
    if not cfg.sft.activation_checkpointing:
        return chosen(0, "activation_checkpointing off")
    if cfg.checkpoint_layers >= 0:
        return chosen(set_checkpointed_layers(trainer.model, cfg.checkpoint_layers), "checkpoint_layers set")
    if not cuda:
        return chosen(set_checkpointed_layers(trainer.model, n_layers), "no GPU to measure: all layers recompute")
    state = (torch.get_rng_state(), torch.cuda.get_rng_state_all(), trainer._total_train_tokens,
             copy.deepcopy(trainer._metrics), getattr(trainer, "llm_padding_pending", None))
    batch, warmup = probe_batches(trainer, cfg)
    was_training = trainer.model.training
    trainer.model.train()
    with forward_as_training_runs_it(trainer):  # the autocast training's steps run under
        try:
            probed = _probe(trainer, batch, n_layers, warmup)
            over = probed is None or probed[0] + MARGIN_GIB * 2**30 > limit
            if dense and cfg.dequantize_once == "auto" and over:
                from llmhelpers.model.fused_lora import keep_dense_base

                dense = keep_dense_base(trainer.model, False)  # even all layers recomputing do not fit with it
                torch.cuda.empty_cache()
                probed = _probe(trainer, batch, n_layers, warmup)
            if probed is None:
                raise RuntimeError(
                    f"one training step on the longest batch this run can meet does not fit in {gib(limit)} GiB "
                    f"even with every layer recomputing"
                    f"{' and the base in 4 bits' if cfg.dequantize_once != 'on' else ''}: "
                    f"{smaller_batch_advice(cfg)}, or raise memory_limit_gib")
            peak_all, peak_probe = probed
        finally:
            torch.set_rng_state(state[0])
            torch.cuda.set_rng_state_all(state[1])
            trainer._total_train_tokens, trainer._metrics, trainer.llm_padding_pending = state[2], state[3], state[4]
            trainer.model.train(was_training)
            torch.cuda.empty_cache()
    n = set_checkpointed_layers(trainer.model, layers_that_fit(limit, peak_all, peak_probe, PROBE_LAYERS, n_layers))
    per_layer = (peak_probe - peak_all) / PROBE_LAYERS  # infinite where the probe with layers kept did not fit
    return {"checkpointed_layers": n, "of": n_layers, "why": "measured", "limit_gib": gib(limit),
            "dequantized_base_bytes": dense, "peak_all_checkpointed_gib": gib(peak_all),
            "per_layer_gib": gib(per_layer) if per_layer != float("inf") else None,
            "expected_peak_gib": gib(peak_all + (n_layers - n) * per_layer if n < n_layers else peak_all)}


def _probe(trainer, batch, n_layers: int, warmup=()) -> tuple[float, float] | None:
    """The peak of one step on the worst batch with every layer checkpointed, and with PROBE_LAYERS layers not, each
    after a step on each `warmup` batch (compiled layers: the graphs training will run are compiled by those steps,
    not by the measured one; the probe's overcount of compiled layers on an H200, 1.24 GiB each where training held
    ~0.52, came from its missing autocast: `forward_as_training_runs_it`). Under the run's cap a probe step can run out of memory (a small card's limit): None
    where even the first configuration does, an infinite second peak where only the second does (fewer than
    PROBE_LAYERS layers could keep theirs: all recompute)."""
    import torch

    peaks = []
    for n in (n_layers, n_layers - PROBE_LAYERS):
        set_checkpointed_layers(trainer.model, n)
        try:
            for before in warmup:
                _peak_of_step(trainer, before)
            peaks.append(_peak_of_step(trainer, batch))
        except torch.OutOfMemoryError:
            trainer.model.zero_grad(set_to_none=True)
            peaks.append(None)
            break
    if peaks[0] is None:
        return None
    return peaks[0], peaks[1] if peaks[1] is not None else float("inf")
