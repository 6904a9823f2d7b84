"""One autograd node per LoRA layer on a 4-bit base: the same computation as peft's `lora.Linear4bit`, with far
less work on the CPU.

Per adapted linear layer and training step, peft's forward runs ~10 Python frames (its checks, the dropout module,
two nn.Linear, bitsandbytes' Linear4bit and MatMul4Bit) and records ~9 autograd nodes (MatMul4Bit, clone, dropout,
two casts, two matmuls, mul, add), each of which the backward walks again. A step of the 1.5B model has 196 such
layers, so on rows of 8,192 tokens the GPU waited on the CPU for about half of each step (issue #22:
bench/profile_train.py). Here the whole layer is one `torch.autograd.Function` whose backward is written out:

    forward     y  = base(x) + s * B(A(dropout(x)))          base: bitsandbytes' own 4-bit op (gemm_4bit)
    backward    dx = dy @ W  +  dropout'(s * dy @ B @ A)     W: the 4-bit weight dequantized, as bitsandbytes does
                dA = (s * dy @ B)^T @ dropout(x)             dB = (s * dy)^T @ A(dropout(x))

A scaling that is a power of two of at least 1 (alpha = 2r, the default, gives 2) multiplies the rank-r B and its
gradient instead of the whole output and output gradient: exactly the same numbers (`scale_folds`), two passes over
each layer's output fewer. The forward runs the same ops as peft's (bitsandbytes' gemm_4bit for the base, the same
dropout kernel and RNG draws, the same linears and casts, under whatever autocast is active), so its output is
bit-identical; the backward computes each gradient with the matmul autograd would use, so gradients differ only
where bf16 sums of the branches meet in another order (the input's gradient adds the base's share inside its
matmul, `_add_matmul`: rounded once) (`tests/test_fused_lora.py` measures both on a 4-bit model).
Activation checkpointing works as before: the saved tensors go through `save_for_backward`, so a checkpointed layer
drops and recomputes them, and the dropout mask is drawn again from the restored RNG state.

Only the training path is replaced (grad enabled, one plain LoRA adapter, adapters active and not merged, on CUDA or
without dropout); anything else (evaluation under no_grad, DoRA and other variants, several adapters, adapters
disabled for the base model's answers, dropout on the CPU, where F.dropout draws its mask another way) runs peft's
own forward; so does a layer whose base bias is trained (LoraConfig bias="all" or "lora_only").
"""
from __future__ import annotations

import math
import types

import torch

FUSED_FLAG = "llm_fused_lora"  # set on each layer whose forward this module replaced
DENSE_ATTR = "llm_dense_weight"  # on a 4-bit base layer: its weight dequantized once (keep_dense_base)


def _base_output(x, weight, quant_state, bias):
    """bitsandbytes' Linear4bit forward without its autograd node: the op MatMul4Bit.forward calls."""
    packed = weight.view(-1, 1)
    if not quant_state.nested:
        return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, quant_state.shape, quant_state.absmax,
                                                        quant_state.blocksize, quant_state.quant_type, bias=bias)
    return torch.ops.bitsandbytes.gemm_4bit.default(
        x, packed, quant_state.shape, quant_state.state2.absmax, quant_state.blocksize, quant_state.quant_type,
        bias=bias, absmax_8bit=quant_state.absmax, absmax_code=quant_state.state2.code,
        absmax_offset=quant_state.offset)


