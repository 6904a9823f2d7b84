"""The fused LoRA-on-4-bit layer (llmhelpers.model.fused_lora) against peft's own forward and autograd, on the tiny
model loaded in real NF4 (bitsandbytes on the CPU): the same logits bit for bit, the same gradients up to the order
in which the branches' gradients are summed, dropout included, checkpointing included."""
import copy

import pytest
import torch

from llmhelpers.config.profiles import make_config
from llmhelpers.model.fused_lora import FUSED_FLAG, LoraOn4bit, fuse_lora_layers
from llmhelpers.model.loading import attach_lora, load_base_model


def lora_model(tiny_model_dir, tmp_path, **changes):
    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir),
                      fused_lora=False, lora_dropout=0.0, activation_checkpointing=False, **changes)
    model = attach_lora(load_base_model(cfg), cfg)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide every error in the LoRA branch
            param.data.normal_(0, 0.05)
    model.train()
    return model, cfg


def loss_and_grads(model, batch, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
        logits = out.logits.detach().clone()
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits, out.loss.detach(), grads


def batch_of(vocab: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 10, (2, 24), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def assert_same_training_math(reference, fused, grad_rtol):
    logits_ref, loss_ref, grads_ref = reference
    logits_fused, loss_fused, grads_fused = fused
    assert torch.equal(logits_ref, logits_fused)  # the forward runs the same ops
    assert torch.equal(loss_ref, loss_fused)
    assert grads_ref.keys() == grads_fused.keys() and len(grads_ref) > 0
    for name, grad in grads_ref.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_fused[name], grad, rtol=grad_rtol, atol=grad_rtol * grad.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_fused_layers_train_the_same_numbers_as_peft(tiny_model_dir, tmp_path):
    model, cfg = lora_model(tiny_model_dir, tmp_path)
    batch = batch_of(model.config.vocab_size)
    reference = loss_and_grads(model, batch)
    layers = model.config.num_hidden_layers
    assert fuse_lora_layers(model) == 7 * layers  # q k v o gate up down
    assert fuse_lora_layers(model) == 0  # already fused: nothing done twice
    calls = []
    original = LoraOn4bit.apply
    LoraOn4bit.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fused = loss_and_grads(model, batch)
    finally:
        LoraOn4bit.apply = original
    assert len(calls) == 7 * layers  # every adapted layer ran fused
    assert_same_training_math(reference, fused, grad_rtol=1e-5)  # fp32 compute: only summation order differs


def test_fused_layers_under_bf16_autocast_and_checkpointing(tiny_model_dir, tmp_path):
    model, cfg = lora_model(tiny_model_dir, tmp_path, bnb_4bit_compute_dtype="bfloat16")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = batch_of(model.config.vocab_size)
    reference = loss_and_grads(model, batch, autocast=True)
    fuse_lora_layers(model)
    fused = loss_and_grads(model, batch, autocast=True)
    # bf16 gradients: the base and LoRA contributions to a hidden state are summed in another order
    assert_same_training_math(reference, fused, grad_rtol=2e-2)


def test_evaluation_and_disabled_adapters_run_peft_forward(tiny_model_dir, tmp_path):
    model, cfg = lora_model(tiny_model_dir, tmp_path)
    fuse_lora_layers(model)
    batch = batch_of(model.config.vocab_size)
    calls = []
    original = LoraOn4bit.apply
    LoraOn4bit.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            model(**batch)
        with model.disable_adapter():
            model(**batch)
    finally:
        LoraOn4bit.apply = original
    assert calls == []


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # peft: layers without a bias cannot merge one
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"lora_bias": True}])
def test_lora_variants_run_peft_forward(tiny_model_dir, tmp_path, variant):
    model, cfg = lora_model(tiny_model_dir, tmp_path, **variant)
    reference = loss_and_grads(model, batch_of(model.config.vocab_size))
    fuse_lora_layers(model)
    calls = []
    original = LoraOn4bit.apply
    LoraOn4bit.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fused = loss_and_grads(model, batch_of(model.config.vocab_size))
    finally:
        LoraOn4bit.apply = original
    assert calls == []  # DoRA and LoRA biases are peft's to compute
    assert torch.equal(reference[1], fused[1])


