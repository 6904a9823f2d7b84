"""Tool-integrated generation: where a pause happens and what it runs, per-answer sandboxes and their limits, and on a
tiny model trained with masked (deliberately wrong) outputs: it learns to write code, and tool execution makes its
final answer the executed value, on the engine and on the model.generate path."""
import random

import pytest
import torch

from llmhelpers.data.chat import encode, render_prompt
from llmhelpers.data.examples import Example
from llmhelpers.evaluation.grading import final_answer
from llmhelpers.inference.tool_use import ToolRunner, code_to_run


def test_a_pause_happens_only_at_an_opened_output_fence():
    block = "Let me compute.\n\n```python\nx = 6\nprint(x * 7)\n```\n\n```output\n"
    assert code_to_run(block) == "x = 6\nprint(x * 7)\n"
    assert code_to_run("text\n```output\n") == ""  # a fence with no code before it: nothing to run
    assert code_to_run(block + "42\n```\n") is None  # already executed
    assert code_to_run("```python\nprint(1)\n```") is None  # no output fence opened yet
    two = "```python\na = 1\n```\n```output\n\n```\n\nthen\n```python\nprint(a + 1)\n```\n```output\n"
    assert code_to_run(two) == "print(a + 1)\n"  # only the last block


def test_each_answer_has_its_own_state_and_a_call_limit(tok_current):
    with ToolRunner(tok_current, timeout=5, max_calls=2) as tools:
        run = lambda key, code: tok_current.decode(tools.execute(key, f"```python\n{code}\n```\n```output\n"))
        assert run(1, "x = 40") == "\n```"
        assert run(1, "x + 2") == "42\n```"  # state persists within answer 1
        assert run(2, "x").startswith("NameError")  # answer 2 is another interpreter
        assert run(1, "x").startswith("Error: the limit of 2 code executions")
        assert tools.execute(3, "no fence here") and tools.record(3).runs[0].output.startswith("Error: no ```python")
        one, two = tools.record(1), tools.record(2)
        assert (one.calls, one.errors, two.calls, two.errors) == (2, 1, 1, 1)


def test_an_evicted_sandbox_is_rebuilt_from_its_answers_earlier_blocks(tok_current):
    with ToolRunner(tok_current, timeout=5, max_sandboxes=1) as tools:
        run = lambda key, code: tok_current.decode(tools.execute(key, f"```python\n{code}\n```\n```output\n"))
        run(1, "a = 'one'")
        run(2, "a = 'two'")  # only one interpreter may live: answer 1's is closed
        assert len(tools._live) == 1
        assert run(1, "print(a)") == "one\n```"  # rebuilt by re-running answer 1's blocks
        assert run(2, "print(a)") == "two\n```"


def test_timeouts_are_counted_and_the_answer_goes_on(tok_current):
    with ToolRunner(tok_current, timeout=1) as tools:
        out = tok_current.decode(tools.execute(1, "```python\nwhile True: pass\n```\n```output\n"))
        assert out.startswith("TimeoutError") and tools.record(1).timeouts == 1
        assert tok_current.decode(tools.execute(1, "```python\n1 + 1\n```\n```output\n")) == "2\n```"


# --- a tiny model that learns to use the tool ------------------------------------------------------------------
PROBLEMS = [(f"What is {a} times {b}?", f"print({a} * {b})", a * b)
            for a, b in [(6, 7), (3, 9), (4, 8), (5, 5), (7, 8), (9, 9), (2, 6), (8, 3)]]


def _example(question, code, shown):
    return Example(question=question, reasoning=f"I run it.\n\n```python\n{code}\n```\n\n```output\n{shown}\n```",
                   answer=f"\\boxed{{{shown}}}", gold=str(shown), source="mathcodeinstruct")


