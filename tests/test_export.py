"""Taking the model elsewhere: GGUF written with the gguf package and read back (every tensor within its type's
tolerance, every metadata field equal), embedding rows past the tokenizer as unused tokens, a corrupted file or a
changed model refused, the Ollama Modelfile, the model card's Hub metadata, the Hub push's arguments; and, where
llama-cpp-python is installed, llama.cpp itself on the exported file."""
import json
import os
import shutil
from pathlib import Path

import pytest

from llmhelpers.export.gguf import OLLAMA_TEMPLATE, OUTTYPES, export_gguf, gguf_metadata, main, verify_gguf


def test_the_tiny_models_tokenizer_has_a_row_for_every_token(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tiny_model_dir)) == AutoConfig.from_pretrained(tiny_model_dir).vocab_size


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_an_exported_file_reads_back_as_the_model(tiny_model_dir, tmp_path, outtype):
    from transformers import AutoTokenizer

    path = export_gguf(tiny_model_dir, tmp_path / f"model-{outtype}.gguf", outtype)
    report = verify_gguf(path, tiny_model_dir)
    assert report["tensors"] == 27 and report["tokens"] == 1026
    kinds = set(report["max_abs_error_by_type"])
    assert kinds == {"F32", {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]}  # vectors stay f32
    meta = gguf_metadata(path)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert meta["tokenizer.ggml.pre"] == "deepseek-r1-qwen" and meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.tokens"][tok.convert_tokens_to_ids("<think>")] == "<think>"
    assert meta["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # CONTROL
    assert meta["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<think>")] == 4  # USER_DEFINED, as llama.cpp
    assert not list(tmp_path.glob(".*tmp"))


