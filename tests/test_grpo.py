"""The GRPO stage (llmhelpers.config.grpo, llmhelpers.training.grpo): TRL's GRPOTrainer in a run of the project's, on
the smoke profile's tiny 4-bit model with LoRA on the CPU: steps run, rewards are computed and logged, the run keeps
its folder, lock, records and index entry, and a run interrupted and re-run trains what the uninterrupted run trained.
"""
from __future__ import annotations

import json

import pytest

from conftest import interrupted_and_rerun
from llmhelpers.config.grpo import GRPORunConfig, make_grpo_config
from llmhelpers.config.profiles import make_config

PROBLEMS = "data/small/heldout.jsonl"


def sft_config(out, tiny_model_dir, **changes):
    return make_config("smoke", output_dir=str(out), tiny_model_dir=str(tiny_model_dir), accuracy_callback=False,
                       **changes)


def grpo_run(tiny_trainer, out, tiny_model_dir, interrupt_at=None, **changes):
    """A GRPO run of the smoke recipe (3 steps, a checkpoint after each) on 4 problems; with interrupt_at, a
    KeyboardInterrupt (Kernel > Interrupt) after that step, then train() again on the same trainer, as a re-run cell."""
    from llmhelpers.training.grpo import build_grpo_trainer, load_problems
    from llmhelpers.training.rewards import SafeReward, reward_functions, rl_dataset
    from llmhelpers.training.run import run_training

    trainer, cfg, tok, _ = tiny_trainer(sft_config(out, tiny_model_dir))
    rl_cfg = make_grpo_config(cfg, start_from="base", problems=PROBLEMS, max_problems=4, max_steps=3,
                              logging_steps=1, mask_truncated_completions=False, learning_rate=1e-2, **changes)
    # the tiny random model never answers correctly: a reward that differs between its answers makes the steps learn
    variety = SafeReward(lambda text, row: len(set(text)) / 16, "correct")
    rl = build_grpo_trainer(rl_cfg, trainer.model, tok, rl_dataset(load_problems(rl_cfg), tok),
                            reward_funcs=[variety, reward_functions()[1]])
    message = interrupted_and_rerun(rl, rl_cfg, interrupt_at) if interrupt_at else None
    result = run_training(rl, rl_cfg)
    weights = {n: p.detach().clone() for n, p in rl.model.named_parameters() if p.requires_grad}
    return rl, rl_cfg, result, weights, message


def test_a_grpo_run_trains_its_steps_with_the_rewards_logged_and_keeps_its_records(tmp_path, tiny_model_dir,
                                                                                 tiny_trainer):
    from llmhelpers.training.grpo import reward_history
    from llmhelpers.training.runs import read_index

    rl, rl_cfg, result, _, _ = grpo_run(tiny_trainer, tmp_path / "out", tiny_model_dir)
    assert result.global_step == 3
    curve = reward_history(rl)
    assert curve["step"] == [1, 2, 3] and all(r > 0 for r in curve["reward"])
    assert all(c is not None for c in curve["correct"] + curve["format"])  # each reward logged apart
    run_dir = rl_cfg.run_dir
    assert run_dir.name.startswith("grpo-lr") and run_dir.parent == tmp_path / "out" / "runs"
    assert (run_dir / "run_complete.json").exists() and (run_dir / "checkpoint-3" / "checkpoint_complete.json").exists()
    saved = GRPORunConfig.load(run_dir / "grpo_config.json")
    assert saved.run_name == rl_cfg.run_name  # the saved config names the same run
    entry = read_index(tmp_path / "out")[rl_cfg.run_name]
    assert entry["status"] == "finished" and entry["settings"]["stage"] == "grpo"


