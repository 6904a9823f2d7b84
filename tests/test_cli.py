"""The command-line entry point: overrides and errors, a JSON config, and two CPU processes (gloo)
through `accelerate launch`, where both ranks train and exactly one adapter is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmhelpers.config.profiles import make_config
from llmhelpers.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_override_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--profile", "smoke", "--learning_rat", "1e-4"])
    assert err.value.code == 2 and "learning_rat" in capsys.readouterr().err


def test_every_project_flag_has_help_and_shows_the_profiles_default(capsys):
    """Issue #29: the project's ~50 flags had no help text and no default in --help."""
    from llmhelpers.config.arguments import build_parser
    from llmhelpers.config.project import PROJECT_FIELDS

    parser = build_parser()
    helps = {a.dest: a.help for a in parser._actions}
    for name in PROJECT_FIELDS - {"profile"}:
        assert helps[name].endswith("(default: %(default)s)") and len(helps[name]) > 30, name
    with pytest.raises(SystemExit):
        main(["--profile", "smoke", "--help"])
    out = capsys.readouterr().out
    assert "wall-clock seconds per block" in out and "(default: 10.0)" in out


def test_a_negative_number_reaches_the_values_own_check(capsys):
    """Issue #29: `--learning_rate -1e-4` got argparse's "expected one argument"."""
    with pytest.raises(SystemExit):
        main(["--profile", "smoke", "--learning_rate", "-1e-4"])
    assert "learning_rate=-0.0001 is invalid: must be > 0" in capsys.readouterr().err


def test_bad_value_is_a_clean_error(capsys):
    with pytest.raises(SystemExit):
        main(["--profile", "smoke", "--r", "0"])
    assert "r=0 is invalid: must be > 0 (LoraConfig)" in capsys.readouterr().err


def results(stdout: str) -> list[dict]:
    return [json.loads(l.split("RESULT ", 1)[1]) for l in stdout.splitlines() if l.startswith("RESULT ")]


