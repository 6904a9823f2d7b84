"""Chat rendering and tokenization: the exact text and features training and inference use.

The R1 chat template deletes everything up to the last `</think>` of an assistant turn, so
rendering a full conversation through it would throw the reasoning away. Instead the
prompt is rendered by the tokenizer's own template with the generation prompt (exactly what
inference sees) and the completion is built here, so that it is right under both template
revisions: the original prompt ends with `<｜Assistant｜>` and the completion must open
`<think>`; the current one already ends with `<｜Assistant｜><think>\\n`.
"""
from __future__ import annotations

import html
import re

from llmhelpers.data.examples import Example

# The R1 tokenizer's special tokens, as the model's tokenizer.json spells them.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"


def prompt_messages(example: Example) -> list[dict]:
    # The model's authors recommend no system prompt: all instructions sit in the user turn.
    return [{"role": "user", "content": example.question}]


def render_prompt(example: Example, tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; load the R1 tokenizer (or build_tiny_r1) instead")
    return tokenizer.apply_chat_template(prompt_messages(example), tokenize=False, add_generation_prompt=True)


def prompt_opens_think(prompt: str) -> bool:
    """True for the current template revision, whose generation prompt ends with `<think>\\n`."""
    return prompt.rstrip().endswith(THINK)


def render(example: Example, tokenizer) -> dict[str, str]:
    """{"prompt", "completion"}: prompt from the template, completion = reasoning, answer, eos."""
    prompt = render_prompt(example, tokenizer)
    body = f"{example.reasoning.strip()}\n{END_THINK}\n\n{example.answer.strip()}{tokenizer.eos_token}"
    completion = body if prompt_opens_think(prompt) else f"{THINK}\n{body}"
    return {"prompt": prompt, "completion": completion}


# An executed block's output, as MathCodeInstruct writes it: the model writes the opening fence, the interpreter
# writes what follows (the output and the closing fence). Group 1 starts where the interpreter's part starts.
TOOL_OUTPUT = re.compile(r"```output\n(.*?```)", re.DOTALL)


def tool_output_spans(text: str) -> list[tuple[int, int]]:
    """Character ranges written by the interpreter, not the model: each output block's content and closing fence."""
    return [m.span(1) for m in TOOL_OUTPUT.finditer(text)]


def encode(example: Example, tokenizer, mask_tool_output: bool = True) -> dict[str, list[int]]:
    """Token ids and a mask that is 1 on the trained tokens (reasoning, answer, eos).

    Prompt and completion are tokenized separately, with add_special_tokens=False: the
    template already put the one bos at the start, and the prompt tokens are then exactly
    those that generation starts from. With mask_tool_output, tokens inside an executed block's
    output (after "```output\\n", up to and including the closing fence) are not trained: the
    model learns to write code and open the output fence, not to predict what the interpreter prints.
    """
    parts = render(example, tokenizer)
    prompt_ids = tokenizer(parts["prompt"], add_special_tokens=False)["input_ids"]
    enc = tokenizer(parts["completion"], add_special_tokens=False, return_offsets_mapping=mask_tool_output)
    completion_ids = enc["input_ids"]
    trained = [1] * len(completion_ids)
    if mask_tool_output:
        spans = tool_output_spans(parts["completion"])
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and any(lo <= a and b <= hi for lo, hi in spans):
                trained[i] = 0
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + trained,
    }


def split_thinking(text: str) -> tuple[str, str]:
    """Split a model output into (thinking, answer).

    Works whether or not the output repeats the opening `<think>` (it does not under the
    current template, whose prompt already holds it). With no `</think>` the model ran out
    of budget while thinking: everything is thinking and the answer is empty.
    """
    head, sep, tail = text.rpartition(END_THINK)
    if not sep:
        head, tail = text, ""
    head = head.strip()
    if head.startswith(THINK):
        head = head[len(THINK):]
    return head.strip(), tail.strip()


def mask_audit(features: dict[str, list[int]], tokenizer, html_output: bool | None = None, max_tokens: int = 400):
    """Show one encoded example with trained tokens marked.

    Returns an IPython HTML object inside Jupyter (trained tokens highlighted green), else
    plain text with trained spans wrapped in [[ ]]. Counts are printed in both forms.
    """
    ids, mask = features["input_ids"], features["completion_mask"]
    first = mask.index(1) if 1 in mask else len(mask)  # masked tokens after this are tool output
    kinds = [1 if m else (0 if i < first else 2) for i, m in enumerate(mask)]  # 1 trained, 0 prompt, 2 tool output
    pieces = [(tokenizer.decode([i]), k) for i, k in zip(ids[:max_tokens], kinds[:max_tokens])]
    tool = kinds.count(2)
    summary = (f"{len(ids)} tokens, {sum(mask)} trained ({sum(mask) / max(len(ids), 1):.0%}), "
               f"{first} prompt tokens masked, {tool} tool-output tokens masked; "
               f"bos count = {ids.count(tokenizer.bos_token_id)}")
    if len(ids) > max_tokens:
        summary += f"; showing the first {max_tokens}"
    if html_output is None:
        html_output = _in_notebook()
    if html_output:
        from IPython.display import HTML

        colours = {1: "#c8f7c5", 0: "#eee", 2: "#fde2a7"}
        spans = "".join(f'<span style="background:{colours[k]}">{html.escape(p)}</span>' for p, k in pieces)
        return HTML(f"<p><b>{html.escape(summary)}</b> (green = trained, grey = prompt, amber = tool output, "
                    "written by the interpreter: not trained)</p>"
                    f'<pre style="white-space:pre-wrap">{spans}</pre>')
    out, current = [], 0
    marks = {1: ("[[", "]]"), 2: ("{{", "}}"), 0: ("", "")}
    for piece, k in pieces:
        if k != current:
            out.append(marks[current][1] + marks[k][0])
            current = k
        out.append(piece)
    out.append(marks[current][1])
    return f"{summary} ([[ ]] = trained, {{{{ }}}} = tool output, not trained)\n" + "".join(out)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def clip_text(s: str, width: int) -> str:
    """`s` cut at `width` characters, saying how many were left out."""
    return s if len(s) <= width else s[:width] + f" [... {len(s) - width} more chars]"


def format_generation(question: str, text: str, width: int = 600) -> str:
    """Question, thinking and answer as separate, trimmed sections."""
    thinking, answer = split_thinking(text)
    clip = lambda s: clip_text(s, width)
    return (f"Q: {clip(question.splitlines()[0])}\n"
            f"  thinking: {clip(thinking) or '(none)'}\n"
            f"  answer:   {clip(answer) or '(no answer: thinking not finished)'}")