def test_dropout_matches_autograd_with_the_same_mask(tiny_model_dir, tmp_path):
    """p > 0: the fused backward against autograd over the same ops and the same RNG draws (native_dropout)."""
    model, cfg = lora_model(tiny_model_dir, tmp_path)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    base = layer.get_base_layer()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5, base.in_features, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    grad_out = torch.randn(3, 5, base.out_features, generator=torch.Generator().manual_seed(3))
    p, scaling = 0.3, 2.0

    def fused():
        torch.manual_seed(7)
        return LoraOn4bit.apply(x, a, b, base.weight, base.weight.quant_state, base.bias, scaling, p, False)

    def reference():
        torch.manual_seed(7)
        with torch.no_grad():
            weight = __import__("bitsandbytes").functional.dequantize_4bit(base.weight.view(-1, 1),
                                                                          base.weight.quant_state)
        dropped, _ = torch.native_dropout(x, p, True)
        return torch.nn.functional.linear(x, weight, base.bias) + (dropped @ a.t() @ b.t()) * scaling

    results = []
    for run in (fused, reference):
        out = run()
        out.backward(grad_out)
        results.append((out.detach().clone(), x.grad.clone(), a.grad.clone(), b.grad.clone()))
        for t in (x, a, b):
            t.grad = None
    (out_f, *grads_f), (out_r, *grads_r) = results
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_f, grads_r):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the mask was used: without dropout the LoRA gradients differ
    out = LoraOn4bit.apply(x, a, b, base.weight, base.weight.quant_state, base.bias, scaling, 0.0, False)
    out.backward(grad_out)
    assert not torch.allclose(a.grad, grads_f[1], rtol=1e-3, atol=1e-3)


def test_attach_lora_fuses_by_default_and_records_it(tiny_model_dir, tmp_path):
    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir))
    assert cfg.fused_lora
    model = attach_lora(load_base_model(cfg), cfg)
    fused = [m for m in model.modules() if getattr(m, FUSED_FLAG, False)]
    assert len(fused) == 7 * model.config.num_hidden_layers
    assert model.llm_lora_settings["fused_lora"] is True
    from llmhelpers.model.loading import trainable_parameters

    assert f"; {len(fused)} LoRA layers fused for training steps" in trainable_parameters(model)
    # a speed setting, not a training one: the same run (the same numbers up to summation order)
    assert cfg.replace(fused_lora=False).run_id == cfg.run_id
    # the adapters in memory say how they were attached: a changed setting asks for the LoRA step again
    from llmhelpers.model.loading import check_lora_matches

    with pytest.raises(ValueError, match="fused_lora"):
        check_lora_matches(model, cfg.replace(fused_lora=False))
    # the saved adapter is peft's, unchanged by the fused forward
    state = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora_" in k})
    assert state and all(k.endswith(".weight") for k in state)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_base_biases_get_their_gradient(tiny_model_dir, tmp_path, bias):
    """Issue #29: with LoraConfig(bias="all"|"lora_only") the fused layer computed no gradient for the base layers'
    biases (q/k/v in Qwen2), so they stayed frozen; such layers now run peft's forward."""
    model, cfg = lora_model(tiny_model_dir, tmp_path, bias=bias)
    batch = batch_of(model.config.vocab_size)
    reference = loss_and_grads(model, batch)
    biases = [n for n in reference[2] if n.endswith("base_layer.bias")]
    assert biases  # q_proj, k_proj, v_proj of each layer
    fuse_lora_layers(model)
    assert_same_training_math(reference, loss_and_grads(model, batch), grad_rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept-activations", "recomputed"])
def test_the_base_dequantized_once_trains_the_same_numbers_to_the_bit(tiny_model_dir, tmp_path, checkpointing):
    """dequantize_once (issue #31): the frozen base's weights dequantized once and kept give the logits and the LoRA
    gradients that dequantizing in every forward and backward gives, bit for bit (the same NF4 values, the same
    matmuls); dropping them goes back to the 4-bit path."""
    from llmhelpers.model.fused_lora import DENSE_ATTR, keep_dense_base

    model, cfg = lora_model(tiny_model_dir, tmp_path)
    fuse_lora_layers(model)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    batch = batch_of(model.config.vocab_size)
    every_forward = loss_and_grads(model, batch)
    kept = keep_dense_base(model, True)
    bases = [m.get_base_layer() for m in model.modules() if getattr(m, FUSED_FLAG, False)]
    assert kept == sum(b.out_features * b.in_features * 4 for b in bases)  # fp32 compute on the CPU: 4 bytes each
    assert all(getattr(b, DENSE_ATTR).dtype == cfg.compute_dtype for b in bases)
    assert not any(DENSE_ATTR in name for name in model.state_dict())  # never saved
    once = loss_and_grads(model, batch)
    assert torch.equal(every_forward[0], once[0]) and torch.equal(every_forward[1], once[1])
    assert every_forward[2].keys() == once[2].keys()
    assert all(torch.equal(grad, once[2][name]) for name, grad in every_forward[2].items())
    assert keep_dense_base(model, False) == 0 and not any(hasattr(b, DENSE_ATTR) for b in bases)
    again = loss_and_grads(model, batch)
    assert torch.equal(again[0], every_forward[0])


@pytest.mark.parametrize("scaling", [2.0, 4.0])
def test_a_power_of_two_scaling_moves_onto_b_with_the_same_numbers_to_the_bit(tiny_model_dir, tmp_path, monkeypatch,
                                                                              scaling):
    """alpha = 2r (the default) gives scaling 2: multiplying B (and B's gradient) instead of the layer's whole
    output (and output gradient) must change nothing, in bf16 under autocast as on a GPU."""
    from llmhelpers.model import fused_lora

    assert fused_lora.scale_folds(scaling) and not fused_lora.scale_folds(1.5) and not fused_lora.scale_folds(0.5)
    model, cfg = lora_model(tiny_model_dir, tmp_path, bnb_4bit_compute_dtype="bfloat16")
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    base = layer.get_base_layer()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, base.in_features, generator=generator).bfloat16().requires_grad_(True)
    grad_out = torch.randn(3, 5, base.out_features, generator=generator).bfloat16()
    results = []
    for folds in (True, False):
        monkeypatch.setattr(fused_lora, "scale_folds", lambda s, folds=folds: folds)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = LoraOn4bit.apply(x, a, b, base.weight, base.weight.quant_state, base.bias, scaling, 0.0, False)
        out.backward(grad_out)
        results.append([out.detach().clone(), x.grad.clone(), a.grad.clone(), b.grad.clone()])
        for t in (x, a, b):
            t.grad = None
    for folded, plain in zip(*results):
        assert plain.abs().sum() > 0 and torch.equal(folded, plain)