@pytest.fixture(scope="module")
def tool_user(tok_current):
    """Trained on solutions whose output blocks are deliberately wrong (another problem's value) and masked from
    the loss; the final answer always repeats the shown output. The model can only learn to write each problem's
    code and to copy whatever the output block says."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok, rng = tok_current, random.Random(0)
    values = [v for _, _, v in PROBLEMS]
    rows = []
    for _ in range(400):
        question, code, real = rng.choice(PROBLEMS)
        rows.append(encode(_example(question, code, rng.choice([v for v in values if v != real])), tok,
                           mask_tool_output=True))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch = rng.sample(rows, 16)
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda xs, fill: xs + [fill] * (width - len(xs))
        ids = torch.tensor([pad(r["input_ids"], tok.pad_token_id) for r in batch])
        labels = torch.tensor([pad([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])], -100)
                               for r in batch])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _prompts(tok):
    return [render_prompt(Example(question=q, reasoning="", answer="", gold="", source="x"), tok)
            for q, _, _ in PROBLEMS]


@pytest.mark.slow
def test_masked_training_teaches_code_and_execution_makes_the_answer_the_executed_value(tool_user, tok_current):
    from llmhelpers.inference.generation import generate
    from llmhelpers.inference.sampling import SamplingParams

    greedy = SamplingParams(max_new_tokens=80, temperature=0.0)
    tok = tok_current
    prompts = _prompts(tok)
    with ToolRunner(tok, timeout=5) as tools:
        engine = generate(tool_user, tok, prompts, greedy, tools=tools)  # a plain Qwen2: the engine path
    with ToolRunner(tok, timeout=5) as tools:
        rounds = tools.generate_in_rounds(tool_user, tok, [tok(p, add_special_tokens=False)["input_ids"]
                                                           for p in prompts], greedy, 8, False)
    without = generate(tool_user, tok, prompts, greedy)
    for gens in (engine, rounds):
        assert all(g.tool_calls == 1 and g.tool_errors == 0 for g in gens)  # it learned to write code
        assert [g.tool_runs[0].output for g in gens] == [str(v) for _, _, v in PROBLEMS]  # really executed
        assert all(f"```output\n{v}\n```" in g.text for g, (_, _, v) in zip(gens, PROBLEMS))
        assert all(g.appended_tokens > 0 for g in gens)
        right = sum(final_answer(g.text) == str(v) for g, (_, _, v) in zip(gens, PROBLEMS))
        assert right >= 6, [final_answer(g.text) for g in gens]  # never seen as this problem's output in training
    assert [g.tool_calls for g in without] == [0] * len(PROBLEMS)
    assert sum(final_answer(g.text) == str(v) for g, (_, _, v) in zip(without, PROBLEMS)) <= 2


@pytest.mark.slow
def test_evaluation_reports_tool_calls_and_both_modes(tool_user, tok_current):
    from llmhelpers.config.profiles import make_config
    from llmhelpers.evaluation.protocol import comparison_table, evaluate

    cfg = make_config("smoke", eval_samples=1, eval_do_sample=False, eval_max_new_tokens=80)
    problems = [Example(question=q, reasoning="", answer="", gold=str(v), source="mathcodeinstruct")
                for q, _, v in PROBLEMS]
    with_tools = evaluate(tool_user, tok_current, problems, cfg, "tools", progress=False)
    no_tools = evaluate(tool_user, tok_current, problems, cfg, "no-tools", progress=False, tool_execution=False)
    summary = with_tools.summary()["all"]
    assert summary["tool_calls_per_answer"] == 1.0 and summary["tool_errors"] == 0
    assert with_tools.accuracy >= 0.75 > no_tools.accuracy
    table = comparison_table([with_tools, no_tools])
    assert "tools errors timeouts" in table


def test_a_block_containing_the_python_fence_text_still_runs():
    text = 'Check.\n\n```python\ns = "```python"\nprint(len(s))\n```\n```output\n'
    assert code_to_run(text) == 's = "```python"\nprint(len(s))\n'


def test_one_answers_broken_output_or_failure_stays_that_answers_error(tok_current, monkeypatch):
    with ToolRunner(tok_current, timeout=5) as tools:
        ids = tools.execute(1, "```python\nprint(chr(0xdc80))\n```\n```output\n")  # the tokenizer rejects surrogates
        assert tok_current.decode(ids) == "\\udc80\n```" and tools.record(1).errors == 0
        eos = tok_current.convert_tokens_to_ids("<｜end▁of▁sentence｜>")
        ids = tools.execute(2, "```python\nprint('<｜end▁of▁sentence｜>')\n```\n```output\n")
        assert eos not in ids and tok_current.decode(ids) == "<｜end▁of▁sentence｜>\n```"  # text, not an eos
        monkeypatch.setattr(tools, "_sandbox", lambda key: (_ for _ in ()).throw(MemoryError("no room")))
        ids = tools.execute(3, "```python\n1\n```\n```output\n")
        assert tok_current.decode(ids).startswith("Error: the interpreter failed (MemoryError")
        monkeypatch.setattr(tools, "_run_block", lambda key, code: 1 / 0)
        ids = tools.execute(4, "```python\n1\n```\n```output\n")
        assert tok_current.decode(ids).startswith("Error: the tool call failed (ZeroDivisionError)")
        assert tools.record(4).errors == 1