def test_an_interrupted_grpo_run_re_run_trains_what_the_uninterrupted_run_trained(tmp_path, tiny_model_dir,
                                                                                 tiny_trainer):
    import torch

    clean, _, clean_result, clean_weights, _ = grpo_run(tiny_trainer, tmp_path / "a", tiny_model_dir)
    rl, _, result, weights, message = grpo_run(tiny_trainer, tmp_path / "b", tiny_model_dir, interrupt_at=2)
    assert "interrupted at step 2 of 3: kept" in message and "checkpoint-1 (step 1)" in message
    assert result.global_step == 3
    start = {n: p for n, p in clean_weights.items()}
    assert any(float(w.abs().max()) > 0 for n, w in start.items() if "lora_B" in n)  # the steps trained something
    assert all(torch.equal(w, clean_weights[n]) for n, w in weights.items())  # bit for bit
    rewards = lambda t: [(r["step"], r["reward"]) for r in t.state.log_history if "reward" in r]
    assert rewards(rl)[-1] == rewards(clean)[-1]  # step 3 drew the same answers after the resume


def test_a_finished_grpo_run_re_run_trains_nothing_and_a_changed_setting_is_a_new_run(tmp_path, tiny_model_dir,
                                                                                    tiny_trainer, capsys):
    from llmhelpers.training.grpo import build_grpo_trainer, load_problems
    from llmhelpers.training.rewards import rl_dataset
    from llmhelpers.training.run import run_training

    rl, rl_cfg, _, weights, _ = grpo_run(tiny_trainer, tmp_path / "out", tiny_model_dir)
    again = build_grpo_trainer(rl_cfg, rl.model, rl.processing_class,
                               rl_dataset(load_problems(rl_cfg), rl.processing_class))
    run_training(again, rl_cfg)
    assert "this run already finished at step 3: nothing trained" in capsys.readouterr().out
    assert rl_cfg.replace(learning_rate=1e-4).run_name != rl_cfg.run_name
    assert rl_cfg.replace(logging_steps=5).run_name == rl_cfg.run_name  # how often it logs is not what it trains
    assert rl_cfg.replace(tool_rollouts=False).run_name != rl_cfg.run_name


def test_grpo_starts_from_the_sft_runs_saved_adapters(tmp_path, tiny_model_dir, tiny_trainer):
    """start_from="sft": a new GRPO run's policy is the SFT run's final/ adapters, loaded into the LoRA layers the
    trainer optimizes (not fresh weights)."""
    import torch

    from llmhelpers.training.grpo import build_grpo_trainer, load_problems
    from llmhelpers.training.rewards import rl_dataset
    from llmhelpers.training.run import TrainingRun, reset_adapters, save_adapters

    trainer, cfg, tok, _ = tiny_trainer(sft_config(tmp_path / "out", tiny_model_dir))
    model = trainer.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * (hash(name) % 7 + 1))  # "trained" adapters, unlike any fresh draw
    sft_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_adapters(model, tok, cfg)
    reset_adapters(model, 0)
    rl_cfg = make_grpo_config(cfg, problems=PROBLEMS, max_problems=2)
    assert rl_cfg.start_adapters == cfg.final_dir
    rl = build_grpo_trainer(rl_cfg, model, tok, rl_dataset(load_problems(rl_cfg), tok))
    with TrainingRun(rl, rl_cfg):
        loaded = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert loaded.keys() == sft_weights.keys()
    assert all(torch.equal(loaded[n], w) for n, w in sft_weights.items())


def test_rollouts_return_one_answer_per_prompt_with_the_interpreters_tokens_masked(tokenizer_and_rollouts):
    tok, rollouts, trainer, fake = tokenizer_and_rollouts
    out = rollouts(["p1", "p1"], trainer)
    assert set(out) == {"prompt_ids", "completion_ids", "logprobs", "env_mask"}
    assert out["completion_ids"] == [g.ids for g in fake]
    assert out["env_mask"][0] == [1, 1, 0, 0, 0, 1] and out["env_mask"][1] == [1] * 3
    assert trainer._metrics["train"]["tools/calls_per_answer"] == [0.5]


