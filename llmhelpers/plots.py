"""Matplotlib figures for the notebook: token lengths, loss curves, attention heatmaps."""
from __future__ import annotations


def length_histogram(lengths: list[int], max_example_tokens: int, ax=None):
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3))[1]
    ax.hist(lengths, bins=40, color="#4c72b0")
    ax.axvline(max_example_tokens, color="red", linestyle="--", label=f"max_example_tokens={max_example_tokens}")
    ax.set(xlabel="tokens per example", ylabel="examples",
           title=f"{len(lengths)} examples kept (train + eval), each at most max_example_tokens")
    ax.legend()
    return ax.figure


def reward_curve(history: dict[str, list], ax=None):
    """GRPO's mean rewards per step (llmhelpers.training.grpo.reward_history): the weighted total and each reward."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax = ax or plt.subplots(figsize=(7, 3))[1]
    ax.plot(history["step"], history["reward"], label="reward (weighted)")
    for name in ("correct", "format"):
        if any(v is not None for v in history[name]):
            ax.plot(history["step"], history[name], label=name, alpha=0.7)
    ax.set(xlabel="optimizer step", ylabel="mean reward", title="GRPO rewards")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return ax.figure


def loss_curve(history: dict[str, list], ax=None):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax = ax or plt.subplots(figsize=(7, 3))[1]
    ax.plot(history["step"], history["loss"], label="train loss")
    if history["eval_step"]:
        ax.plot(history["eval_step"], history["eval_loss"], "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 2.5, 7.5 ticks
    ax.legend()
    return ax.figure
