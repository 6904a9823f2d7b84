"""Taking the merged model elsewhere: a GGUF file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile.

    python -m llmhelpers.export --model outputs/<name>/runs/<run>/merged --out model.gguf --outtype q8_0

The file is written with the `gguf` package (llama.cpp's own Python writer and reader), so no llama.cpp checkout or
build is needed, and every tensor and metadata field is read back and compared (`verify_gguf`). What llama.cpp needs
for a Qwen2 R1 distill (or a Llama model: R1-Distill-Llama, SmolLM2, with q/k rows reordered as llama.cpp's converter
does): the hyperparameters, every weight under llama.cpp's tensor names, the byte-level BPE
tokenizer (tokens, token types, merges, and the pre-tokenizer name llama.cpp uses for this model family,
"deepseek-r1-qwen"), bos / eos / pad ids and the chat template. Rows of the embedding past the tokenizer's tokens
(the real model has 151,936 rows for 151,665 tokens) become unused "[PAD<i>]" tokens, as llama.cpp's converter
writes them. Norms and biases stay f32 (llama.cpp's convention); `q8_0` quantizes every matrix whose rows are a
multiple of 32.

llama.cpp's own `convert_hf_to_gguf.py` does the same for many more architectures; this one is the default because
it runs from the project's own dependencies and checks what it wrote.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PRE_TOKENIZER = "deepseek-r1-qwen"  # llama.cpp's name for the R1-distill Qwen pre-tokenizer (its regex)
OUTTYPES = ("f16", "bf16", "q8_0")
# transformers architecture -> (llama.cpp architecture, its default pre-tokenizer). A model converted from a GGUF
# (llmhelpers.model.gguf_source) keeps its source's pre-tokenizer name (SmolLM2: "smollm") in gguf_source.json.
ARCHITECTURES = {"Qwen2ForCausalLM": ("QWEN2", PRE_TOKENIZER), "LlamaForCausalLM": ("LLAMA", "llama-bpe")}


def architecture(config: dict, model_dir: Path) -> str:
    for name in config.get("architectures") or []:
        if name in ARCHITECTURES:
            return name
    raise ValueError(f"{model_dir} holds {config.get('architectures')}; this exporter writes "
                     f"{' or '.join(ARCHITECTURES)}")


def rope_theta(config: dict) -> float:
    """transformers 5 keeps it under rope_parameters (the 14B/32B distills: 1e6); older configs at the top level."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def default_pre_tokenizer(model_dir: Path, arch: str) -> str:
    stamp = Path(model_dir) / "gguf_source.json"
    if stamp.is_file():
        pre = json.loads(stamp.read_text()).get("tokenizer_pre")
        if pre:
            return pre
    return ARCHITECTURES[arch][1]


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama_permute(data, heads: int):
    """llama.cpp's Llama graph rotates interleaved pairs; transformers' rotates halves: its convert_hf_to_gguf.py
    reorders the rows of q_proj and k_proj per head, and so does this (Qwen2 uses the halves layout there too)."""
    return data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _as_written(name: str, data, arch: str, config: dict):
    if arch == "LlamaForCausalLM":
        if name.endswith("self_attn.q_proj.weight"):
            return llama_permute(data, config["num_attention_heads"])
        if name.endswith("self_attn.k_proj.weight"):
            return llama_permute(data, config["num_key_value_heads"])
    return data