def test_each_step_draws_with_its_own_seed_the_same_after_a_resume(tokenizer_and_rollouts):
    tok, rollouts, trainer, _ = tokenizer_and_rollouts
    seeds = {}
    for step in (5, 6, 7):
        trainer.state.global_step = step
        rollouts(["p"], trainer)
        seeds[step] = rollouts.seen_seed
    assert len(set(seeds.values())) == 3
    trainer.model.training = False  # an evaluation's rollouts draw apart from the training step's
    rollouts(["p"], trainer)
    assert rollouts.seen_seed not in seeds.values()
    trainer.model.training = True
    trainer.state.global_step = 6  # resumed at step 6: the same answers as the first time
    rollouts(["p"], trainer)
    assert rollouts.seen_seed == seeds[6]


@pytest.fixture
def tokenizer_and_rollouts(tok_current, tmp_path, monkeypatch):
    """ProjectRollouts with the generation replaced by fixed answers: one with an interpreter output at 2..4."""
    from collections import defaultdict
    from types import SimpleNamespace

    import llmhelpers.inference.generation as generation
    from llmhelpers.inference.generation import Generation
    from llmhelpers.training.grpo import ProjectRollouts

    fake = [Generation("a", 6, False, ids=[5, 6, 7, 8, 9, 10], tool_calls=1, appended_spans=[(2, 3)]),
            Generation("b", 3, False, ids=[11, 12, 13])]
    rollouts = ProjectRollouts(tok_current, SimpleNamespace(tool_rollouts=True, sft_run=None, engine_rollouts="off"))

    def generate(model, tokenizer, texts, sampling, tools=None):
        rollouts.seen_seed = sampling.seed
        return fake[:len(texts)]

    monkeypatch.setattr(generation, "generate", generate)
    monkeypatch.setattr("llmhelpers.inference.tool_use.tool_runner", lambda *a, **k: __import__("contextlib").nullcontext())
    args = SimpleNamespace(seed=42, max_completion_length=8, temperature=0.6, top_p=0.95, process_index=0)
    trainer = SimpleNamespace(args=args, state=SimpleNamespace(global_step=0), model=SimpleNamespace(training=True),
                              _metrics={"train": defaultdict(list)})
    return tok_current, rollouts, trainer, fake


