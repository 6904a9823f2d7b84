"""FinetuneConfig: the recipe files, profiles, the library configs nested as they are, validation that names the key,
the JSON round trip, the run id."""
import dataclasses

import pytest
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from trl import SFTConfig

from llmhelpers.config.profiles import load_profile, make_config, profile_names, recipe
from llmhelpers.config.project import FinetuneConfig


def test_full_profile_is_the_recipe():
    cfg = make_config()
    assert cfg.model_id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert isinstance(cfg.bnb, BitsAndBytesConfig) and isinstance(cfg.lora, LoraConfig) and isinstance(cfg.sft, SFTConfig)
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.target_modules) == (16, 32, 0.05, "all-linear")
    assert cfg.bnb.load_in_4bit and cfg.bnb.bnb_4bit_quant_type == "nf4" and cfg.bnb.bnb_4bit_use_double_quant
    assert str(cfg.compute_dtype) == "torch.bfloat16"
    sft = cfg.sft
    assert sft.learning_rate == 2e-4 and sft.num_train_epochs == 3.0 and sft.optim.value == "adamw_torch_fused"
    assert sft.packing and sft.max_length == sft.pad_to_multiple_of == 16384 and cfg.pack_tokens == 16384
    assert sft.per_device_train_batch_size == 1 and sft.completion_only_loss is True
    assert sft.activation_checkpointing and sft.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert (sft.save_total_limit, sft.metric_for_best_model, sft.report_to) == (3, "eval_loss", ["tensorboard"])
    assert (cfg.math_samples, cfg.eval_fraction, cfg.max_example_tokens) == (15000, 0.1, 2048)
    assert not sft.trust_remote_code


def test_profiles_are_files_that_change_the_recipe():
    assert {"full", "smoke", "seed"} <= set(profile_names())
    seed = make_config("seed")
    assert (seed.sft.per_device_train_batch_size, seed.sft.gradient_accumulation_steps) == (2, 8)
    assert not seed.sft.packing and not seed.liger_kernels and seed.upcast_to_fp32
    smoke = make_config("smoke")
    assert smoke.is_tiny and smoke.bnb.load_in_4bit and smoke.sft.max_steps == 30 and not smoke.sft.bf16
    assert smoke.math_dataset.startswith("data/samples/")
    assert load_profile("smoke").sft["learning_rate"] == 3e-3 and "learning_rate" not in load_profile("seed").sft
    assert recipe("full")["lora"]["r"] == 16
    with pytest.raises(ValueError, match="unknown profile 'huge'.*full.*seed.*smoke"):
        make_config("huge")


def test_profile_apply_returns_changed_copies_and_leaves_the_original():
    smoke = load_profile("smoke")
    sft = SFTConfig(output_dir="x", learning_rate=2e-4, use_cpu=True, report_to="none")
    changed = smoke.apply(sft)
    assert changed.learning_rate == 3e-3 and changed.max_steps == 30 and sft.learning_rate == 2e-4
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert str(smoke.apply(bnb).bnb_4bit_compute_dtype) == "torch.float32" and smoke.apply(bnb).bnb_4bit_quant_type == "nf4"
    lora = LoraConfig(r=16)
    assert smoke.apply(lora) is lora  # the smoke profile changes nothing in LoRA
    assert "learning_rate=0.003" in str(smoke)


def test_the_notebooks_objects_are_used_as_they_are():
    base = make_config("smoke")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    cfg = make_config("smoke", bnb=base.bnb, lora=lora, sft=base.sft, math_samples=7)
    assert cfg.lora is lora and cfg.math_samples == 7 and cfg.run_name.startswith("lr3e-3_r4_")
    with pytest.raises(ValueError, match="learning_rate is a SFTConfig setting: set it where sft"):
        make_config("smoke", bnb=base.bnb, lora=lora, sft=base.sft, learning_rate=1e-4)
    with pytest.raises(ValueError, match="all three"):
        make_config("smoke", lora=lora)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_config().math_samples = 1


@pytest.mark.parametrize("key,value", [
    ("learning_rate", -1e-4), ("r", 0), ("max_example_tokens", 32), ("eval_fraction", 1.5),
    ("lora_dropout", 1.0), ("per_device_train_batch_size", 0), ("max_steps", 0), ("seed", -1), ("seed", 2**32),
    ("save_total_limit", 1), ("max_length", 1024), ("bnb_4bit_quant_type", "int3"),  # max_length: a packed row shorter than an example
])
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        make_config(**{key: value})


