"""Nothing lost: SIGKILL during a step and during a checkpoint save, then resume to the same final
step on the same data; incomplete checkpoints are never used; save_total_limit keeps the best
checkpoint; disk checks stop before writing; only safetensors and no remote code are loaded."""
import json
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from llmhelpers.config.profiles import make_config
from llmhelpers import storage
from llmhelpers.storage import DiskSpaceError

pytestmark = pytest.mark.slow  # subprocess trainings and kills: `python -m pytest -m slow`

DRIVER = Path(__file__).parent / "kill_driver.py"
STEPS = 6


def run_driver(tmp_path, mode, step, out, batch_log, tiny_model_dir):
    args = ["--profile", "smoke", "--output_dir", f"{out}", "--tiny_model_dir", f"{tiny_model_dir}",
            "--max_steps", f"{STEPS}", "--eval_steps", "2", "--save_steps", "2",
            "--accuracy_callback", "false"]
    return subprocess.run([sys.executable, str(DRIVER), mode, str(step), str(batch_log), "--", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def batches(log: Path) -> dict[int, list[str]]:
    out = defaultdict(list)
    for line in log.read_text().splitlines():
        s, h = line.split()
        out[int(s)].append(h)
    return out


def final_step(out: Path) -> int:
    (log,) = out.glob("runs/*/log_history.json")
    return max(r["step"] for r in json.loads(log.read_text()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("clean")
    proc = run_driver(tmp, "none", 0, tmp / "out", tmp / "batches.log", tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return batches(tmp / "batches.log"), final_step(tmp / "out")


@pytest.mark.parametrize("mode,step,resume_from", [("step", 3, 2), ("save", 4, 2)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, uninterrupted, mode, step,
                                                          resume_from):
    clean_batches, clean_final = uninterrupted
    out, log = tmp_path / "out", tmp_path / "batches.log"
    killed = run_driver(tmp_path, mode, step, out, log, tiny_model_dir)
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = [p for p in out.glob("runs/*") if p.is_dir()]
    if mode == "save":  # the cut-off checkpoint exists but has no trainer_state.json
        assert (run_dir / f"checkpoint-{step}").exists()
        assert not (run_dir / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert not list(out.glob("runs/*/final"))

    log.unlink()
    resumed = run_driver(tmp_path, "none", 0, out, log, tiny_model_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoint-{resume_from}" in resumed.stdout
    assert final_step(out) == clean_final == STEPS
    after = batches(log)
    assert min(after) == resume_from + 1  # no step trained twice
    for s in range(resume_from + 1, STEPS + 1):  # same micro-batches, same order as without the kill
        assert after[s] == clean_batches[s], f"step {s} trained on different data"
    if mode == "save":
        assert list(run_dir.glob(f"incomplete-checkpoint-{step}-*"))
    assert (run_dir / "final" / "adapter_model.safetensors").exists()


def test_save_total_limit_keeps_the_best_checkpoint(tmp_path, tiny_model_dir):
    from llmhelpers.data.sources import build_datasets
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.trainer import build_trainer, train

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), max_steps=6,
                      eval_steps=2, save_steps=2, save_total_limit=2, accuracy_callback=False)
    tok = load_tokenizer(cfg)
    trainer = build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), tok, build_datasets(cfg, tok))
    real_evaluate = trainer.evaluate

    def evaluate_with_best_at_step_2(*a, **kw):
        metrics = real_evaluate(*a, **kw)
        metrics["eval_loss"] = {2: 1.0, 4: 2.0, 6: 3.0}[trainer.state.global_step]
        return metrics

    trainer.evaluate = evaluate_with_best_at_step_2
    train(trainer, cfg)
    kept = sorted(p.name for p in cfg.run_dir.glob("checkpoint-*"))
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert kept == ["checkpoint-2", "checkpoint-6"]  # the best survives rotation beside the latest


def test_save_total_limit_of_one_is_refused_with_best_model_tracking():
    with pytest.raises(ValueError, match="save_total_limit"):
        make_config(save_total_limit=1)
    assert make_config(save_total_limit=1, load_best_model_at_end=False).sft.save_total_limit == 1


def test_disk_check_stops_before_training(tmp_path, tiny_model_dir, monkeypatch):
    from llmhelpers.data.sources import build_datasets
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training import trainer as training

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), max_steps=4,
                      eval_steps=2, save_steps=2, accuracy_callback=False)
    tok = load_tokenizer(cfg)
    trainer = training.build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), tok, build_datasets(cfg, tok))
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskSpaceError, match="training needs about"):
        training.train(trainer, cfg)
    assert trainer.state.global_step == 0


def test_disk_check_stops_before_a_checkpoint_that_would_not_fit(tmp_path, tiny_model_dir, monkeypatch):
    from llmhelpers.data.sources import build_datasets
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training import checkpoints, trainer as training

    cfg = make_config("smoke", output_dir=str(tmp_path), tiny_model_dir=str(tiny_model_dir), max_steps=6,
                      eval_steps=2, save_steps=2, accuracy_callback=False)
    tok = load_tokenizer(cfg)
    trainer = training.build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), tok, build_datasets(cfg, tok))
    monkeypatch.setattr(storage, "free_bytes",
                        lambda path: 10**12 if trainer.state.global_step < 4 else 1000)  # the disk fills up
    with pytest.raises(DiskSpaceError, match="checkpoint 4"):
        training.train(trainer, cfg)
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