def _types(outtype: str):
    import gguf

    return {"f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
            "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
            "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}[outtype]


def _looks_special(token: str) -> bool:
    return bool(re.fullmatch(r"<[|｜].*[|｜]>", token))


def vocabulary(tokenizer, rows: int) -> tuple[list[str], list[int]]:
    """Token strings (byte-level BPE form) and llama.cpp token types for every embedding row."""
    import gguf

    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows: "
                         "a token without a row cannot be exported (llama.cpp refuses it too)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special or _looks_special(added[i].content)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def merges(model_dir: Path) -> list[str]:
    model = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{model_dir}/tokenizer.json is a {model.get('type')} tokenizer; GGUF export expects BPE")
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def _weights(model_dir: Path):
    """(name, float32 numpy array) of every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no .safetensors weights: merge the adapters first (merge_adapters)")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float().numpy()


def _encode(data, outtype: str):
    """(array to write, its GGML type): f32 for vectors, the chosen type for matrices."""
    import gguf
    import numpy as np

    _, qtype = _types(outtype)
    if data.ndim == 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if outtype == "f16":
        return data.astype(np.float16), qtype
    if outtype == "q8_0" and data.shape[-1] % 32:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def check_destination(model_dir: Path, out: Path, overwrite: bool = False) -> None:
    """Refuse what would lose files: a folder as the output, a file of the model folder, an existing file unless
    `overwrite`, and a model folder that holds adapters instead of a merged model."""
    if (model_dir / "adapter_config.json").exists() and not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} holds LoRA adapters, not a merged model: merge first (merge_after_training, "
                         "or merge_adapters in the notebook), then export its merged/ folder")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json is missing: give the merged model's folder")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give the .gguf file to write")
    if out.resolve().parent == model_dir.resolve() and out.suffix != ".gguf":
        raise ValueError(f"--out {out} would write into the model folder over a file that is not a .gguf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")


def export_gguf(model_dir, out, outtype: str = "q8_0", pre_tokenizer: str | None = None,
                overwrite: bool = True) -> Path:
    """Write the merged model in `model_dir` (config.json, safetensors, tokenizer) as one GGUF file. A failed write
    leaves no file behind (not even the temporary one)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    model_dir, out = Path(model_dir), Path(out)
    check_destination(model_dir, out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        return _write_gguf(model_dir, out, tmp, outtype, pre_tokenizer)
    except OSError as err:  # a full disk, a file-size limit: one line, and no half-written file
        raise ValueError(f"writing {out} failed: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_gguf(model_dir: Path, out: Path, tmp: Path, outtype: str, pre_tokenizer: str | None) -> Path:
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    arch = architecture(config, model_dir)
    gguf_arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch][0])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, types = vocabulary(tokenizer, config["vocab_size"])
    names = gguf.get_tensor_name_map(gguf_arch, config["num_hidden_layers"])
    file_type, _ = _types(outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf_arch])
    writer.add_name(model_dir.parent.name if model_dir.name == "merged" else model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope_theta(config))
    if arch == "LlamaForCausalLM":
        writer.add_rope_dimension_count(_head_dim(config))
        writer.add_vocab_size(config["vocab_size"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or default_pre_tokenizer(model_dir, arch))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(model_dir))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))  # R1's tokenizer puts bos first; ChatML's (SmolLM2) does not
    writer.add_chat_template(tokenizer.chat_template)
    for name, data in _weights(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no llama.cpp name for tensor {name}")
        if not np.isfinite(data).all():
            writer.close()
            raise ValueError(f"tensor {name} holds NaN or infinite values: the model is broken; nothing exported")
        encoded, qtype = _encode(_as_written(name, data, arch, config), outtype)
        writer.add_tensor(new, encoded, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)  # a cut-off export never looks complete
    return out


def adds_bos(tokenizer) -> bool:
    """Whether plain tokenization puts bos in front (llama.cpp's add_bos_token)."""
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


# --- reading it back -----------------------------------------------------------------------------------------------
def gguf_metadata(path) -> dict:
    """Every metadata field of a GGUF file as Python values."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _tolerance(qtype, reference):
    """Largest allowed |written - reference| for each element, by the type it was written in."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.zeros_like(reference)
    if qtype == T.F16:
        return np.abs(reference) * 2.0 ** -11 + 6e-8  # half an f16 step (and f16's smallest subnormal)
    if qtype == T.BF16:
        return np.abs(reference) * 2.0 ** -8  # half a bf16 step
    if qtype == T.Q8_0:  # half a quantization step of each block of 32, plus up to 127 times the f16 rounding of the
        blocks = reference.reshape(*reference.shape[:-1], -1, 32)  # block's scale (q = round(x / scale), |q| <= 127)
        step = np.abs(blocks).max(axis=-1, keepdims=True) / 127
        return np.broadcast_to(step * (0.5 + 127 * 2.0 ** -11) + 1e-7, blocks.shape).reshape(reference.shape)
    raise ValueError(f"no tolerance for {qtype.name}")


def verify_gguf(path, model_dir) -> dict:
    """Read the file back: every tensor dequantized against the safetensors weights (within the tolerance of the
    type it was written in), and the metadata against config.json and the tokenizer. Raises on any difference."""
    import gguf
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = gguf_metadata(path)
    tokens, types = vocabulary(tokenizer, config["vocab_size"])
    arch = architecture(config, model_dir)
    gguf_arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch][0])
    a = gguf.MODEL_ARCH_NAMES[gguf_arch]
    expected = {
        "general.architecture": a, f"{a}.block_count": config["num_hidden_layers"],
        f"{a}.context_length": config["max_position_embeddings"], f"{a}.embedding_length": config["hidden_size"],
        f"{a}.feed_forward_length": config["intermediate_size"],
        f"{a}.attention.head_count": config["num_attention_heads"],
        f"{a}.attention.head_count_kv": config["num_key_value_heads"],
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges(model_dir), "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id, "tokenizer.chat_template": tokenizer.chat_template,
        "tokenizer.ggml.add_bos_token": adds_bos(tokenizer),
    }
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    for key, value in ((f"{a}.rope.freq_base", rope_theta(config)),
                       (f"{a}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])):
        if abs(meta.get(key, float("nan")) - value) > 1e-6 * abs(value):
            wrong.append(key)
    if wrong:
        raise ValueError(f"{path}: metadata differs from the model folder: {wrong}")
    names = gguf.get_tensor_name_map(gguf_arch, config["num_hidden_layers"])
    written = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    worst, checked = {}, 0
    for name, reference in _weights(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        tensor = written.pop(names.get_name(name, try_suffixes=(".weight", ".bias")))
        reference = _as_written(name, reference, arch, config)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(reference.shape)
        excess = abs(values - reference) - _tolerance(tensor.tensor_type, reference)
        if (excess > 0).any():
            raise ValueError(f"{path}: tensor {name} ({tensor.tensor_type.name}) differs beyond its tolerance by up "
                             f"to {float(excess.max()):.3g}")
        kind = tensor.tensor_type.name
        worst[kind] = max(worst.get(kind, 0.0), float(abs(values - reference).max()))
        checked += 1
    if written:
        raise ValueError(f"{path}: tensors not in the model folder: {sorted(written)}")
    return {"tensors": checked, "max_abs_error_by_type": worst, "tokens": len(tokens), "metadata_fields": len(meta)}


# --- Ollama --------------------------------------------------------------------------------------------------------
# The R1 chat format for Ollama's Go templates, rendering what HF's template renders for a chat that ends with a user
# turn: the system text first, user turns after <｜User｜>, the generation prompt of the current template revision
# (the assistant tag, "<think>" and a newline). An earlier assistant turn keeps only its answer, as HF's template
# keeps what follows "</think>": Ollama stores a thinking model's reasoning in the message's Thinking field, apart
# from its Content, and "\n\n" stands where the reasoning ended. The `<think>…{{ .Thinking }}…</think>` list inside
# the range over Messages is what makes Ollama treat the model as a thinking one and infer the two tags; a last
# assistant message (a prefill to continue) keeps its reasoning. llama.cpp puts the bos in front (add_bos_token).
# tests/test_export.py renders these with Go's text/template and compares them with apply_chat_template.
OLLAMA_TEMPLATE = (
    "{{- if .System }}{{ .System }}{{ end }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{- if eq .Role \"user\" }}<｜User｜>{{ .Content }}"
    "{{- else if eq .Role \"assistant\" }}<｜Assistant｜>"
    "{{- if and $last .Thinking }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}"
    "{{- if and (not $last) .Thinking }}{{ \"\\n\\n\" }}{{ end }}"
    "{{- .Content }}{{ if not $last }}<｜end▁of▁sentence｜>{{ end }}"
    "{{- end }}"
    "{{- if and $last (ne .Role \"assistant\") }}<｜Assistant｜><think>\n{{ end }}"
    "{{- end }}"
)
# ChatML (SmolLM2 and other Llama models with <|im_start|> turns), with SmolLM2's default system turn when the chat
# has none. Ollama keeps system messages among .Messages (and also joins them into .System): they are rendered from
# the range only. The R1 markers are text for these models (llmhelpers.data.chat): Ollama sees no thinking model, and
# earlier turns keep their reasoning, as SmolLM2's HF template does.
OLLAMA_CHATML_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}"
    "{{- if and (eq $i 0) (ne .Role \"system\") }}"
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{{ end }}"
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


def write_modelfile(gguf_path, context: int = 16384) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create <name> -f Modelfile`. Sampling as the model's authors
    evaluate it (temperature 0.6, top-p 0.95); a context that leaves room for long thinking."""
    gguf_path = Path(gguf_path)
    chatml = "<|im_start|>" in (gguf_metadata(gguf_path).get("tokenizer.chat_template") or "")
    template, stops = ((OLLAMA_CHATML_TEMPLATE, ("<|im_end|>", "<|im_start|>")) if chatml else
                       (OLLAMA_TEMPLATE, ("<｜end▁of▁sentence｜>", "<｜User｜>")))
    text = (f"FROM ./{gguf_path.name}\n"
            f'TEMPLATE """{template}"""\n'
            + "".join(f'PARAMETER stop "{stop}"\n' for stop in stops) +
            "PARAMETER temperature 0.6\n"
            "PARAMETER top_p 0.95\n"
            f"PARAMETER num_ctx {context}\n")
    path = gguf_path.with_name("Modelfile")
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmhelpers.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=["gguf"], default="gguf")
    parser.add_argument("--model", required=True, help="the merged model folder (merge_adapters' merged/ folder)")
    parser.add_argument("--out", required=True, help="the .gguf file to write (a Modelfile is written beside it)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="q8_0")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file and Modelfile")
    args = parser.parse_args(argv)
    modelfile = Path(args.out).with_name("Modelfile")
    try:
        if modelfile.exists() and not args.overwrite:
            raise FileExistsError(f"{modelfile} exists: pass --overwrite to replace it (and the .gguf)")
        path = export_gguf(args.model, args.out, args.outtype, overwrite=args.overwrite)
        report = verify_gguf(path, args.model)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.stderr.write(f"{parser.prog}: error: {err}\n")
        return 1
    modelfile = write_modelfile(path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.outtype}) and {modelfile}; read back: "
          f"{report['tensors']} tensors within tolerance, max |error| by type {report['max_abs_error_by_type']}")
    return 0


if __name__ == "__main__":  # `python -m llmhelpers.export.gguf` works as `python -m llmhelpers.export` does
    raise SystemExit(main())