@pytest.mark.parametrize("key,value", [("r", "16"), ("learning_rate", "fast"), ("bf16", 1),
                                       ("max_example_tokens", 2048.0), ("math_samples", "all")])
def test_wrong_types_name_the_key(key, value):
    with pytest.raises(TypeError, match=key):
        make_config(**{key: value})


@pytest.mark.parametrize("key,value", [("optim", "adam"), ("lr_scheduler_type", "cosine_annealing"),
                                       ("save_steps", 7)])
def test_the_libraries_check_their_own_fields(key, value):
    with pytest.raises(ValueError):
        make_config(**{key: value})


@pytest.mark.parametrize("modules", [["q_proj", "attention"], ["qproj"]])
def test_target_modules_must_be_layers_of_the_model(modules):
    with pytest.raises(ValueError, match="target_modules"):
        make_config(target_modules=modules)


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*learning_rate"):
        make_config(learning_rat=1e-4)


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="output_dir"):
        make_config(output_dir=str(f))


def test_json_round_trip(tmp_path):
    cfg = make_config("smoke", learning_rate=3e-4, model_revision="abc123", use_dora=True, adam_beta2=0.95)
    path = cfg.save(tmp_path / "cfg.json")
    again = FinetuneConfig.load(path)
    assert again.training_settings() == cfg.training_settings() and again.run_id == cfg.run_id
    assert again.lora.use_dora and again.sft.adam_beta2 == 0.95 and again.model_revision == "abc123"
    path.write_text('{"lora_rank": 8, "bnb": {}, "lora": {}, "sft": {}}')
    with pytest.raises(ValueError, match="lora_rank"):
        FinetuneConfig.load(path)


def test_run_id_tracks_training_settings_only():
    cfg = make_config()
    assert cfg.replace(eval_limit=5, logging_steps=1, report_to="none").run_id == cfg.run_id
    assert cfg.replace(learning_rate=1e-4).run_id != cfg.run_id
    assert cfg.replace(use_dora=True).run_id != cfg.run_id and cfg.replace(adam_beta2=0.9).run_id != cfg.run_id
    assert cfg.replace(bnb_4bit_quant_type="fp4").run_id != cfg.run_id
    assert cfg.run_dir.parent.name == "runs" and cfg.run_dir.name.endswith(cfg.run_id)
    assert cfg.run_name.startswith("lr2e-4_r16_t16k_ep3-")  # one step: 16,384 packed tokens
    assert cfg.replace(learning_rate=1e-4, r=8, max_steps=500).run_name.startswith("lr1e-4_r8_t16k_s500-")
    assert make_config("seed").run_name.startswith("lr2e-4_r16_b16_ep3-")  # 16 padded sequences


def test_trainer_args_are_the_sft_config_in_the_run_folder():
    cfg = make_config("smoke", learning_rate=5e-4)
    args = cfg.trainer_args()
    assert args.output_dir == str(cfg.run_dir) and cfg.sft.output_dir == "outputs/smoke"
    assert non_output_fields(args) == non_output_fields(cfg.sft)


def non_output_fields(sft) -> dict:
    return {f.name: getattr(sft, f.name) for f in dataclasses.fields(sft) if f.name != "output_dir"}


def test_early_stopping_is_transformers_callback_on_the_eval_loss():
    from transformers import EarlyStoppingCallback

    cfg = make_config("smoke", early_stopping_patience=2)
    (stop,) = [c for c in _callbacks(cfg) if isinstance(c, EarlyStoppingCallback)]
    assert stop.early_stopping_patience == 2 and cfg.run_id != make_config("smoke").run_id
    assert not [c for c in _callbacks(make_config("smoke")) if isinstance(c, EarlyStoppingCallback)]
    with pytest.raises(ValueError, match="early_stopping_patience"):
        make_config("smoke", early_stopping_patience=2, load_best_model_at_end=False)


def _callbacks(cfg):
    import torch

    from llmhelpers.training.trainer import run_callbacks

    return run_callbacks(cfg, torch.nn.Linear(2, 2))


