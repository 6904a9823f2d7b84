"""The real QLoRA path on a tiny model: 4-bit NF4 base, LoRA, SFTTrainer on our encoded features,
resume from the last complete checkpoint, atomic adapter saves, merge check, attention maps, and
proof of learning (greedy decoding gives <think>...</think> and the right boxed answer)."""
import json

import pytest
import torch
from transformers import TrainerCallback

from llmhelpers.data.chat import encode, render_prompt
from llmhelpers.config.profiles import make_config
from llmhelpers.data.sources import DataBundle, DataReport, Example
from llmhelpers.inference.generation import generate
from llmhelpers.inference.sampling import SamplingParams
from llmhelpers.evaluation.grading import is_correct
from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
from llmhelpers.training.checkpoints import choose_resume_checkpoint, is_complete_checkpoint, last_complete_checkpoint
from llmhelpers.training.run import log_history, prepare_run, run_training, save_adapters, start_over
from llmhelpers.training.trainer import build_trainer


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture
def cfg(tmp_path, tiny_model_dir):
    return make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir),
                       accuracy_callback=False, max_steps=8, eval_steps=4, save_steps=4)


def test_base_is_4bit_nf4_and_only_lora_trains(cfg):
    import bitsandbytes as bnb

    model = load_base_model(cfg)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q,k,v,o,gate,up,down in each of 2 layers
    assert linear4[0].weight.quant_state.quant_type == "nf4"
    model = attach_lora(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)


def test_trainer_consumes_encode_features(cfg, tiny_trainer):
    trainer, _, tok, data = tiny_trainer(cfg)
    row = trainer.train_dataset[0]
    ref = encode(data.train_examples[0], tok)
    assert row["input_ids"] == ref["input_ids"]
    assert row["labels"] == [i if m else -100 for i, m in zip(ref["input_ids"], ref["completion_mask"])]


def test_train_resume_and_save(cfg, tiny_trainer):
    trainer, _, tok, data = tiny_trainer(cfg)
    out = run_training(trainer, cfg)
    assert out.global_step == cfg.sft.max_steps
    run = cfg.run_dir
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert json.loads((run / "finetune_config.json").read_text())["sft"]["learning_rate"] == cfg.sft.learning_rate
    events = list(run.rglob("events.out.tfevents.*"))
    assert events, "TensorBoard events were not written"

    # A kill during the last save leaves a checkpoint that was never marked complete.
    (run / "checkpoint-8" / "checkpoint_complete.json").unlink()
    (run / "run_complete.json").unlink()
    assert not is_complete_checkpoint(run / "checkpoint-8")
    assert last_complete_checkpoint(run).name == "checkpoint-4"
    assert (run / "checkpoint-8").exists()  # looking never moves anything
    assert choose_resume_checkpoint(run).name == "checkpoint-4"
    assert not (run / "checkpoint-8").exists() and list(run.glob("incomplete-checkpoint-8-*"))

    trainer2, _, _, _ = tiny_trainer(cfg)
    steps_run = StepRecorder()
    trainer2.add_callback(steps_run)
    out2 = run_training(trainer2, cfg)
    assert out2.global_step == cfg.sft.max_steps
    assert steps_run.steps == [5, 6, 7, 8]  # resumed after step 4: no step trained twice

    path = save_adapters(trainer2.model, tok, cfg)
    assert (path / "adapter_model.safetensors").exists() and (path / "finetune_config.json").exists()
    assert not list(path.parent.glob(".final.tmp-*"))


def test_the_flop_estimate_counts_the_parameters_once_per_train_call(cfg, tiny_trainer):
    """transformers counted the model's parameters (a walk over every module) at each step for its FLOP estimate:
    the trainer counts them once per train() call, and the estimate is the same number."""
    from transformers import Trainer

    trainer, *_ = tiny_trainer(cfg)
    count = trainer.model.num_parameters
    calls = []
    trainer.model.num_parameters = lambda **kw: calls.append(kw) or count(**kw)
    run_training(trainer, cfg)
    assert len(calls) == 1 and cfg.sft.max_steps == 8
    inputs = {"input_ids": torch.zeros(2, 7, dtype=torch.long)}
    assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) > 0


