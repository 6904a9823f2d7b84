"""Nothing lost (the kill/resume matrix is tests/test_resume.py): save_total_limit keeps the best checkpoint; disk
checks stop before writing; only safetensors and no remote code are loaded."""
import json

import pytest

from llmhelpers.config.profiles import make_config
from llmhelpers import storage
from llmhelpers.storage import DiskSpaceError

pytestmark = pytest.mark.slow  # subprocess trainings and kills: `python -m pytest -m slow`



def test_save_total_limit_keeps_the_best_checkpoint(tmp_path, tiny_model_dir, tiny_trainer):
    from llmhelpers.training.run import run_training

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), max_steps=6,
                      eval_steps=2, save_steps=2, save_total_limit=2, accuracy_callback=False)
    trainer, *_ = tiny_trainer(cfg)
    real_evaluate = trainer.evaluate

    def evaluate_with_best_at_step_2(*a, **kw):
        metrics = real_evaluate(*a, **kw)
        metrics["eval_loss"] = {2: 1.0, 4: 2.0, 6: 3.0}[trainer.state.global_step]
        return metrics

    trainer.evaluate = evaluate_with_best_at_step_2
    run_training(trainer, cfg)
    kept = sorted(p.name for p in cfg.run_dir.glob("checkpoint-*"))
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert kept == ["checkpoint-2", "checkpoint-6"]  # the best survives rotation beside the latest


def test_save_total_limit_of_one_is_refused_with_best_model_tracking():
    with pytest.raises(ValueError, match="save_total_limit"):
        make_config(save_total_limit=1)
    assert make_config(save_total_limit=1, load_best_model_at_end=False).sft.save_total_limit == 1


def test_disk_check_stops_before_training(tmp_path, tiny_model_dir, monkeypatch, tiny_trainer):
    from llmhelpers.training.run import run_training

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), max_steps=4,
                      eval_steps=2, save_steps=2, accuracy_callback=False)
    trainer, *_ = tiny_trainer(cfg)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskSpaceError, match="training needs about"):
        run_training(trainer, cfg)
    assert trainer.state.global_step == 0


def test_disk_check_stops_before_a_checkpoint_that_would_not_fit(tmp_path, tiny_model_dir, monkeypatch, tiny_trainer):
    from llmhelpers.training import checkpoints
    from llmhelpers.training.run import run_training

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), max_steps=6,
                      eval_steps=2, save_steps=2, accuracy_callback=False)
    trainer, *_ = tiny_trainer(cfg)
    monkeypatch.setattr(storage, "free_bytes",
                        lambda path: 10**12 if trainer.state.global_step < 4 else 1000)  # the disk fills up
    with pytest.raises(DiskSpaceError, match="checkpoint 4"):
        run_training(trainer, cfg)
    kept = sorted(p.name for p in cfg.run_dir.glob("checkpoint-*"))
    assert kept == ["checkpoint-2"] and checkpoints.is_complete_checkpoint(cfg.run_dir / "checkpoint-2")


def test_pickle_weights_are_never_loaded(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from llmhelpers.model.loading import load_base_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False)
    if (pickled / "model.safetensors").exists():  # newer transformers always write safetensors
        (pickled / "model.safetensors").unlink()
        torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    cfg = make_config("smoke", model_id=str(pickled))
    with pytest.raises(OSError):
        load_base_model(cfg)


def test_remote_code_is_not_run_by_default(tmp_path, tiny_model_dir):
    import shutil

    from llmhelpers.model.loading import load_tokenizer

    target = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, target)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (target / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    tok_cfg = json.loads((target / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (target / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = make_config("smoke", model_id=str(target))
    assert not cfg.sft.trust_remote_code
    try:
        load_tokenizer(cfg)
    except (ValueError, OSError):
        pass  # refusing is fine too; running the code is not
    assert not marker.exists()


def test_revisions_are_passed_through(monkeypatch):
    from transformers import AutoTokenizer

    from llmhelpers.model.loading import load_tokenizer

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        raise RuntimeError("stop")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake)
    with pytest.raises(RuntimeError):
        load_tokenizer(make_config(model_revision="0123abc"))
    assert seen == {"path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "revision": "0123abc",
                    "trust_remote_code": False}