def test_the_hub_token_reaches_no_file_card_index_or_trainer(tmp_path):
    """Issue #29: hub_token set as an SFTConfig field was written to finetune_config.json, runs/index.json and the
    model card, and pickled into every checkpoint's training_args.bin."""
    from llmhelpers.export.model_card import model_card_text
    from llmhelpers.training.runs import index_path, record_run

    secret = "hf_SECRETtoken1234567890"
    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), hub_token=secret)
    assert cfg.sft.hub_token == secret  # the notebook's object is kept as the user wrote it
    saved = cfg.save(tmp_path / "cfg.json").read_text()
    record_run(cfg, status="training")
    card = str(model_card_text(cfg, "adapters"))
    for text in (saved, index_path(cfg.output_dir).read_text(), card, repr(cfg.to_dict()), repr(cfg.training_settings())):
        assert secret not in text
    assert cfg.trainer_args().hub_token is None
    assert cfg.run_id == make_config("smoke", output_dir=str(tmp_path / "out")).run_id  # hashed out of the run id
    assert FinetuneConfig.load(tmp_path / "cfg.json").sft.hub_token is None


@pytest.mark.parametrize("key", ["label_smoothing_factor", "neftune_noise_alpha", "adam_epsilon", "adam_beta1",
                                 "adam_beta2", "llm_int8_threshold", "warmup_steps", "lora_dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_library_values_are_refused(key, value):
    """Issue #29: `--label_smoothing_factor nan` trained every adapter value into NaN and called the run finished."""
    with pytest.raises(ValueError, match=f"{key}=(nan|inf).*finite"):
        make_config("smoke", **{key: value})


@pytest.mark.parametrize("key", ["save_steps", "eval_steps", "logging_steps"])
def test_zero_step_intervals_are_refused(key):
    with pytest.raises(ValueError, match=f"{key}=0 is invalid"):
        make_config("smoke", **{key: 0})


def test_a_wrong_dtype_name_or_an_absurd_tool_timeout_fails_in_one_line_before_loading():
    """Issue #29: `bnb_4bit_compute_dtype nonsense` was an AttributeError traceback from inside transformers, and
    `tool_timeout=1e300` made every tool call fail."""
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype='nonsense' is invalid: must be one of float32"):
        make_config("smoke", bnb_4bit_compute_dtype="nonsense")
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage='int9' is invalid"):
        make_config("smoke", bnb_4bit_quant_storage="int9")
    with pytest.raises(ValueError, match="tool_timeout=1e\\+300 is invalid: must be <= 3600"):
        make_config("smoke", tool_timeout=1e300)
    assert str(make_config("smoke", bnb_4bit_compute_dtype="bfloat16").compute_dtype) == "torch.bfloat16"


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_config_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    """Issue #29: `--config` at a FIFO hung, and /dev/zero was read until memory ran out."""
    import os

    path = {"fifo": tmp_path / "cfg.fifo", "device": "/dev/zero", "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ValueError, match="not a regular file"):
        FinetuneConfig.load(path)


def test_one_malformed_profile_file_fails_alone_naming_its_line(tmp_path, monkeypatch):
    """Issue #29: one malformed YAML file in configs/ made every profile fail."""
    import shutil

    import llmhelpers.config.profiles as profiles

    configs = tmp_path / "configs"
    shutil.copytree(profiles.CONFIGS_DIR, configs)
    (configs / "broken.yaml").write_text("sft:\n  learning_rate: 1e-3\n  max_steps: [1, 2\n")
    monkeypatch.setattr(profiles, "CONFIGS_DIR", configs)
    assert "smoke" in profile_names() and "broken" not in profile_names()
    assert make_config("smoke").profile == "smoke"
    with pytest.raises(ValueError, match=r"profile 'broken': .*broken.yaml line \d+: not valid YAML") as err:
        load_profile("broken")
    assert "\n" not in str(err.value)


def test_an_unknown_reporter_and_a_contradictory_push_are_refused_before_anything_loads():
    """Issue #29: `report_to nonsense` failed a minute later with a traceback; push_to_hub=True with the project's
    push off created a Hub repository named after the run."""
    with pytest.raises(ValueError, match="report_to='nonsense' is invalid"):
        make_config("smoke", report_to=["nonsense"])
    with pytest.raises(ValueError, match="sft.push_to_hub=True is invalid"):
        make_config("smoke", push_to_hub=True)
    assert make_config("smoke", report_to=["tensorboard"]).sft.report_to == ["tensorboard"]