def test_changed_hyperparameter_gets_its_own_run_and_start_over_moves_aside(cfg):
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "checkpoint-4").mkdir()
    other = cfg.replace(learning_rate=1e-4)
    assert other.run_dir != cfg.run_dir
    assert prepare_run(other) is None
    start_over(cfg)
    assert prepare_run(cfg) is None
    assert list(cfg.run_dir.parent.glob(f"{cfg.run_name}-old-*/checkpoint-4"))


@pytest.mark.slow
def test_training_teaches_format_and_answers(tmp_path, tiny_model_dir):
    """Same code path as the notebook, on four short problems: 300 steps take ~20 s on 2 CPU cores."""
    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), max_steps=300,
                      learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, lora_dropout=0.0,
                      r=32, lora_alpha=64, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      eval_steps=300, save_steps=300, logging_steps=10, accuracy_callback=False)
    tok = load_tokenizer(cfg)
    examples = [Example(question=f"What is {a} plus {b}?", reasoning=f"{a} + {b} = {a + b}.",
                        answer=f"The answer is $\\boxed{{{a + b}}}$.", gold=str(a + b), source="mathcodeinstruct")
                for a, b in [(2, 3), (10, 7), (4, 4), (6, 9)]]
    feats = [encode(e, tok) for e in examples]
    from datasets import Dataset

    ds = Dataset.from_dict({k: [f[k] for f in feats] for k in ("input_ids", "completion_mask")})
    data = DataBundle(ds, ds, examples, examples, [], DataReport())
    trainer = build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), tok, data)
    run_training(trainer, cfg)
    losses = log_history(trainer)["loss"]
    assert losses[-1] < 0.1 * losses[0], f"loss fell only from {losses[0]:.3f} to {losses[-1]:.3f}"
    gens = generate(trainer.model, tok, [render_prompt(e, tok) for e in examples],
                    SamplingParams(max_new_tokens=40, temperature=0.0))
    for ex, g in zip(examples, gens):
        assert "</think>" in g.text and not g.hit_budget
        assert is_correct(g.text, ex), g.text


def test_merge_matches_adapter_logits(cfg, tiny_trainer):
    from llmhelpers.model.merging import merge_adapters

    trainer, _, tok, data = tiny_trainer(cfg.replace(max_steps=4, save_steps=4, eval_steps=4))
    run_training(trainer, trainer_cfg := cfg.replace(max_steps=4, save_steps=4, eval_steps=4))
    # Make the adapter non-trivial so that a wrong merge would show.
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapter_dir = save_adapters(trainer.model, tok, trainer_cfg)
    texts = [render_prompt(e, tok) for e in data.eval_examples[:2]]
    check = merge_adapters(trainer_cfg, tok, texts, adapter_dir)
    assert check["path"] == str(trainer_cfg.run_dir / "merged")
    assert check["ok"], check
    assert check["top1_agreement"] == 1.0 and check["mean_abs_diff"] < 1e-4
    from safetensors import safe_open

    with safe_open(f"{check['path']}/model.safetensors", "pt") as f:
        assert not any("lora" in k for k in f.keys())
    # The merged model is the trained one: the adapters on the 4-bit base give its logits. Merged into the original
    # weights instead (the NF4 rounding left out), they do not.
    from transformers import AutoModelForCausalLM

    from llmhelpers.model.loading import add_adapters

    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"].bool()
    trained_model = trainer.model.eval()
    merged = AutoModelForCausalLM.from_pretrained(check["path"], dtype=torch.float32).eval()
    naive = add_adapters(load_base_model(trainer_cfg, quantized=False), adapter_dir, trainer_cfg).merge_and_unload()
    with torch.no_grad():
        trained = trained_model(**enc).logits[mask]
        as_trained = (merged(**enc).logits[mask] - trained).abs().max()
        original = (naive(**enc).logits[mask] - trained).abs().max()
    assert as_trained < 1e-3, as_trained
    assert original > 20 * as_trained, (original, as_trained)


