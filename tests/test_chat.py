"""Chat rendering and encoding: exact prompt/completion text under both R1 template revisions,
one bos, the completion mask, the template's </think> stripping, split_thinking, the mask audit."""
import pytest

from llmhelpers.data.chat import encode, mask_audit, render, split_thinking
from llmhelpers.data.chat import ASSISTANT, BOS, EOS, USER

Q = "What is 6 times 7?\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_render_current_revision_exact(example, tok_current):
    out = render(example, tok_current)
    assert out["prompt"] == f"{BOS}{USER}{Q}{ASSISTANT}<think>\n"
    assert out["completion"] == f"6 * 7 = 42.\n</think>\n\nThe answer is $\\boxed{{42}}$.{EOS}"


def test_render_original_revision_opens_think_itself(example, tok_original):
    out = render(example, tok_original)
    assert out["prompt"] == f"{BOS}{USER}{Q}{ASSISTANT}"
    assert out["completion"] == f"<think>\n6 * 7 = 42.\n</think>\n\nThe answer is $\\boxed{{42}}$.{EOS}"


def test_both_revisions_give_the_same_full_text(example, tok_current, tok_original):
    a, b = render(example, tok_current), render(example, tok_original)
    assert a["prompt"] + a["completion"] == b["prompt"] + b["completion"]
    full = a["prompt"] + a["completion"]
    assert full.count("<think>") == 1 and full.count("</think>") == 1 and full.count(EOS) == 1


def test_prompt_is_what_inference_sees(example, tok_current):
    prompt = tok_current.apply_chat_template([{"role": "user", "content": example.question}],
                                             tokenize=False, add_generation_prompt=True)
    assert render(example, tok_current)["prompt"] == prompt


def test_the_template_itself_would_drop_the_reasoning(example, tok_current):
    # Why the completion is built here: the R1 template deletes everything up to </think>.
    text = tok_current.apply_chat_template(
        [{"role": "user", "content": example.question},
         {"role": "assistant", "content": f"<think>\n{example.reasoning}\n</think>\n\n{example.answer}"}],
        tokenize=False)
    assert example.reasoning not in text
    assert example.reasoning in render(example, tok_current)["completion"]


@pytest.mark.parametrize("rev", ["current", "original"])
def test_encode_has_one_bos_and_masks_the_prompt(example, rev, tok_current, tok_original):
    tok = tok_current if rev == "current" else tok_original
    feats = encode(example, tok)
    ids, mask = feats["input_ids"], feats["completion_mask"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert len(ids) == len(mask)
    n_prompt = mask.index(1)
    assert all(m == 0 for m in mask[:n_prompt]) and all(m == 1 for m in mask[n_prompt:])
    parts = render(example, tok)
    assert tok.decode(ids[:n_prompt]) == parts["prompt"]
    assert tok.decode(ids[n_prompt:]) == parts["completion"]
    assert ids[-1] == tok.eos_token_id  # eos is trained, so the model learns to stop


def test_naive_tokenization_doubles_bos(example, tok_current):
    prompt = render(example, tok_current)["prompt"]
    naive = tok_current(prompt)["input_ids"]  # add_special_tokens=True by default
    assert naive[:2] == [tok_current.bos_token_id] * 2
    assert encode(example, tok_current)["input_ids"].count(tok_current.bos_token_id) == 1


def test_think_tokens_are_single_tokens(tok_current):
    for t in ("<think>", "</think>"):
        assert len(tok_current(t, add_special_tokens=False)["input_ids"]) == 1
    assert "<think>" in tok_current.decode(tok_current("<think>x", add_special_tokens=False)["input_ids"],
                                           skip_special_tokens=True)


@pytest.mark.parametrize("text,expected", [
    ("step 1\n</think>\n\nThe answer is \\boxed{4}.", ("step 1", "The answer is \\boxed{4}.")),
    ("<think>\nstep 1\n</think>\n\n\\boxed{4}", ("step 1", "\\boxed{4}")),
    ("<think>\nstill thinking when the budget ran out", ("still thinking when the budget ran out", "")),
    ("a </think> b </think> final", ("a </think> b", "final")),
    ("", ("", "")),
])
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


def test_mask_audit_marks_trained_tokens(example, tok_current):
    feats = encode(example, tok_current)
    text = mask_audit(feats, tok_current, html_output=False)
    n = len(feats["input_ids"])
    assert f"{n} tokens, {sum(feats['completion_mask'])} trained" in text
    assert "bos count = 1" in text
    body = text.split("\n", 1)[1]
    assert body.index("[[") > body.index("<｜Assistant｜>")
    assert body.rstrip().endswith(f"{EOS}]]")
    html = mask_audit(feats, tok_current, html_output=True)
    assert "#c8f7c5" in html.data


def test_render_without_template_is_a_clear_error(example, tok_current):
    import copy

    tok = copy.deepcopy(tok_current)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        render(example, tok)


TOOL_EXAMPLE = dict(
    question="What is gcd(360, 210)?",
    reasoning="Use math.gcd.\n\n```python\nimport math\nprint(math.gcd(360, 210))\n```\n\n```output\n30\n```\n\n"
              "Checked twice:\n\n```python\nprint(360 % 30, 210 % 30)\n```\n\n```output\n0 0\n```",
    answer="So the answer is $\\boxed{30}$.", gold="30", source="mathcodeinstruct")


@pytest.mark.parametrize("revision", ["current", "original"])
def test_tool_output_is_not_trained_but_the_code_and_the_opening_fence_are(revision, tok_current, tok_original):
    from llmhelpers.data.chat import tool_output_spans
    from llmhelpers.data.examples import Example

    tok = tok_current if revision == "current" else tok_original
    ex = Example(**TOOL_EXAMPLE)
    feats = encode(ex, tok)
    ids, mask = feats["input_ids"], feats["completion_mask"]
    n_prompt = mask.index(1)
    untrained = [i for i in range(n_prompt, len(ids)) if not mask[i]]
    # the untrained completion tokens are exactly the interpreter's text: output plus closing fence, twice
    runs = []
    for i in untrained:
        if not runs or i != runs[-1][1]:
            runs.append([i, i + 1])
        else:
            runs[-1][1] = i + 1
    assert [tok.decode(ids[a:b]) for a, b in runs] == ["30\n```", "0 0\n```"]
    completion = tok.decode(ids[n_prompt:])
    assert [completion[a:b] for a, b in tool_output_spans(completion)] == ["30\n```", "0 0\n```"]
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "```output\n" in trained and "print(math.gcd(360, 210))" in trained and "\\boxed{30}" in trained
    assert "30\n```" not in trained.split("```output\n")[1][:6]
    plain = encode(ex, tok, mask_tool_output=False)
    assert plain["input_ids"] == ids and sum(plain["completion_mask"]) == len(ids) - n_prompt


def test_mask_audit_shows_tool_output_apart(tok_current):
    from llmhelpers.data.examples import Example

    text = mask_audit(encode(Example(**TOOL_EXAMPLE), tok_current), tok_current, html_output=False)
    assert "tool-output tokens masked" in text and "{{30\n```}}" in text and "{{0 0\n```}}" in text
    html = mask_audit(encode(Example(**TOOL_EXAMPLE), tok_current), tok_current, html_output=True).data
    assert "#fde2a7" in html and "amber = tool output" in html
