"""The GGUF rows of bench/real_weights.py, on the CPU with llama.cpp (the `llama` extra: llama-cpp-python): the
adapters trained on the GPU merged into the same bf16-converted SmolLM2 base (in the small profile's fp32 compute
dtype), exported as f16 and q8_0 GGUF through `llmhelpers.export`, read back, then run by llama.cpp.

    python bench/real_weights_gguf.py --adapters DIR_OR_PARTS --work /tmp/rw    # writes <work>/gguf.json

- greedy_token_match: the share of 20 held-out prompts on which llama.cpp with the f16 file generates exactly the
  greedy tokens of transformers (the merged model, fp32) up to eos or --max_new_tokens;
- q8_0_answer_match: the share on which the q8_0 file's greedy answer has the same boxed answer, and
  q8_0_code_match the share with the same python block. No interpreter runs here: after its block the model writes
  the "output" itself, a guess where near-ties are common, so the boxed answers diverge more than the code.
Exits non-zero when greedy_token_match < 0.95.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def adapters_from(source: Path, work: Path) -> Path:
    """A folder of saved adapters, or the pieces real_weights.sh wrote (adapters.tar.partNN) joined and unpacked."""
    if (source / "adapter_model.safetensors").is_file():
        return source
    parts = sorted(source.glob("adapters.tar.part*"))
    if not parts:
        raise SystemExit(f"{source}: neither saved adapters nor adapters.tar.part* pieces")
    joined = work / "adapters.tar"
    with open(joined, "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    target = work / "final"
    with tarfile.open(joined) as tar:
        tar.extractall(target, filter="data")
    return target


def python_block(text: str) -> str | None:
    """The answer's first python block: what the model wrote before any (here not executed) output."""
    start = text.find("```python")
    end = text.find("```", start + 9) if start >= 0 else -1
    return text[start:end] if end >= 0 else None


def llama_cpp_greedy(llm, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if token == eos or len(out) == max_new_tokens:
            break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--work", default="/tmp/real-weights")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    args = parser.parse_args()

    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.answers import last_boxed
    from llmhelpers.data.chat import render_prompt
    from llmhelpers.data.sources import load_problem_file
    from llmhelpers.export.gguf import export_gguf, verify_gguf
    from llmhelpers.model.loading import load_tokenizer
    from llmhelpers.model.merging import merge_adapters

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = make_config("small", output_dir=str(work / "outputs"))
    tokenizer = load_tokenizer(cfg)
    adapter_dir = adapters_from(Path(args.adapters), work)
    examples, _ = load_problem_file("data/small/heldout.jsonl")
    examples = examples[:args.prompts]
    check = merge_adapters(cfg, tokenizer, [ex.question for ex in examples[:4]], adapter_dir, work / "merged")
    merged = Path(check["path"])
    files = {t: export_gguf(merged, work / f"small-{t}.gguf", t) for t in ("f16", "q8_0")}
    readback = {t: verify_gguf(p, merged) for t, p in files.items()}
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    rows, token_match, answer_match, code_match = [], 0, 0, 0
    engines = {t: llama_cpp.Llama(model_path=str(p), n_ctx=2048, verbose=False, n_threads=2) for t, p in files.items()}
    for ex in examples:
        prompt = tokenizer(render_prompt(ex, tokenizer), add_special_tokens=False)["input_ids"]
        assert engines["f16"].tokenize(render_prompt(ex, tokenizer).encode(), add_bos=False, special=True) == prompt
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        f16 = llama_cpp_greedy(engines["f16"], prompt, args.max_new_tokens, eos)
        q8 = llama_cpp_greedy(engines["q8_0"], prompt, args.max_new_tokens, eos)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in (hf, f16, q8)]
        answers = [last_boxed(text) for text in texts]
        codes = [python_block(text) for text in texts]
        same = f16 == hf
        first = next((i for i, (a, b) in enumerate(zip(hf, f16)) if a != b), None if same else min(len(hf), len(f16)))
        token_match += same
        answer_match += answers[2] == answers[0]
        code_match += codes[2] == codes[0]
        rows.append({"id": ex.id, "gold": ex.gold, "tokens": len(hf), "f16_same_tokens": same,
                     "first_divergence": first, "answers": dict(zip(("transformers", "f16", "q8_0"), answers)),
                     "texts": dict(zip(("transformers", "f16", "q8_0"), texts))})
    version = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    result = {"greedy_token_match": token_match / len(examples), "q8_0_answer_match": answer_match / len(examples),
              "q8_0_code_match": code_match / len(examples),
              "prompts": len(examples), "max_new_tokens": args.max_new_tokens, "llama_cpp_python": version,
              "merge_check": check, "readback": readback, "where": "CPU (llama.cpp), adapters trained on the GPU",
              "rows": rows}
    (work / "gguf.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2, default=str))
    return 0 if result["greedy_token_match"] >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