def test_rows_past_the_tokenizer_become_unused_tokens(tiny_model_dir, tmp_path):
    """The real R1 model has 151,936 embedding rows for 151,665 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(1088, mean_resizing=False)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(padded)
    path = export_gguf(padded, tmp_path / "padded.gguf", "f16")
    verify_gguf(path, padded)
    meta = gguf_metadata(path)
    assert len(meta["tokenizer.ggml.tokens"]) == 1088 and meta["tokenizer.ggml.tokens"][1087] == "[PAD1087]"
    assert set(meta["tokenizer.ggml.token_type"][1026:]) == {5}  # UNUSED


def test_a_changed_model_or_a_bad_tokenizer_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = export_gguf(tiny_model_dir, tmp_path / "model.gguf", "q8_0")
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    weights = load_file(changed / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, :32] += 0.05  # one block, a few quantization steps
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj.weight .Q8_0. differs beyond its tolerance"):
        verify_gguf(path, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="1026 tokens but the model only 1000 embedding rows"):
        export_gguf(changed, tmp_path / "bad.gguf")


def test_the_command_line_writes_the_file_and_a_modelfile(tiny_model_dir, tmp_path, capsys):
    assert main(["--format", "gguf", "--model", str(tiny_model_dir), "--out", str(tmp_path / "m.gguf"),
                 "--outtype", "f16"]) == 0
    assert "27 tensors within tolerance" in capsys.readouterr().out
    modelfile = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<｜end▁of▁sentence｜>"' in modelfile
    assert "PARAMETER temperature 0.6" in modelfile and "PARAMETER top_p 0.95" in modelfile
    assert "<｜Assistant｜><think>\n" in modelfile and "num_ctx 16384" in modelfile
    assert f'TEMPLATE """{OLLAMA_TEMPLATE}"""' in modelfile  # the template test_the_ollama_templates_... renders
    assert main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.gguf")]) == 1


CHATS = [
    [{"role": "user", "content": "What is 6 * 7?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 6 * 7?"}],
    [{"role": "user", "content": "What is 6 * 7?"},
     {"role": "assistant", "thinking": "Six sevens.\n```python\nprint(6 * 7)\n```", "content": "\\boxed{42}"},
     {"role": "user", "content": "And 6 * 8?"}],
]


@pytest.mark.parametrize("kind", ["r1", "chatml"])
def test_the_ollama_templates_render_what_the_hf_templates_render(kind, tok_current, tmp_path):
    """Issue #29: the Modelfile's template dropped the newline after <think> (one token short of HF's prompt) and
    kept earlier turns' reasoning, which HF's template removes. Rendered here by Go's own text/template, as Ollama
    renders it, and compared with apply_chat_template, text and token ids."""
    import shutil
    import subprocess

    from llmhelpers.export.gguf import OLLAMA_CHATML_TEMPLATE
    from llmhelpers.model.tiny import build_chatml_tokenizer

    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (.ci/run installs golang-go)")
    tok, template = (tok_current, OLLAMA_TEMPLATE) if kind == "r1" else (build_chatml_tokenizer(),
                                                                          OLLAMA_CHATML_TEMPLATE)
    (tmp_path / "template").write_text(template, encoding="utf-8")
    renderer = Path(__file__).parent / "go" / "render_ollama_template.go"
    for chat in CHATS:
        with_reasoning = [{"role": m["role"], "content": f"<think>\n{m['thinking']}\n</think>\n\n{m['content']}"
                           if m.get("thinking") else m["content"]} for m in chat]
        hf = tok.apply_chat_template(with_reasoning, tokenize=False, add_generation_prompt=True)
        if kind == "r1":
            hf = hf.removeprefix(tok.bos_token)  # llama.cpp puts the bos in front (add_bos_token)
            sent = chat  # Ollama keeps a thinking model's reasoning in the Thinking field
        else:
            sent = with_reasoning  # no thinking model for Ollama: the reasoning is text of the content
        go_env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
        proc = subprocess.run([go, "run", str(renderer), str(tmp_path / "template")], input=json.dumps(sent),
                              capture_output=True, text=True, timeout=300, env=go_env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == hf
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
        assert encode(proc.stdout) == encode(hf)
    if kind == "r1":
        assert "Six sevens" not in proc.stdout and "<｜Assistant｜>\n\n\\boxed{42}<｜end▁of▁sentence｜>" in proc.stdout
        assert "<think>\n{{ .Thinking }}\n</think>" in template  # Ollama infers its thinking tags from this


def test_the_model_card_has_valid_hub_metadata_and_the_evaluation(tmp_path):
    from huggingface_hub import ModelCard

    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import DataReport
    from llmhelpers.evaluation.protocol import EvalResult, EvalRow
    from llmhelpers.export.model_card import push_to_hub, write_model_card

    cfg = make_config("full", learning_rate=1e-4)
    report = DataReport()
    report.sources["mathcodeinstruct"].rows, report.sources["mathcodeinstruct"].train = 15000, 13400
    row = lambda correct: EvalRow(id="1", source="math", question="q", gold="1", output="", correct=correct,
                                  finished_thinking=True, answered=True, thinking_tokens=100, new_tokens=120,
                                  hit_budget=False, final="1")
    results = [EvalResult("base", [row(False), row(True)]), EvalResult("finetuned", [row(True), row(True)])]
    path = write_model_card(tmp_path, cfg, "adapters", report, results)
    card = ModelCard.load(path)
    assert card.data.base_model == cfg.model_id and card.data.library_name == "peft"
    assert "MathLLMs/MathCodeInstruct" in card.data.datasets and card.data.license == "mit"
    assert "| mathcodeinstruct | 15000 |" in card.text and "| finetuned | 1 | 2 | 100.0% |" in card.text
    assert "`learning_rate=0.0001`" in card.text and "temperature 0.6" in card.text
    assert "finetuned-no-tools" in card.text
    local = ModelCard.load(write_model_card(tmp_path / "small", make_config("small"), "adapters", report, results))
    assert local.data.datasets is None and "MathLLMs/MathCodeInstruct" not in local.text  # issue #29
    assert "local rows in MathCodeInstruct's schema (`train.jsonl`" in local.text

    calls = []

    class Api:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))

    assert push_to_hub(tmp_path, "me/r1-lora", api=Api()) == "https://huggingface.co/me/r1-lora"
    assert calls == [("create", "me/r1-lora", True, True), ("upload", str(tmp_path), "me/r1-lora")]


def test_llama_cpp_reads_the_file_tokenizes_like_transformers_and_generates_the_same(tiny_model_dir, tmp_path):
    """Needs the optional `llama` extra (llama-cpp-python, which compiles llama.cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers loads the tiny tokenizer as a Qwen2 one (Qwen's split: digits one by one), as the real R1's
    path = export_gguf(tiny_model_dir, tmp_path / "model.gguf", "f16")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 6 * 7?"}], tokenize=False,
                                   add_generation_prompt=True) + "Let me compute.\n```python\nprint(6 * 7)\n```\n```output\n42\n```"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok(chat, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tok(chat, add_special_tokens=False)["input_ids"][:40]
    from conftest import greedy_tokens_match

    assert greedy_tokens_match(llm, model, prompt)


def test_the_export_refuses_what_would_lose_files_or_ship_a_broken_model(tiny_model_dir, tmp_path, capsys):
    """Issue #29: NaN weights were exported and "verified"; --out at the model's own safetensors overwrote them; an
    existing file and a hand-written Modelfile were replaced silently; a folder as --out left a hidden temp file; an
    adapter folder got "config.json is missing"; the --help example `python -m llmhelpers.export.gguf` did nothing."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    model = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, model)
    source = (model / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not a .gguf"):
        export_gguf(model, model / "model.safetensors", "f16")
    assert (model / "model.safetensors").read_bytes() == source
    with pytest.raises(ValueError, match="is a folder"):
        export_gguf(model, tmp_path, "f16")
    out = tmp_path / "m.gguf"
    assert main(["--model", str(model), "--out", str(out), "--outtype", "f16"]) == 0
    (tmp_path / "Modelfile").write_text("my own Modelfile\n")
    assert main(["--model", str(model), "--out", str(out), "--outtype", "f16"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "Modelfile").read_text() == "my own Modelfile\n"
    assert main(["--model", str(model), "--out", str(out), "--outtype", "f16", "--overwrite"]) == 0
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj.weight holds NaN"):
        export_gguf(model, tmp_path / "nan.gguf", "q8_0")
    assert not (tmp_path / "nan.gguf").exists() and not list(tmp_path.glob(".*.tmp"))
    adapters = tmp_path / "final"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="merge first"):
        export_gguf(adapters, tmp_path / "a.gguf")
    help_text = subprocess.run([sys.executable, "-m", "llmhelpers.export.gguf", "--help"], capture_output=True,
                               text=True).stdout
    assert "--overwrite" in help_text and "python -m llmhelpers.export --model" in help_text
