"""Tiny, locally built stand-ins: for DeepSeek-R1-Distill-Qwen-1.5B (`build_tiny_r1`) and for a Llama model with a
ChatML tokenizer that is not R1's, as SmolLM2 has (`build_tiny_llama`, for the tests of every path on Llama).

The smoke profile, the tests and the command line all use `build_tiny_r1` so that the
real loading code (tokenizer from disk, 4-bit NF4 model from safetensors) runs without
network. The tokenizer carries the R1 special tokens and an R1-style chat template in
either published revision; the model is a randomly initialised Qwen2ForCausalLM with the
same layer types (q/k/v/o, gate/up/down, untied lm_head) as the real one, only smaller.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmhelpers.data.chat import ASSISTANT, BOS, END_THINK, EOS, THINK, USER

# The R1 template's behaviour, reduced to what matters for SFT: bos first, a system
# message as raw text, user turns after <｜User｜>, assistant turns after <｜Assistant｜>
# ending in eos with everything up to the last </think> deleted, and a generation prompt
# that differs between the two published revisions.
_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '__GEN_PROMPT__' }}{% endif %}"
)
GENERATION_PROMPTS = {
    "original": ASSISTANT,  # first published revision
    "current": ASSISTANT + THINK + "\n",  # later revision forces the model to open <think>
}

TINY_MODEL_ID = "llmhelpers/tiny-r1"

# Text the tiny BPE is trained on: enough to give it ordinary merges for the sample data.
_EXTRA_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "The unit of the answer is",
    "```python\nprint(x)\n```\n```output\n42\n```",
    "0123456789 + - * / = ( ) [ ] { } \\frac \\sqrt \\times 10^{-3} \\mathrm{~m}",
]


def chat_template(revision: str = "current") -> str:
    if revision not in GENERATION_PROMPTS:
        raise ValueError(f"template revision must be one of {sorted(GENERATION_PROMPTS)}, got {revision!r}")
    return _TEMPLATE.replace("__GEN_PROMPT__", GENERATION_PROMPTS[revision].replace("\n", "\\n"))


def _corpus(samples_dir: Path | None) -> list[str]:
    texts = list(_EXTRA_CORPUS)
    if samples_dir is not None and samples_dir.is_dir():
        for path in sorted(samples_dir.glob("*.jsonl")):
            texts.extend(path.read_text(encoding="utf-8").splitlines())
    return texts


def build_tokenizer(revision: str = "current", vocab_size: int = 1024, samples_dir: Path | None = None):
    """A byte-level BPE tokenizer with the R1 special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llmhelpers.paths import samples_dir as default_samples_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS, BOS, USER, ASSISTANT],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(samples_dir or default_samples_dir()), trainer=trainer)
    # As in the real tokenizer, <think> and </think> are added but not "special": they
    # survive skip_special_tokens=True when decoding.
    tok.add_tokens([AddedToken(THINK, special=False, normalized=False), AddedToken(END_THINK, special=False, normalized=False)])
    # Like the real tokenizer, plain tokenization prepends bos: rendering with the template
    # and then tokenizing with add_special_tokens=True gives a double bos.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        chat_template=chat_template(revision),
        padding_side="left",
    )


def build_tiny_r1(path: str | Path, revision: str = "current", seed: int = 0, hidden_size: int = 64,
                  num_layers: int = 2, init_std: float = 0.3, force: bool = False) -> Path:
    """Build (once) and save a tiny R1-style tokenizer and Qwen2 model at `path`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    stamp = path / "tiny_r1.json"
    spec = {"revision": revision, "seed": seed, "hidden_size": hidden_size, "num_layers": num_layers,
            "init_std": init_std, "tokenizer": 2}  # 2: no unknown token added at load (see below)
    if not force and stamp.exists() and json.loads(stamp.read_text()) == spec:
        return path
    tokenizer = build_tokenizer(revision)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the real model (12 q heads, 2 kv heads)
        max_position_embeddings=4096,
        # Wider than the usual 0.02 so that LoRA, with the lm_head frozen as in QLoRA, can move
        # the logits far enough for the loss to fall (at 0.02 they stay near-uniform).
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # As in the real R1 tokenizer_config.json, no unknown token: otherwise AutoTokenizer loads it as a
    # Qwen2Tokenizer whose default unk_token "<|endoftext|>" is added as token 1026, one past the embedding rows
    # (llama.cpp's converter, and any exporter, refuse a tokenizer larger than the model's vocabulary).
    config_path = path / "tokenizer_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "unk_token": None}, indent=2, ensure_ascii=False))
    stamp.write_text(json.dumps(spec))
    return path


# SmolLM2-Instruct's chat template (ChatML with a default system turn), as its GGUF carries it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_chatml_tokenizer(vocab_size: int = 1024, samples_dir: Path | None = None):
    """A byte-level BPE tokenizer with ChatML's special tokens and SmolLM2's template, and no R1 marker among its
    tokens: `<think>` and `</think>` are text of several tokens, as in SmolLM2's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmhelpers.paths import samples_dir as default_samples_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=CHATML_SPECIAL, show_progress=False)
    tok.train_from_iterator(_corpus(samples_dir or default_samples_dir()), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                                   padding_side="left")


def build_tiny_llama(path: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     init_std: float = 0.3, force: bool = False) -> Path:
    """Build (once) and save a tiny LlamaForCausalLM (no biases, tied embeddings, as SmolLM2) with a ChatML
    tokenizer at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    stamp = path / "tiny_llama.json"
    spec = {"seed": seed, "hidden_size": hidden_size, "num_layers": num_layers, "init_std": init_std, "tokenizer": 1}
    if not force and stamp.exists() and json.loads(stamp.read_text()) == spec:
        return path
    tokenizer = build_chatml_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=4096, initializer_range=init_std, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    stamp.write_text(json.dumps(spec))
    return path
