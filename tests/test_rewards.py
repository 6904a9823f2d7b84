"""The GRPO rewards (llmhelpers.training.rewards): the project's grading as TRL reward functions, safe for a run."""
import math

import pytest

from llmhelpers.data.examples import Example
from llmhelpers.training.rewards import SafeReward, answer_format, correct, reward_functions, rl_dataset


def columns(*examples):
    return {"gold": [e.gold for e in examples], "source": [e.source for e in examples],
            "unit": [e.unit for e in examples], "unit_exponent": [e.unit_exponent for e in examples]}


MATH = Example("What is 1/2 + 1/4?", "", "", "\\frac{3}{4}", "mathcodeinstruct")
SCIENCE = Example("A speed?", "", "", "2.5", "scibench/fund", unit="m/s", unit_exponent=3)


def test_correct_accepts_equivalent_forms_and_the_science_tolerance():
    texts = ["I add.</think>The answer is \\boxed{0.75}",  # math-verify: 3/4 == 0.75
             "I add.</think>\\boxed{\\frac{6}{8}}",
             "I add.</think>\\boxed{0.7}",
             "still thinking \\boxed{0.75}",  # never closed its thinking: no answer
             "</think>\\boxed{2600}",  # within 5% of the true value, 2.5 x 10^3 (as evaluation grades it)
             "</think>\\boxed{2.7e3}"]
    golds = [MATH] * 4 + [SCIENCE] * 2
    reward = SafeReward(correct, "correct")
    assert reward(prompts=[""] * 6, completions=texts, **columns(*golds)) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert reward.failures == 0


def test_format_wants_closed_thinking_and_exactly_one_boxed_answer():
    assert [answer_format(t, {}) for t in ("a</think>\\boxed{1}", "a</think>\\boxed{1} or \\boxed{2}", "a \\boxed{1}",
                                           "a</think>1")] == [1.0, 0.0, 0.0, 0.0]


def test_conversational_completions_are_read_as_their_assistant_text():
    reward = SafeReward(correct, "correct")
    chat = [[{"role": "assistant", "content": "ok</think>\\boxed{3/4}"}]]
    assert reward(prompts=[""], completions=chat, **columns(MATH)) == [1.0]


def test_a_reward_that_raises_or_is_nan_gives_that_completion_0_and_is_counted():
    def flaky(text, row):
        if "boom" in text:
            raise RuntimeError("the grader broke")
        return math.nan if "nan" in text else 1.0

    reward = SafeReward(flaky, "flaky")
    with pytest.warns(RuntimeWarning, match=r"reward flaky: 2 of 3 completions could not be scored and get 0 \(2 so "
                                            r"far in this run\); the first: RuntimeError: the grader broke"):
        assert reward(prompts=["", "", ""], completions=["boom", "fine", "nan"]) == [0.0, 1.0, 0.0]
    with pytest.warns(RuntimeWarning, match=r"1 of 1 .*\(3 so far"):
        reward(prompts=[""], completions=["boom"])
    assert reward.failures == 3


def test_the_rewards_are_named_for_their_logs_in_the_order_of_the_weights():
    assert [r.__name__ for r in reward_functions()] == ["correct", "format"]


def test_a_dataset_without_gold_answers_is_refused_in_one_line_and_missing_ones_are_counted(tok_current, capsys):
    no_gold = Example("Why?", "", "", "", "mathcodeinstruct")
    with pytest.raises(ValueError, match="none of the 2 problems has a gold answer: GRPO rewards correctness"):
        rl_dataset([no_gold, no_gold], tok_current)
    ds = rl_dataset([MATH, no_gold, SCIENCE], tok_current)
    assert "1 of 3 problems have no gold answer and are left out" in capsys.readouterr().out
    assert ds.num_rows == 2 and ds["gold"] == ["\\frac{3}{4}", "2.5"] and ds["unit_exponent"] == [0, 3]
    assert ds["prompt"][0].endswith("<think>\n") and "1/2 + 1/4" in ds["prompt"][0]


def test_trls_grpo_trainer_runs_a_step_on_the_tiny_4bit_model_with_these_rewards(tmp_path, tiny_trainer):
    """TRL's GRPOTrainer on the smoke profile's 4-bit model with LoRA: the rewards get each completion with its
    problem's gold columns, and each is logged apart (rewards/<name>/mean)."""
    from trl import GRPOConfig, GRPOTrainer

    trainer, cfg, tok, data = tiny_trainer()
    seen = []

    def recording(text, row):
        seen.append((text, row))
        return correct(text, row)

    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=2, max_completion_length=8,
                      per_device_train_batch_size=2, max_steps=2, use_cpu=True, bf16=False, report_to="none",
                      logging_steps=1, reward_weights=[1.0, 0.1], save_strategy="no")
    grpo = GRPOTrainer(model=trainer.model, reward_funcs=[SafeReward(recording, "correct"), reward_functions()[1]],
                       args=args, train_dataset=rl_dataset(list(data.train_examples)[:4], tok), processing_class=tok)
    grpo.train()
    golds = {e.gold for e in data.train_examples}
    assert len(seen) == 2 * 2 and all(  # 2 steps of 2 completions (one prompt, num_generations=2)
        row["gold"] in golds and row["source"] for _, row in seen)
    logged = grpo.state.log_history[0]
    assert {"rewards/correct/mean", "rewards/format/mean", "reward"} <= logged.keys()