def dequantized(weight, quant_state, dtype):
    """A 4-bit weight's values in `dtype`: bitsandbytes' own dequantization, as its matmul runs it for training rows
    (gemm_4bit dequantizes, then F.linear) and as the backward below needs it."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.view(-1, 1), quant_state).to(dtype)


def scale_folds(scaling: float) -> bool:
    """Whether LoRA's scaling can multiply the rank-r matrix B (and B's gradient) instead of the layer's whole output
    (and output gradient) with the same result to the bit: a power of two of at least 1 (the default alpha = 2r
    gives 2) only moves exponents, so it commutes with every rounding of the matmuls (overflow aside). That saves a
    read and a write of the output per adapted layer, forward and backward (for gate/up on a row of 16,384 tokens,
    294 MB each)."""
    mantissa, exponent = math.frexp(scaling)
    return mantissa == 0.5 and exponent >= 1


class LoraOn4bit(torch.autograd.Function):
    """y = base_4bit(x) + scaling * lora_B(lora_A(dropout(x))), as peft computes it, in one node. With `dense` (the
    base weight dequantized once, keep_dense_base) the base matmul uses it instead of dequantizing again: the same
    values and the same F.linear as bitsandbytes runs on a training row."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, bias, scaling, dropout_p, cast_input, dense=None):
        base = _base_forward(x, weight, quant_state, bias, dense)
        inner = x.to(lora_a.dtype) if cast_input else x  # peft casts the input when no autocast is active
        dropped, mask = _dropout(inner, dropout_p)
        down = torch.nn.functional.linear(dropped, lora_a)  # autocast, if active, casts as it does for peft
        fold = scale_folds(scaling)  # onto B, exactly: no pass over the layer's whole output for the scaling
        up = torch.nn.functional.linear(down, lora_b * scaling if fold else lora_b)
        update = up if fold else up * scaling
        if cast_input:
            update = update.to(base.dtype)
        ctx.quant_state, ctx.scaling, ctx.dropout_p = quant_state, scaling, dropout_p
        ctx.weight, ctx.dense = weight, dense  # frozen tensors: kept as they are, like bitsandbytes does
        ctx.dtypes = (x.dtype, inner.dtype, up.dtype, lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(dropped, mask, down, lora_a, lora_b)
        return base + update

    @staticmethod
    def backward(ctx, grad):
        dropped, mask, down, lora_a, lora_b = ctx.saved_tensors
        x_dtype, inner_dtype, compute_dtype, a_dtype, b_dtype = ctx.dtypes
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        # the LoRA branch, in the dtype its matmuls ran in (under autocast: the autocast dtype)
        grad_down, grad_b = _grads_through_b(grad, down.reshape(-1, down.shape[-1]), lora_b, ctx.scaling,
                                             compute_dtype, need_b)
        grad_b = grad_b.to(b_dtype) if need_b else None
        grad_a = grad_x = None
        if need_a:
            dropped_2d = dropped.reshape(-1, dropped.shape[-1]).to(compute_dtype)
            grad_a = grad_down.t().mm(dropped_2d).to(a_dtype)
        if need_x:
            grad_dropped = grad_down.mm(lora_a.to(compute_dtype)).to(inner_dtype).view(dropped.shape)
            grad_dropped = _dropout_backward(grad_dropped, mask, ctx.dropout_p)
            weight = _base_weight(ctx.weight, ctx.quant_state, ctx.dense, grad.dtype)
            grad_x = _add_matmul(grad_dropped.to(x_dtype), grad, weight)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None


def _base_forward(x, weight, quant_state, bias, dense):
    """The frozen base's output: with its dense copy (keep_dense_base) or through bitsandbytes' own 4-bit op."""
    return torch.nn.functional.linear(x, dense, bias) if dense is not None else \
        _base_output(x, weight, quant_state, bias)


def _base_weight(weight, quant_state, dense, dtype):
    """The base weight for the input's gradient: its dense copy, or dequantized as bitsandbytes does."""
    return dense.to(dtype) if dense is not None else dequantized(weight, quant_state, dtype)


def _dropout(inner, p: float):
    """(dropped input, mask): the kernel F.dropout runs on CUDA, or the input itself and no mask."""
    return torch.native_dropout(inner, p, True) if p > 0 else (inner, None)


def _dropout_backward(grad, mask, p: float):
    return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p)) if mask is not None else grad


