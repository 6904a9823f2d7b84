"""Batched generation from rendered prompts, with thinking and answer shown apart."""
from __future__ import annotations

from dataclasses import dataclass

from .chat import render_prompt, split_thinking


@dataclass
class Generation:
    text: str  # the new text, special tokens removed (<think> and </think> are kept)
    new_tokens: int  # tokens generated up to and including eos
    hit_budget: bool  # stopped by max_new_tokens rather than by eos
    thinking_tokens: int = 0  # tokens before </think>, or all of them if it never came


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 0.6, top_p: float = 0.95,
             progress: bool = False) -> list[Generation]:
    """Generate for every prompt; batches are formed from prompts of similar length to waste less on padding."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    tokenizer.padding_side = "left"
    end_think = tokenizer.convert_tokens_to_ids("</think>")
    for batch in batches:
        # The template already put bos in the text: add_special_tokens=False avoids a second one.
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in zip(new.tolist(), batch):
            if tokenizer.eos_token_id in row:
                n, hit = row.index(tokenizer.eos_token_id) + 1, False
            else:
                n, hit = len(row), True
            think = row.index(end_think) if end_think in row[:n] else n
            results[i] = Generation(tokenizer.decode(row[:n], skip_special_tokens=True), n, hit, think)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


def auto_batch_size(model, max_tokens: int, cap: int = 256, share: float = 0.7) -> int:
    """How many sequences of `max_tokens` fit their KV cache in `share` of the free GPU memory.

    Measured on an H100 (BENCHMARKS.md): plain generate gets faster up to batch 256, so larger
    batches are the cheapest evaluation speed-up; on CPU a small batch is used.
    """
    import torch

    if not torch.cuda.is_available():
        return 8
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dtype_bytes = 2 if model.dtype in (torch.bfloat16, torch.float16) else 4
    kv_per_seq = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * dtype_bytes * max_tokens
    logits_per_seq = 2 * c.vocab_size * 4  # last-position logits in fp32 plus the sampling copy
    free, _ = torch.cuda.mem_get_info()
    return int(max(1, min(cap, share * free // (kv_per_seq + logits_per_seq))))


def answer_examples(model, tokenizer, examples, cfg, progress: bool = False) -> list[Generation]:
    prompts = [render_prompt(ex, tokenizer) for ex in examples]
    batch = cfg.eval_batch_size
    if not batch:
        longest = max((len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=0)
        batch = auto_batch_size(model, longest + cfg.eval_max_new_tokens)
    return generate(model, tokenizer, prompts, cfg.eval_max_new_tokens, batch, cfg.eval_do_sample,
                    cfg.eval_temperature, cfg.eval_top_p, progress=progress)


def format_generation(question: str, text: str, width: int = 600) -> str:
    """Question, thinking and answer as separate, trimmed sections."""
    thinking, answer = split_thinking(text)
    clip = lambda s: s if len(s) <= width else s[:width] + f" [... {len(s) - width} more chars]"
    return (f"Q: {clip(question.splitlines()[0])}\n"
            f"  thinking: {clip(thinking) or '(none)'}\n"
            f"  answer:   {clip(answer) or '(no answer: thinking not finished)'}")