def test_attention_maps_and_reasoning_share(cfg):
    from llmhelpers.model.attention import attention_maps, reasoning_to_question

    tok = load_tokenizer(cfg)
    model = load_base_model(cfg, attn_implementation="eager")
    ex = Example(question="What is 2 plus 3?", reasoning="2 + 3 = 5.", answer="\\boxed{5}", gold="5",
                 source="mathcodeinstruct")
    labels, attn, spans = attention_maps(model, tok, ex)
    assert len(attn) == 2 and attn[0].shape == (4, len(labels), len(labels))
    assert torch.allclose(attn[0].sum(-1), torch.ones(4, len(labels)), atol=1e-4)
    q0, q1 = spans["question"]
    assert "".join(labels[q0:q1]).startswith("What is 2 plus 3?")
    shares = reasoning_to_question(attn, spans)
    assert len(shares) == 2 and all(0 < s < 1 for s in shares)


def test_paged_optimizers_are_refused_on_several_processes_before_step_1():
    from llmhelpers.training.trainer import check_optimizer_resumes

    check_optimizer_resumes("paged_adamw_8bit", 1)  # one GPU: resumes fine
    check_optimizer_resumes("adamw_torch_fused", 2)
    with pytest.raises(ValueError, match="cannot resume.*adamw_torch_fused"):
        check_optimizer_resumes("paged_adamw_8bit", 2)


def test_a_loss_that_turns_nan_stops_the_run_as_failed_and_keeps_the_last_good_checkpoint(cfg, tiny_trainer):
    """Issue #29: the Trainer filters NaN losses out of its logs, so NaN adapters trained to the end, "finished"."""
    from safetensors.torch import load_file

    from llmhelpers.training.runs import read_index
    from llmhelpers.training.trainer import TrainingDiverged

    run_cfg = cfg.replace(max_steps=6, save_steps=2, eval_steps=2, logging_steps=1)
    trainer, _, tok, data = tiny_trainer(run_cfg)
    norm = trainer.model.get_base_model().model.norm  # the last hidden state (TRL's loss reads the head's weight)
    norm.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.state.global_step >= 3 else out)
    with pytest.raises(TrainingDiverged, match="training diverged at step 4: the loss was not finite") as err:
        run_training(trainer, run_cfg)
    assert "checkpoint-2" in str(err.value)
    entry = read_index(run_cfg.output_dir)[run_cfg.run_name]
    assert entry["status"] == "failed" and "diverged" in entry["error"]
    assert not (run_cfg.run_dir / "run_complete.json").exists()
    kept = last_complete_checkpoint(run_cfg.run_dir)
    assert kept.name == "checkpoint-2" and not (run_cfg.run_dir / "checkpoint-4").exists()
    weights = load_file(kept / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_a_finished_run_without_its_records_gets_them_from_the_last_checkpoint(cfg, damage, tiny_trainer):
    """Issue #29: killed right after its last checkpoint, a run re-ran as "already finished" with train_loss None,
    no run_complete.json or log_history.json, and the index still saying `training`; an empty run_complete.json
    gave a traceback on every re-run."""
    from llmhelpers.training.runs import read_index, record_run

    run_cfg = cfg.replace(max_steps=4, save_steps=2, eval_steps=2)
    trainer, _, _, _ = tiny_trainer(run_cfg)
    expected = run_training(trainer, run_cfg).training_loss
    run = run_cfg.run_dir
    (run / "log_history.json").unlink()
    if damage == "missing":
        (run / "run_complete.json").unlink()
    else:
        (run / "run_complete.json").write_text("")
    record_run(run_cfg, status="training")  # what the index said when the process died
    again, _, _, _ = tiny_trainer(run_cfg)
    out = run_training(again, run_cfg)
    assert out.global_step == 4 and out.training_loss == pytest.approx(expected, rel=1e-6)
    assert json.loads((run / "run_complete.json").read_text())["train_loss"] == pytest.approx(expected, rel=1e-6)
    assert (run / "log_history.json").exists()
    assert read_index(run_cfg.output_dir)[run_cfg.run_name]["status"] == "finished"


def test_an_unreadable_index_is_rebuilt_from_the_run_folders_and_kept_aside(tmp_path, tiny_model_dir):
    """Issue #29: an unreadable index.json made the next record drop every other run (5 -> 1)."""
    from llmhelpers.training.runs import index_path, read_index, record_run

    runs = [make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir),
                        learning_rate=lr) for lr in (1e-3, 2e-3, 3e-3)]
    for run_cfg in runs:
        run_cfg.save(run_cfg.run_dir / "finetune_config.json")
        record_run(run_cfg, status="training")
    (runs[0].run_dir / "run_complete.json").write_text(json.dumps({"global_step": 8, "train_loss": 1.5}))
    index_path(runs[0].output_dir).write_text("{ not json")
    record_run(runs[2], status="finished")
    index = read_index(runs[0].output_dir)
    assert set(index) == {r.run_name for r in runs}
    assert index[runs[0].run_name]["status"] == "finished" and index[runs[0].run_name]["metrics"]["train_loss"] == 1.5
    assert index[runs[1].run_name]["status"] == "unknown" and index[runs[2].run_name]["status"] == "finished"
    assert len(list(index_path(runs[0].output_dir).parent.glob("index.damaged-*.json"))) == 1


