"""Each decoder layer compiled as one region for the training steps (issue #31, lever 2: the CPU floor).

A training step of the 1.5B model runs 28 decoder layers, each a few hundred Python-level calls (the layer, its
norms, attention, the fused LoRA nodes); on rows of 8,192 tokens the GPU waited on that CPU work. `torch.compile` of
each layer in place (`nn.Module.compile`, PyTorch's "regional compilation": every layer shares one compiled graph,
since parameters are the graph's inputs) replaces those calls with one compiled call per layer. Training only: a
compiled layer under `model.generate` would compile again for each new cache length, so `TrainingRun` undoes it when
training stops, however it stops. The layers are compiled before the memory policy's probe steps: compiled, a layer
keeps about half the activations of the eager one (H200, rows of 16,384: 25.3 against 45.5 GiB with none
recomputing, 2026-12-04), so the probe has to measure them as they train. Off by default (`compile_layers`): on an
H200 it gave 1.061x tokens/s on rows of 16,384 and 1.026x on 8,192 (BENCHMARKS.md, 2026-12-04; -22% at 8,192 on the
path of 2026-12-03); under a memory limit 0.94-0.96x (22 GiB) and 1.02-1.06x (29.5 GiB) the eager run, measured
while the memory policy's probe ran other graphs than training (1.24-1.25 GiB per layer counted where training held
~0.52): its worst batch lacked the collator's keys (fixed, no change on the GPU), and its forward ran without the
autocast accelerate puts on training's forward (fixed after the last GPU session: `forward_as_training_runs_it`). The
probe now compiles training's graphs first and measures them; training's steps then compile nothing (test on the CPU,
where no autocast is involved); not re-measured on a GPU. On the CPU it trains the same numbers within float rounding
(tests/test_compiled.py).
"""
from __future__ import annotations

from llmhelpers.training.memory import decoder_layers


def compile_layers(model) -> int:
    """Compile each decoder layer in place (a layer already compiled stays as it is); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:  # nn.Module.compile() sets it; __call__ reads it
            layer.compile()
    return len(layers)


def uncompile_layers(model) -> int:
    """The layers' own forward again (nn.Module.compile's attribute cleared); returns how many were compiled."""
    undone = 0
    for layer in decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None
            undone += 1
    return undone