def test_the_tool_rounds_of_model_generate_mark_where_the_interpreter_wrote(tok_current):
    """generate_in_rounds (the 4-bit training model's path): the output the sandbox appended is recorded as a span of
    the answer's ids, so a policy loss can leave it out."""
    import torch

    from llmhelpers.inference.sampling import SamplingParams
    from llmhelpers.inference.tool_use import ToolRunner

    tok = tok_current
    script = ["```python\nprint(6*7)\n```\n```output\n", "The answer is \\boxed{42}."]

    class Scripted(torch.nn.Module):
        """model.generate that says the script's next piece (then eos)."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.turn = 0

        def generate(self, input_ids, attention_mask=None, **kwargs):
            piece = tok(script[self.turn], add_special_tokens=False)["input_ids"]
            piece += [tok.eos_token_id] if self.turn == len(script) - 1 else []
            self.turn += 1
            return torch.cat([input_ids, torch.tensor([piece])], dim=1)

    prompt = tok("Question: 6*7?", add_special_tokens=False)["input_ids"]
    with ToolRunner(tok, timeout=10, workers=1) as tools:
        (answer,) = tools.generate_in_rounds(Scripted(), tok, [prompt], SamplingParams(max_new_tokens=64), 1, False)
    assert answer.tool_calls == 1 and len(answer.appended_spans) == 1
    start, length = answer.appended_spans[0]
    assert tok.decode(answer.ids[start:start + length]).strip().startswith("42")
    assert answer.model_token_mask().count(0) == length
    assert tok.decode(answer.ids[:start]).endswith("```output\n")
    assert "\\boxed{42}" in tok.decode(answer.ids[start + length:])


def test_a_grpo_config_refuses_what_it_cannot_run(tmp_path, tiny_model_dir):
    cfg = sft_config(tmp_path, tiny_model_dir)
    with pytest.raises(ValueError, match="start_from='nowhere' is invalid"):
        make_grpo_config(cfg, start_from="nowhere")
    with pytest.raises(ValueError, match="two weights"):
        make_grpo_config(cfg, reward_weights=[1.0])
    with pytest.raises(ValueError, match="unknown GRPO setting"):
        make_grpo_config(cfg).replace(learning_rat=1)
    assert json.loads(json.dumps(make_grpo_config(cfg).to_dict()))["grpo"]["num_generations"] == 2


def test_the_command_line_trains_resumes_and_refuses_problems_without_answers(tmp_path, tiny_model_dir, capsys):
    from llmhelpers.rl import main

    saved = sft_config(tmp_path / "out", tiny_model_dir).save(tmp_path / "sft.json")
    flags = ["--config", str(saved), "--start_from", "base", "--problems", PROBLEMS, "--max_problems", "2",
             "--max_steps", "1", "--learning_rate", "1e-3", "--reward_weights", "1.0", "0.5"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["global_step"] == 1 and len(result["reward_curve"]["reward"]) == 1
    saved_cfg = GRPORunConfig.load(tmp_path / "out" / "runs" / result["run_dir"].split("/")[-1] / "grpo_config.json")
    assert saved_cfg.grpo.learning_rate == 1e-3 and saved_cfg.grpo.reward_weights == [1.0, 0.5]
    assert (tmp_path / "out" / "runs" / result["run_dir"].split("/")[-1] / "final" / "adapter_model.safetensors").exists()
    assert main(flags + ["--evaluate"]) == 0  # re-run: finished, nothing trained, the adapters kept, then graded
    out = capsys.readouterr().out
    assert "already finished at step 1" in out and "\ngrpo " in out  # the table, on the SFT run's evaluation set
    assert set(json.loads(out.split("RESULT ", 1)[1])["accuracy"]) == {"grpo"}
    no_gold = tmp_path / "no_gold.jsonl"
    no_gold.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "content": "2+2?"}]},
                                                {"role": "assistant", "content": [{"type": "text",
                                                                                   "content": "four"}]}]}) + "\n")
    assert main(flags[:4] + ["--problems", str(no_gold)]) == 1
    err = capsys.readouterr().err
    # refused before the model loads: the error, then the data report counting why the row was dropped
    assert err.startswith("llmhelpers.rl: error: no usable problems in") and "1 x no_final_answer" in err
    with pytest.raises(SystemExit) as exit_:
        main(flags + ["--num_generation", "4"])
    assert exit_.value.code == 2 and "did you mean --num_generations" in capsys.readouterr().err


@pytest.mark.parametrize("profile", ["full", "smoke", "small"])
def test_the_notebooks_grpo_cell_is_the_recipe(profile, tmp_path, tiny_model_dir):
    """The GRPOConfig written out in LLM.ipynb's GRPO section and GRPO_RECIPE (what the command line reads) are one
    recipe: the cell, with each profile's changes, gives the run make_grpo_config gives."""
    import os

    import nbformat

    from llmhelpers.config.grpo import apply_grpo_profile

    nb = nbformat.read("LLM.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "grpo-recipe" in c.metadata.get("tags", [])]
    extra = {"tiny_model_dir": str(tiny_model_dir)} if profile == "smoke" else {}
    cfg = make_config(profile, **extra)
    namespace = {"os": os, "PROFILE": profile, "cfg": cfg, "make_grpo_config": make_grpo_config,
                 "apply_grpo_profile": apply_grpo_profile, "GRPOConfig": __import__("trl").GRPOConfig,
                 "torch": __import__("torch"), "print": lambda *a: None}
    exec(cell.source, namespace)
    rl_cfg = make_grpo_config(cfg, namespace["grpo_config"], start_from="sft", tool_rollouts=cfg.tool_execution)
    assert rl_cfg.run_id == make_grpo_config(cfg, tool_rollouts=cfg.tool_execution).run_id


def test_the_merged_policy_computes_what_the_4bit_model_with_adapters_computes(tiny_trainer, tok_current):
    """MergedPolicy (the engine's copy of the policy): the same logits as the training model, before and after the
    adapters change (refresh), and the engine's greedy answers from it are the training model's model.generate ones."""
    import torch

    from llmhelpers.inference.engine import supports
    from llmhelpers.inference.generation import generate
    from llmhelpers.inference.sampling import SamplingParams
    from llmhelpers.model.merging import MergedPolicy

    trainer, cfg, tok, _ = tiny_trainer()
    model = trainer.model.eval()
    ids = torch.tensor([tok("Compute 2+2. <think>", add_special_tokens=False)["input_ids"]])

    def gap(merged):
        with torch.no_grad():
            return float((model(ids).logits - merged.model(ids).logits).abs().max())

    merged = MergedPolicy(model)
    assert supports(merged.model) and merged.dtype == torch.float32
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)  # adapters that change the answers
    assert gap(merged) > 1e-2  # stale until refreshed
    merged.refresh()
    assert gap(merged) < 1e-4
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts = ["Compute 2+2.", "What is 7*6?"]
    assert [g.ids for g in generate(merged.model, tok, prompts, greedy)] == \
        [g.ids for g in generate(model, tok, prompts, greedy)]