def _grads_through_b(grad, down_2d, lora_b, scaling, compute_dtype, need_b: bool = True):
    """(the gradient of A's output, B's gradient or None) from the layer's output gradient, in the dtype the
    branch's matmuls ran in; a scaling that folds (scale_folds) goes onto the rank-r matrices instead of the whole
    output gradient (the same numbers)."""
    fold = scale_folds(scaling)
    grad_up = grad.to(compute_dtype) if fold else grad.to(compute_dtype) * scaling
    grad_up = grad_up.reshape(-1, grad.shape[-1])
    grad_down = grad_up.mm((lora_b * scaling if fold else lora_b).to(compute_dtype))
    if not need_b:
        return grad_down, None
    grad_b = grad_up.t().mm(down_2d)
    return grad_down, grad_b * scaling if fold else grad_b


def _add_matmul(into, a, b):
    """into + a @ b, with the sum inside the matmul where the dtypes allow (into is a fresh tensor, written in
    place): no product of its own written and read again (for down_proj on a row of 16,384 tokens, 294 MB each
    way). Rounded once where autograd rounds the product and then the sum: the gradients differ at bf16 rounding."""
    if into.dtype == a.dtype == b.dtype and into.is_contiguous():
        into.view(-1, into.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]), b)
        return into
    return torch.matmul(a, b) + into


def _fusable(layer, x, kwargs) -> str | None:
    """The adapter name when this call can run fused, else None (peft's forward handles it)."""
    if kwargs or not torch.is_grad_enabled() or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.lora_A[name].bias is not None \
            or layer.lora_B[name].bias is not None:
        return None
    base = layer.get_base_layer()
    if getattr(base, "compute_dtype", None) not in (None, x.dtype) or base.weight.quant_state is None:
        return None
    if base.bias is not None and base.bias.requires_grad:  # LoraConfig(bias="all"|"lora_only"): the backward
        return None  # here computes no bias gradient, so peft's forward trains the bias
    return name


def _fused_forward(self, x, *args, **kwargs):
    spec = None if args or kwargs else _fused_spec(self, x)
    if spec is None:
        return type(self).forward(self, x, *args, **kwargs)
    group = getattr(self, GROUP_ATTR, None)
    return group.run(self, x, spec) if group is not None else _single(self, x, spec)


def _fused_spec(layer, x):
    """(adapter name, (weight, quant_state, bias, scaling, dense), dropout p) for a layer that runs fused on x now,
    else None (peft's forward runs)."""
    name = _fusable(layer, x, {})
    if name is None:
        return None
    dropout = layer.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    if p > 0 and not x.is_cuda:  # F.dropout draws its mask otherwise off CUDA: keep peft's exact numbers there
        return None
    base = layer.get_base_layer()
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    dense = getattr(base, DENSE_ATTR, None)
    if dense is not None and dense.dtype != x.dtype:  # bitsandbytes dequantizes into the input's dtype
        dense = None
    return name, (base.weight, base.weight.quant_state, bias, layer.scaling[name], dense), p


def _single(layer, x, spec):
    name, (weight, quant_state, bias, scaling, dense), p = spec
    return LoraOn4bit.apply(x, layer.lora_A[name].weight, layer.lora_B[name].weight, weight, quant_state, bias,
                            scaling, p, not torch.is_autocast_enabled(), dense)


