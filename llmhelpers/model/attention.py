"""Attention maps from an eager-attention forward pass, and how much reasoning looks at the question."""
from __future__ import annotations

from llmhelpers.data.chat import ASSISTANT, BOS, END_THINK, EOS, THINK, USER, render


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


_SPECIAL_LABELS = {BOS: "<bos>", EOS: "<eos>", USER: "<User>", ASSISTANT: "<Assistant>"}


def readable_token(token: str, drawable: set[int] | None = None) -> str:
    """A tick label: R1's special tokens by short names, whitespace made visible, and characters the
    plotting font cannot draw replaced by '?' (so matplotlib never warns about missing glyphs)."""
    if token in _SPECIAL_LABELS:
        return _SPECIAL_LABELS[token]
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    if text.strip() == "":
        text = "\u2423" * max(1, len(text))  # open box: a visible space
    if drawable is not None:
        text = "".join(c if ord(c) in drawable else "?" for c in text)
    return text[:14]


def _drawable_characters() -> set[int]:
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    return set(FT2Font(findfont(FontProperties())).get_charmap())


def plot_attention(labels, attentions, layers, heads, window: int = 40):
    """Heatmaps for the chosen (layer, head) pairs over the last `window` tokens, one labelled token per row
    and column (queries down, attended-to keys across), with a shared colour scale."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    pairs = [(l, h) for l in layers for h in heads]
    cols = min(2, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 7.5 * rows), squeeze=False)
    start = max(0, len(labels) - window)
    drawable = _drawable_characters()
    ticks = [readable_token(t, drawable) for t in labels[start:]]
    image = None
    for ax, (layer, head) in zip(axes.flat, pairs):
        image = ax.imshow(attentions[layer][head, start:, start:].numpy(), cmap="viridis",
                          norm=PowerNorm(gamma=0.5, vmin=0, vmax=1))  # square-root scale: small weights stay visible
        ax.set_title(f"layer {layer}, head {head}", fontsize=12)
        ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=8, family="monospace")
        ax.set_yticks(range(len(ticks)), ticks, fontsize=8, family="monospace")
        ax.set_xlabel("attended-to token")
        ax.set_ylabel("token")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (square-root scale)")
    return fig