def test_an_interrupted_grpo_run_on_engine_rollouts_re_run_is_the_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                                  tiny_trainer):
    import torch

    clean, _, _, clean_weights, _ = grpo_run(tiny_trainer, tmp_path / "a", tiny_model_dir, engine_rollouts="on")
    assert clean.rollout_func.merged is not None and clean.rollout_func.merged_step == 2  # refreshed each step
    rl, _, result, weights, _ = grpo_run(tiny_trainer, tmp_path / "b", tiny_model_dir, interrupt_at=2,
                                         engine_rollouts="on")
    assert result.global_step == 3
    assert all(torch.equal(w, clean_weights[n]) for n, w in weights.items())


def test_grpo_from_an_sft_run_whose_adapters_were_not_saved_starts_from_its_final_checkpoint(tmp_path, tiny_model_dir,
                                                                                             tiny_trainer):
    """The SFT training cell re-run after an interrupt, the save cell not run: GRPO (start_from="sft") starts from
    the adapters the finished run trained, which its final checkpoint holds; before the run finished, one line says
    what to do."""
    import torch

    from llmhelpers.training.checkpoints import NoTrainedAdapters
    from llmhelpers.training.grpo import build_grpo_trainer, load_problems
    from llmhelpers.training.rewards import rl_dataset
    from llmhelpers.training.run import TrainingRun, reset_adapters, run_training

    cfg = sft_config(tmp_path / "out", tiny_model_dir, max_steps=4, save_steps=2, eval_steps=2,
                     load_best_model_at_end=False)
    trainer, cfg, tok, _ = tiny_trainer(cfg)
    rl_cfg = make_grpo_config(cfg, problems=PROBLEMS, max_problems=2)
    rl = build_grpo_trainer(rl_cfg, trainer.model, tok, rl_dataset(load_problems(rl_cfg), tok))
    with pytest.raises(NoTrainedAdapters, match=r"has not finished .*\(start_from='base'\)"):
        with TrainingRun(rl, rl_cfg):
            pass
    run_training(trainer, cfg)  # the SFT trainer trains after a GRPO trainer was built on its model: its forward back
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not cfg.final_dir.exists()
    reset_adapters(trainer.model, 0)
    with TrainingRun(rl, rl_cfg):
        loaded = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(loaded[n], w) for n, w in trained.items())