def fuse_lora_layers(model) -> int:
    """Run every peft LoRA layer on a bitsandbytes 4-bit linear through LoraOn4bit when training; returns how many.
    The parameters, the state dict and saving are peft's as before: only the forward is replaced, per instance."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support: nothing to fuse
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and not getattr(module, FUSED_FLAG, False):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, FUSED_FLAG, True)
            count += 1
    return count


def dense_base_bytes(model, dtype=None) -> int:
    """The bytes keep_dense_base(model, True, dtype) keeps, counted without dequantizing anything."""
    total = 0
    for module in model.modules():
        if getattr(module, FUSED_FLAG, False):
            base = module.get_base_layer()
            want = dtype or getattr(base, "compute_dtype", None) or torch.bfloat16
            total += base.weight.quant_state.shape.numel() * torch.finfo(want).bits // 8
    return total


def keep_dense_base(model, on: bool, dtype=None) -> int:
    """Keep (or drop) each fused LoRA layer's 4-bit base weight dequantized once, in `dtype` (default: the layer's
    compute dtype), for the training steps: the frozen base never changes, so dequantizing it in every forward and
    backward (and every recomputation) is repeated work. The values are bitsandbytes' own dequantization, so the
    numbers are the same; the cost is memory: 2 bytes per quantized base parameter in bf16 (2.4 GiB for the 1.5B
    model's linear layers). Not a parameter or buffer: never saved, never trained. Returns the bytes kept."""
    kept = 0
    for module in model.modules():
        if not getattr(module, FUSED_FLAG, False):
            continue
        base = module.get_base_layer()
        if not on:
            if hasattr(base, DENSE_ATTR):
                delattr(base, DENSE_ATTR)
            continue
        want = dtype or getattr(base, "compute_dtype", None) or torch.bfloat16
        dense = getattr(base, DENSE_ATTR, None)
        if dense is None or dense.dtype != want:
            with torch.no_grad():
                dense = dequantized(base.weight, base.weight.quant_state, want)
            setattr(base, DENSE_ATTR, dense)
        kept += dense.numel() * dense.element_size()
    return kept


# --- layers that read one input: q/k/v, gate/up (issue #31, lever 3) -------------------------------------------------
GROUP_ATTR = "llm_lora_group"  # on each member of an InputGroup
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # in the order the model calls them


class LoraGroupOn4bit(torch.autograd.Function):
    """The LoRA layers that read one input as one node: each base matmul as in LoraOn4bit, then one dropout of the
    input shared by the group (a mask per group, not per layer: with lora_dropout > 0 the draws differ from peft's),
    one matmul with the group's A matrices stacked, and each layer's B, its product added to the base output inside
    the matmul (rounded once, where peft rounds the update and then the sum). The backward sums the input's gradient
    from every base in place and from the stacked A once, and reads the dropped input once for all A gradients."""

    @staticmethod
    def forward(ctx, x, members, dropout_p, cast_input, *adapters):
        # members: (weight, quant_state, bias, scaling, dense) per layer; adapters: lora_A, lora_B of each in turn
        lora_as, lora_bs = adapters[0::2], adapters[1::2]
        bases = [_base_forward(x, weight, quant_state, bias, dense).contiguous()  # added to in place below
                 for weight, quant_state, bias, _, dense in members]
        inner = x.to(lora_as[0].dtype) if cast_input else x
        dropped, mask = _dropout(inner, dropout_p)
        down = torch.nn.functional.linear(dropped, torch.cat(lora_as))
        ranks = [a.shape[0] for a in lora_as]
        outputs = []
        for base, part, lora_b, (*_, scaling, _) in zip(bases, down.split(ranks, -1), lora_bs, members):
            if part.dtype == base.dtype:  # the update added in the matmul's epilogue: no pass of its own over the
                # output (for gate/up on a row of 16,384 tokens, 294 MB written and read again); rounded once
                base.view(-1, base.shape[-1]).addmm_(part.reshape(-1, part.shape[-1]), lora_b.to(part.dtype).t(),
                                                     alpha=scaling)
                outputs.append(base)
                continue
            up = torch.nn.functional.linear(part, lora_b)
            outputs.append(base + (up * scaling).to(base.dtype))
        ctx.members, ctx.dropout_p, ctx.ranks = members, dropout_p, ranks
        ctx.dtypes = (x.dtype, inner.dtype, down.dtype)
        ctx.save_for_backward(dropped, mask, down, *adapters)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        dropped, mask, down, *adapters = ctx.saved_tensors
        lora_as, lora_bs = adapters[0::2], adapters[1::2]
        x_dtype, inner_dtype, compute_dtype = ctx.dtypes
        need_x = ctx.needs_input_grad[0]
        down_2d = down.reshape(-1, down.shape[-1])
        grad_downs, grad_bs = [], []
        for grad, part, lora_b, (*_, scaling, _) in zip(grads, down_2d.split(ctx.ranks, -1), lora_bs, ctx.members):
            grad_down, grad_b = _grads_through_b(grad, part, lora_b, scaling, compute_dtype)
            grad_downs.append(grad_down)
            grad_bs.append(grad_b.to(lora_b.dtype))
        grad_down = torch.cat(grad_downs, -1)
        dropped_2d = dropped.reshape(-1, dropped.shape[-1]).to(compute_dtype)
        grad_as = [g.to(a.dtype) for g, a in zip(grad_down.t().mm(dropped_2d).split(ctx.ranks), lora_as)]
        grad_x = None
        if need_x:
            stacked = torch.cat(lora_as).to(compute_dtype)
            grad_dropped = grad_down.mm(stacked).to(inner_dtype).view(dropped.shape)
            grad_x = _dropout_backward(grad_dropped, mask, ctx.dropout_p).to(x_dtype)
            for grad, (weight, quant_state, _, _, dense) in zip(grads, ctx.members):  # every base's share summed
                # into the one buffer, inside each matmul
                grad_x = _add_matmul(grad_x, grad, _base_weight(weight, quant_state, dense, grad.dtype))
        return (grad_x, None, None, None, *(g for pair in zip(grad_as, grad_bs) for g in pair))


class InputGroup:
    """The fused LoRA layers of one block that the model calls on the same input, in turn. A call runs the whole
    group (LoraGroupOn4bit) and keeps the others' outputs; their calls with that same tensor take them. A call that
    does not match what is kept (another input, a member called twice) drops it and runs the group afresh; a group
    whose members cannot all run fused now runs this member alone (LoraOn4bit). The numbers stay right whatever
    calls the layers; the model's forward drops whatever an interrupted step left kept (group_lora_layers)."""

    def __init__(self, members: list):
        self.members = members
        self.pending = None  # (the input, {member index: its output}) until the other members take theirs

    def run(self, layer, x, spec):
        index = self.members.index(layer)
        if self.pending is not None and self.pending[0] is x and index in self.pending[1]:
            out = self.pending[1].pop(index)
            if not self.pending[1]:
                self.pending = None
            return out
        # nothing kept for this call (a new input, a member called twice, what an interrupted step left): the whole
        # group afresh. Running this member alone instead would leave the others' outputs for a call that never
        # comes, and the next step would start out of turn again
        self.pending = None
        specs = [spec if member is layer else _fused_spec(member, x) for member in self.members]
        name, _, p = spec
        if any(other is None or other[0] != name or other[2] != p for other in specs):
            return _single(layer, x, spec)
        members = tuple(other[1] for other in specs)
        adapters = [t for member in self.members for t in (member.lora_A[name].weight, member.lora_B[name].weight)]
        outputs = LoraGroupOn4bit.apply(x, members, p, not torch.is_autocast_enabled(), *adapters)
        self.pending = (x, {i: out for i, out in enumerate(outputs) if i != index})
        return outputs[index]


def group_lora_layers(model) -> int:
    """Group the fused LoRA layers that read one input (GROUPS: q/k/v of each attention, gate/up of each MLP), so a
    training step runs each group as one node (InputGroup); returns the number of groups."""
    groups = []
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if all(getattr(m, FUSED_FLAG, False) for m in members) and not hasattr(members[0], GROUP_ATTR):
                groups.append(InputGroup(members))
                for member in members:
                    setattr(member, GROUP_ATTR, groups[-1])
    def drop_kept(module, args):  # outputs kept by a forward that raised (out of memory in the memory probe,
        for group in groups:  # an interrupt) go before the next one
            group.pending = None

    if groups:
        model.register_forward_pre_hook(drop_kept)
    return len(groups)