def grouped_copy(model):
    from llmhelpers.model.fused_lora import group_lora_layers

    grouped = copy.deepcopy(model)
    fuse_lora_layers(grouped)
    assert group_lora_layers(grouped) == 2 * grouped.config.num_hidden_layers  # q/k/v and gate/up of each layer
    return grouped


def test_layers_that_read_one_input_train_as_one_group_with_the_same_numbers(tiny_model_dir, tmp_path):
    """group_lora_inputs (no dropout): q/k/v and gate/up each run as one node (a stacked A matmul, the input's
    gradient summed in place) and train the numbers of the layers run one by one, up to summation order."""
    from llmhelpers.model.fused_lora import LoraGroupOn4bit

    model, cfg = lora_model(tiny_model_dir, tmp_path)
    batch = batch_of(model.config.vocab_size)
    grouped = grouped_copy(model)
    fuse_lora_layers(model)
    reference = loss_and_grads(model, batch)
    calls = {"group": 0, "single": 0}
    originals = LoraGroupOn4bit.apply, LoraOn4bit.apply
    LoraGroupOn4bit.apply = lambda *a: calls.__setitem__("group", calls["group"] + 1) or originals[0](*a)
    LoraOn4bit.apply = lambda *a: calls.__setitem__("single", calls["single"] + 1) or originals[1](*a)
    try:
        logits, loss, grads = loss_and_grads(grouped, batch)
    finally:
        LoraGroupOn4bit.apply, LoraOn4bit.apply = originals
    layers = model.config.num_hidden_layers
    assert calls == {"group": 2 * layers, "single": 2 * layers}  # o_proj and down_proj run alone
    torch.testing.assert_close(logits, reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, reference[1], rtol=1e-6, atol=1e-6)
    for name, grad in reference[2].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert all(g.pending is None for m in grouped.modules() if (g := getattr(m, "llm_lora_group", None)))


def test_grouped_layers_under_bf16_autocast_and_checkpointing_stay_within_bf16_noise(tiny_model_dir, tmp_path):
    """bf16 under autocast, with checkpointing: the group rounds each output once (the update added inside the
    matmul) where the layer-by-layer path rounds the update and then the sum, and the tiny random model amplifies
    roundings (its logits reach ~10). So both are measured against the same model in fp32: the group's distance to
    it must be no more than the layer-by-layer path's own (x1.5), for the logits, the loss and every gradient."""
    import bitsandbytes as bnb

    model, cfg = lora_model(tiny_model_dir, tmp_path, bnb_4bit_compute_dtype="bfloat16")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = batch_of(model.config.vocab_size)
    grouped, exact = grouped_copy(model), copy.deepcopy(model)
    for module in exact.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
    fuse_lora_layers(model)
    fuse_lora_layers(exact)
    fp32 = loss_and_grads(exact, batch)
    single = loss_and_grads(model, batch, autocast=True)
    group = loss_and_grads(grouped, batch, autocast=True)
    distance = lambda run, i, key=None: ((run[i] if key is None else run[i][key]).float()
                                         - (fp32[i] if key is None else fp32[i][key])).norm().item()
    assert distance(group, 0) <= 1.5 * distance(single, 0) and distance(group, 1) <= 1.5 * distance(single, 1) + 1e-4
    for name in fp32[2]:
        assert distance(group, 2, name) <= 1.5 * distance(single, 2, name) + 1e-6, name


