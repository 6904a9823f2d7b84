"""Attention maps from an eager-attention forward pass, and how much reasoning looks at the question."""
from __future__ import annotations

from .chat import ASSISTANT, END_THINK, THINK, USER, render


def attention_maps(model, tokenizer, example, max_tokens: int = 256):
    """Run prompt + completion through the model; returns (token labels, attentions, spans).

    attentions: one tensor per layer, shape [heads, T, T]. spans: {'question': (a, b),
    'reasoning': (c, d)} token index ranges. The model must be loaded with attn_implementation='eager'.
    """
    import torch

    parts = render(example, tokenizer)
    ids = tokenizer(parts["prompt"] + parts["completion"], add_special_tokens=False)["input_ids"][:max_tokens]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), output_attentions=True)
    if out.attentions is None or out.attentions[0] is None:
        raise RuntimeError("the model returned no attentions: load it with attn_implementation='eager'")
    attentions = [a[0].float().cpu() for a in out.attentions]
    labels = [tokenizer.decode([i]) for i in ids]
    return labels, attentions, token_spans(ids, tokenizer)


def token_spans(ids: list[int], tokenizer) -> dict[str, tuple[int, int]]:
    conv = tokenizer.convert_tokens_to_ids
    user, assistant, think, end_think = conv(USER), conv(ASSISTANT), conv(THINK), conv(END_THINK)
    q0 = ids.index(user) + 1 if user in ids else 0
    q1 = ids.index(assistant) if assistant in ids else len(ids)
    r0 = ids.index(think) + 1 if think in ids else q1 + 1
    r1 = ids.index(end_think) if end_think in ids else len(ids)
    return {"question": (q0, q1), "reasoning": (r0, r1)}


def reasoning_to_question(attentions, spans) -> list[float]:
    """Per layer: the mean share of each reasoning token's attention that lands on question tokens."""
    (q0, q1), (r0, r1) = spans["question"], spans["reasoning"]
    if r1 <= r0 or q1 <= q0:
        return [0.0 for _ in attentions]
    return [float(a[:, r0:r1, q0:q1].sum(-1).mean()) for a in attentions]


def plot_attention(labels, attentions, layers, heads, window: int = 48):
    """Heatmaps for the chosen (layer, head) pairs over the last `window` tokens, with token labels."""
    import matplotlib.pyplot as plt

    pairs = [(l, h) for l in layers for h in heads]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 5), squeeze=False)
    start = max(0, len(labels) - window)
    ticks = [repr(t)[1:-1][:12] for t in labels[start:]]
    for ax, (layer, head) in zip(axes[0], pairs):
        ax.imshow(attentions[layer][head, start:, start:].numpy(), cmap="viridis")
        ax.set_title(f"layer {layer}, head {head}")
        ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=6)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=6)
    fig.tight_layout()
    return fig