@pytest.mark.slow
def test_config_file_run(tmp_path, tiny_model_dir):
    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir), max_steps=4,
                      eval_steps=2, save_steps=2, accuracy_callback=False)
    path = cfg.save(tmp_path / "cfg.json")
    proc = subprocess.run([sys.executable, "-m", "llmhelpers", "--config", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = results(proc.stdout)
    assert res["global_step"] == 4 and res["world_size"] == 1
    assert (cfg.run_dir / "final" / "adapter_model.safetensors").exists()

    # Re-running the finished run trains nothing and reports the finished run's metrics.
    again = subprocess.run([sys.executable, "-m", "llmhelpers", "--config", str(path)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (res2,) = results(again.stdout)
    assert res2["global_step"] == 4 and res2["train_loss"] == pytest.approx(res["train_loss"]) != 0.0
    assert "already finished at step 4" in again.stdout
    assert sorted(p.name for p in cfg.run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((cfg.run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.slow
def test_the_cli_merges_exports_and_writes_the_cards_and_a_rerun_rewrites_nothing(tmp_path, tiny_model_dir):
    """Issue #29: the CLI accepted --merge_after_training and --gguf_outtype but never merged or exported, left peft's
    empty card in final/ and TRL's generic one in the run folder, and a re-run replaced a finished run's card."""
    cmd = [sys.executable, "-m", "llmhelpers", "--profile", "smoke", "--output_dir", f"{tmp_path / 'out'}",
           "--tiny_model_dir", f"{tiny_model_dir}", "--max_steps", "2", "--accuracy_callback", "false",
           "--merge_after_training", "true", "--gguf_outtype", "f16"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = results(proc.stdout)
    run_dir = Path(res["run_dir"])
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert {"final/README.md", "merged/README.md", "merged/model.safetensors", "gguf/model.gguf",
            "gguf/Modelfile"} <= files
    assert "README.md" not in files  # no TRL card in the run folder
    for card in ("final/README.md", "merged/README.md"):
        text = (run_dir / card).read_text()
        assert "[More Information Needed]" not in text and "fine-tuned version of [None]" not in text
        assert f"`{run_dir.name}`" in text or run_dir.name in text  # the project's card names the run
    assert res["gguf"] == str(run_dir / "gguf" / "model.gguf") and "'ok': True" in proc.stdout
    before = {f: (run_dir / f).stat().st_mtime_ns for f in files}

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 2" in again.stdout and "re-run this command with --fresh" in again.stdout
    for folder in ("final", "merged", "gguf/model.gguf"):
        assert f"kept {run_dir / folder}" in again.stdout
    after = {f: (run_dir / f).stat().st_mtime_ns for f in before}
    assert after == before  # nothing of the finished run was rewritten


@pytest.mark.slow
def test_library_fields_the_old_config_did_not_know_reach_the_trainer(tmp_path, tiny_model_dir):
    """Every SFTConfig and LoraConfig field is a flag: two SFTConfig fields and a LoraConfig one that the project's
    own config never declared end up in the trainer's arguments and the attached adapters."""
    from llmhelpers.config.arguments import parse
    from llmhelpers.data.sources import build_datasets, load_examples
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.trainer import build_trainer

    _, cfg = parse(["--profile", "smoke", "--output_dir", str(tmp_path / "out"), "--tiny_model_dir",
                    str(tiny_model_dir), "--adam_beta2", "0.95", "--neftune_noise_alpha", "5", "--use_rslora", "true",
                    "--report_to", "none"])
    tok = load_tokenizer(cfg)
    model = attach_lora(load_base_model(cfg), cfg)
    trainer = build_trainer(cfg, model, tok, build_datasets(cfg, tok, load_examples(cfg)))
    assert trainer.args.adam_beta2 == 0.95 and trainer.args.neftune_noise_alpha == 5.0 and trainer.args.report_to == []
    assert trainer.model.peft_config["default"].use_rslora
    assert cfg.run_id != parse(["--profile", "smoke", "--output_dir", str(tmp_path / "out"), "--tiny_model_dir",
                                str(tiny_model_dir)])[1].run_id


def test_a_run_that_fails_on_its_data_leaves_no_empty_run_folder(tmp_path, tiny_model_dir, capsys):
    """Issue #29: a failed run left an empty folder among the runs."""
    bad = tmp_path / "math.jsonl"
    bad.write_text("not json\n")
    code = main(["--profile", "smoke", "--output_dir", str(tmp_path / "out"), "--tiny_model_dir", str(tiny_model_dir),
                 "--math_dataset", str(bad)])
    assert code == 1 and "llmhelpers: error:" in capsys.readouterr().err
    runs = tmp_path / "out" / "runs"
    assert not runs.exists() or [p.name for p in runs.iterdir() if p.is_dir()] == []


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "typo.json"
    bad.write_text('{"learning_rate": 1e-4,}')
    with pytest.raises(SystemExit):
        main(["--config", str(bad)])
    err = capsys.readouterr().err
    assert "typo.json" in err and "not valid JSON" in err
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err


def test_every_profile_file_is_a_profile_and_others_are_refused(capsys):
    from llmhelpers.config.arguments import parse
    from llmhelpers.config.profiles import profile_names

    files = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem != "accelerate_ddp")
    assert profile_names() == files
    for name in files:
        assert parse(["--profile", name])[1].profile == name
    with pytest.raises(SystemExit):
        main(["--profile", "huge"])
    assert "unknown profile 'huge'; choose one of " + str(files) in capsys.readouterr().err


def test_read_only_output_dir_is_caught_before_anything_loads(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        target = "/proc/llmhelpers-out"  # root can write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "out")
    with pytest.raises(SystemExit):
        main(["--profile", "smoke", "--output_dir", f"{target}"])
    assert "output_dir" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("batches", ["padded", "packed"])
def test_two_cpu_processes_through_accelerate(tmp_path, tiny_model_dir, batches):
    out = tmp_path / "out"
    packed = (["--packing", "true", "--max_length", "1024", "--pad_to_multiple_of", "1024", "--per_device_train_batch_size",
               "1", "--per_device_eval_batch_size", "1", "--train_sampling_strategy", "random",
               "--gradient_accumulation_steps", "1"] if batches == "packed" else [])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "llmhelpers", "--profile", "smoke", "--output_dir", f"{out}",
           "--tiny_model_dir", f"{tiny_model_dir}", "--max_steps", "4", "--eval_steps", "2",
           "--save_steps", "2", "--accuracy_callback", "false", *packed]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = sorted(results(proc.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in res] == [0, 1] and all(r["world_size"] == 2 for r in res)
    if batches == "padded":  # 2 sequences x 2 accumulation per rank and step
        assert all(r["global_step"] == 4 and r["micro_batches_seen_by_this_rank"] * r["sequences_per_micro_batch"]
                   == 16 for r in res)
    else:  # one packed row per rank and step
        assert all(r["global_step"] == 4 and r["micro_batches_seen_by_this_rank"] == 4 and
                   r["sequences_per_micro_batch"] == "packed" for r in res)
    assert "adapter_dir" in res[0] and "adapter_dir" not in res[1]  # only rank 0 writes
    assert res[0]["train_loss"] == pytest.approx(res[1]["train_loss"])  # one DDP model, gradients averaged
    assert len(list(out.rglob("final/adapter_model.safetensors"))) == 1
    assert not list(out.rglob(".*tmp*"))
    logs = list(out.rglob("log_history.json"))
    assert len(logs) == 1


def test_full_profile_without_a_gpu_says_what_to_do(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is about machines without a GPU")
    with pytest.raises(SystemExit):
        main(["--profile", "full"])
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "bf16=True" in err and "smoke" in err


@pytest.mark.slow
def test_evaluate_after_training_reports_every_run_of_the_comparison(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "llmhelpers", "--profile", "smoke", "--evaluate",
                           "--output_dir", f"{tmp_path / 'out'}", "--tiny_model_dir", f"{tiny_model_dir}",
                           "--max_steps", "2", "--eval_limit", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = results(proc.stdout)
    assert set(res["accuracy"]) == {"base", "finetuned", "finetuned-no-tools"}
    assert "tools errors timeouts" in proc.stdout
    # where the run's time went, phase by phase (bench/time_to_model.py records them)
    assert list(res["seconds"]) == ["loading", "training", "saving", "evaluation", "merge", "gguf"]  # smoke merges
    assert min(res["seconds"].values()) >= 0 and res["seconds"]["training"] > 0 and res["seconds"]["evaluation"] > 0
    assert "time by phase: loading" in proc.stdout


def test_the_smoke_model_is_built_under_output_dir_not_the_working_directory(tmp_path, monkeypatch):
    from llmhelpers.model.loading import model_path

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # e.g. a read-only checkout: nothing may be written here
    cfg = make_config("smoke", output_dir=str(tmp_path / "out"))
    assert Path(model_path(cfg)) == tmp_path / "out" / "tiny-r1"
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize("capability, refused", [((8, 6), True), ((8, 0), True), ((8, 9), False), ((9, 0), False)])
def test_an_fp8_cache_on_a_gpu_without_e4m3_is_refused_before_training(monkeypatch, capability, refused):
    """eval_kv_cache_dtype='fp8' on an A10 / RTX 3090 (8.6) or A100 (8.0): Triton cannot compile e4m3 there, so the
    evaluation's kernels would fail at their first step, after training; the preflight says so before anything
    loads. Ada and Hopper (8.9, 9.0) pass, and 'auto' passes everywhere."""
    import torch

    from llmhelpers.config.profiles import make_config
    from llmhelpers.environment import check_device_support

    default, cfg = make_config("full"), make_config("full", eval_kv_cache_dtype="fp8")  # before CUDA is faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A10")
    check_device_support(default)  # the default cache: nothing to refuse
    if refused:
        with pytest.raises(ValueError, match=r"compute capability 8.9 or newer.*NVIDIA A10 is 8\.\d.*'auto'"):
            check_device_support(cfg)
    else:
        check_device_support(cfg)