def test_a_group_with_dropout_matches_autograd_over_one_shared_mask(tiny_model_dir, tmp_path):
    """p > 0: one mask for the group's input, every layer's A sees the same dropped input; the written-out backward
    against autograd over the same ops and draws."""
    from llmhelpers.model.fused_lora import LoraGroupOn4bit

    model, cfg = lora_model(tiny_model_dir, tmp_path)
    attention = next(m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj"))
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    bases = [layer.get_base_layer() for layer in layers]
    adapters = [t.detach().clone().requires_grad_(True) for layer in layers
                for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, bases[0].in_features, generator=generator).requires_grad_(True)
    grads_out = [torch.randn(3, 5, b.out_features, generator=generator) for b in bases]
    p, scalings = 0.3, (2.0, 1.5, 2.0)  # 1.5: the scaling that does not fold onto B
    members = tuple((b.weight, b.weight.quant_state, b.bias, s, None) for b, s in zip(bases, scalings))

    def grouped():
        torch.manual_seed(7)
        return LoraGroupOn4bit.apply(x, members, p, False, *adapters)

    def reference():
        import bitsandbytes.functional as bnb_functional

        torch.manual_seed(7)
        dropped, _ = torch.native_dropout(x, p, True)
        outs = []
        for b, s, a_w, b_w in zip(bases, scalings, adapters[0::2], adapters[1::2]):
            with torch.no_grad():
                weight = bnb_functional.dequantize_4bit(b.weight.view(-1, 1), b.weight.quant_state)
            outs.append(torch.nn.functional.linear(x, weight, b.bias) + (dropped @ a_w.t() @ b_w.t()) * s)
        return outs

    results = []
    for run in (grouped, reference):
        outs = run()
        torch.autograd.backward(outs, grads_out)
        results.append([torch.cat([o.detach().flatten() for o in outs]), x.grad.clone(),
                        *(t.grad.clone() for t in adapters)])
        for t in (x, *adapters):
            t.grad = None
    for got, want in zip(*results):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_group_member_called_on_another_input_runs_alone(tiny_model_dir, tmp_path):
    model, cfg = lora_model(tiny_model_dir, tmp_path)
    reference = copy.deepcopy(model)
    grouped = grouped_copy(model)
    fuse_lora_layers(reference)
    pick = lambda m: next(a for a in m.modules() if hasattr(a, "q_proj") and hasattr(a, "k_proj"))
    generator = torch.Generator().manual_seed(4)
    x, other = (torch.randn(2, 3, model.config.hidden_size, generator=generator) for _ in range(2))
    group = pick(grouped).q_proj.llm_lora_group
    got = [pick(grouped).q_proj(x), pick(grouped).k_proj(other)]
    assert group.pending[0] is other  # k_proj on `other` dropped the outputs kept for x: the group ran on `other`
    got += [pick(grouped).k_proj(x), pick(grouped).v_proj(x), pick(grouped).q_proj(x)]  # a fresh group on x
    assert group.pending is None  # q, k and v each took theirs
    pick(grouped).q_proj(x)
    assert group.pending is not None
    with torch.no_grad():  # peft's forward runs (no groups): only the model's pre-hook can drop what was left
        grouped(input_ids=torch.tensor([[5, 6, 7]]))
    assert group.pending is None
    want = [pick(reference).q_proj(x), pick(reference).k_proj(other), pick(reference).k_proj(x),
            pick(reference).v_proj(x), pick(reference).q_proj(x)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_attach_lora_groups_by_default_and_a_grouped_run_is_its_own_run(tiny_model_dir, tmp_path):
    from llmhelpers.model.fused_lora import GROUP_ATTR
    from llmhelpers.model.loading import check_lora_matches

    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir),
                      group_lora_inputs=False)
    assert not any(hasattr(m, GROUP_ATTR) for m in attach_lora(load_base_model(cfg), cfg).modules())
    grouped_cfg = cfg.replace(group_lora_inputs=True)
    assert make_config("smoke").group_lora_inputs  # the default since 2026-12-04 (measured on an H200)
    model = attach_lora(load_base_model(grouped_cfg), grouped_cfg)
    groups = {id(getattr(m, GROUP_ATTR)) for m in model.modules() if hasattr(m, GROUP_ATTR)}
    assert len(groups) == 2 * model.config.num_hidden_layers
    # with lora_dropout > 0 a group shares one mask: other draws, other weights, another run
    assert grouped_cfg.run_id != cfg.run_id
    with pytest.raises(ValueError, match="group_lora_inputs"):
        check_lora_matches(model, cfg)