def _count_on_rank(rank: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from llmhelpers.training.trainer import nonfinite_steps_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        flag = torch.tensor(1) if rank == 1 else None  # only rank 1 saw a NaN loss (rank 0 never set its flag)
        results[rank] = nonfinite_steps_on_every_rank(flag, "cpu")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_nan_loss_on_one_process_stops_every_process():
    """Issue #29: the non-finite check read each rank's own loss, so one rank stopped while the others waited in
    their next collective until the timeout."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_count_on_rank, args=(port, results), nprocs=2, join=True)
    assert dict(results) == {0: 1, 1: 1}


def test_an_interrupt_or_a_divergence_shows_one_line_in_jupyter(capsys):
    """Issue #29: the interrupt's one-line message sat under a ~10-line traceback of library frames. IPython shows
    what `_render_traceback_` returns instead of the traceback (as the notebook's kernel does)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        for module, name in (("run", "TrainingInterrupted"), ("trainer", "TrainingDiverged")):
            shell.run_cell(f"from llmhelpers.training.{module} import {name}\n"
                           f"def deep():\n    raise {name}('what happened; what to do')\ndeep()")
            out = capsys.readouterr()
            shown = (out.out + out.err).strip().splitlines()
            assert shown == [f"{name}: what happened; what to do"], shown
    finally:
        InteractiveShell.clear_instance()


def test_trainer_train_runs_only_inside_its_run_and_from_the_runs_checkpoint(cfg, tiny_trainer):
    """The notebook's cell is `with TrainingRun(trainer, cfg) as run: trainer.train(resume_from_checkpoint=
    run.checkpoint)`. Outside it, nothing would hold the lock or write the records; another checkpoint than the run's
    choice would train over the run's own."""
    from llmhelpers.training.run import TrainingRun

    trainer, cfg, _, _ = tiny_trainer(cfg.replace(max_steps=4, save_steps=2, eval_steps=2))
    with pytest.raises(RuntimeError, match=r"train this trainer inside its run.*TrainingRun\(trainer, cfg\)"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list(cfg.run_dir.glob("checkpoint-*"))
    with TrainingRun(trainer, cfg) as run:
        assert run.checkpoint is None and "starting from step 0" in repr(run)
        with pytest.raises(ValueError, match="this run continues from step 0 .*not elsewhere"):
            trainer.train(resume_from_checkpoint="elsewhere")
        out = trainer.train(resume_from_checkpoint=run.checkpoint)
    assert out.global_step == 4 and (cfg.run_dir / "run_complete.json").exists()
    assert trainer.llm_run is None  # the run is over: a later bare trainer.train() is refused again
    with TrainingRun(trainer, cfg) as run:
        assert run.finished and run.checkpoint.endswith("checkpoint-4")
        again = trainer.train(resume_from_checkpoint=True)  # transformers' "the last checkpoint": the run's choice
    assert again.global_step == 4 and trainer.llm_already_finished


def test_finish_lora_refuses_adapters_that_are_not_cfgs(cfg):
    """The LoRA cell: prepare_for_lora, get_peft_model(model, copy of lora_config), finish_lora. A lora_config edited
    after cfg was built, or a model not prepared for cfg, is refused with the step to re-run."""
    import copy
    import dataclasses

    from peft import get_peft_model

    from llmhelpers.model.loading import finish_lora, prepare_for_lora

    model = prepare_for_lora(load_base_model(cfg), cfg)
    with pytest.raises(ValueError, match="attached with r=4, but cfg has r=16: lora_config changed after cfg"):
        finish_lora(get_peft_model(model, dataclasses.replace(cfg.lora, r=4)), cfg)
    unprepared = load_base_model(cfg)
    with pytest.raises(ValueError, match="run prepare_for_lora"):
        finish_lora(get_peft_model(unprepared, copy.deepcopy(cfg.lora)), cfg)
    before = cfg.run_name
    tuned = finish_lora(get_peft_model(prepare_for_lora(load_base_model(cfg), cfg), copy.deepcopy(cfg.lora)), cfg)
    assert cfg.lora.target_modules == "all-linear" and cfg.run_name == before  # the copy took peft's writes
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) > 0


def test_every_private_library_member_the_trainer_uses_is_listed_and_still_there():
    """One list (trainer.PRIVATE_MEMBERS) of the libraries' private members; an upgrade that renames one fails here."""
    import inspect
    import re

    import accelerate
    import transformers
    import trl

    from llmhelpers.training import trainer as trainer_module

    sources = {"Trainer": inspect.getsource(transformers.Trainer), "SFTTrainer": inspect.getsource(trl.SFTTrainer),
               "Accelerator": inspect.getsource(accelerate.Accelerator)}
    missing = [(cls, what) for cls, what in trainer_module.PRIVATE_MEMBERS if what not in sources[cls]]
    assert not missing, missing
    listed = {what.split()[-1].removeprefix("self.") for _, what in trainer_module.PRIVATE_MEMBERS}
    used = set(re.findall(r"(?:self|trainer|accelerator)\.(_[a-z][a-z_]*)", inspect.getsource(trainer_module)))
    own = {"_loss_sum_before", "_own_optimizer", "_calls", "_start_afresh", "_session_loss_sum", "_load_finished",
           "_init_run", "_training_step", "_llm_forward", "_settle_counts", "_llm_parameter_count"}
    assert used - own <= listed, used - own - listed


def test_every_private_member_the_grpo_trainer_uses_is_listed_and_still_there():
    import inspect
    import re

    import trl

    from llmhelpers.training import grpo

    source = inspect.getsource(trl.GRPOTrainer)
    missing = [what for cls, what in grpo.GRPO_PRIVATE_MEMBERS if what not in source]
    assert not missing, missing
    listed = {what.split()[-1].removeprefix("self.") for _, what in grpo.GRPO_PRIVATE_MEMBERS}
    used = set(re.findall(r"(?:self|trainer)\.(_[a-z][a-z_]*)", inspect.getsource(grpo)))
    assert used - {"_init_run", "_start_afresh"} <= listed, used - listed
