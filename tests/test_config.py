"""FinetuneConfig: seed-plan defaults, profiles, validation that names the key, JSON round trip, builders."""
import dataclasses

import pytest

from llmhelpers.config.project import FinetuneConfig, make_config, parse_override


def test_full_profile_has_the_seed_plan_defaults():
    cfg = make_config()
    assert cfg.model_id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) == (16, 32, 0.05, "all-linear")
    assert cfg.learning_rate == 2e-4
    # 16 sequences per step, as the seed's 2 x 8, in one micro-batch (see BENCHMARKS.md)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (16, 1)
    assert (cfg.num_train_epochs, cfg.max_length, cfg.optim) == (3.0, 2048, "paged_adamw_8bit")
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.load_in_4bit
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, cfg.bnb_4bit_compute_dtype) == ("nf4", True, "bfloat16")
    assert (cfg.save_total_limit, cfg.metric_for_best_model, cfg.report_to) == (3, "eval_loss", "tensorboard")
    assert (cfg.math_samples, cfg.eval_fraction) == (15000, 0.1)
    assert not cfg.trust_remote_code


def test_seed_profile_is_the_seed_plan():
    cfg = make_config("seed")
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (2, 8)
    assert not cfg.group_by_length and not cfg.use_liger_kernel and cfg.upcast_to_fp32
    assert make_config("smoke", group_by_length=False).sft_config().train_sampling_strategy == "random"


def test_smoke_profile_is_tiny_and_still_4bit():
    cfg = make_config("smoke")
    assert cfg.is_tiny and cfg.load_in_4bit and cfg.max_steps > 0
    assert cfg.math_dataset.startswith("data/samples/")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_config().learning_rate = 1.0


@pytest.mark.parametrize("key,value", [
    ("learning_rate", -1e-4), ("lora_r", 0), ("max_length", 32), ("eval_fraction", 1.5),
    ("lora_dropout", 1.0), ("per_device_train_batch_size", 0), ("bnb_4bit_quant_type", "int3"),
    ("max_steps", 0), ("save_steps", 7),
])
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        make_config(**{key: value})


@pytest.mark.parametrize("key,value", [("lora_r", "16"), ("learning_rate", "fast"), ("bf16", 1), ("max_length", 2048.0)])
def test_wrong_types_name_the_key(key, value):
    with pytest.raises(TypeError, match=key):
        make_config(**{key: value})


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*learning_rate"):
        make_config(learning_rat=1e-4)
    with pytest.raises(ValueError, match="unknown profile"):
        make_config("huge")


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="output_dir"):
        make_config(output_dir=str(f))


def test_json_round_trip(tmp_path):
    cfg = make_config("smoke", learning_rate=3e-4, model_revision="abc123")
    path = cfg.save(tmp_path / "cfg.json")
    assert FinetuneConfig.load(path) == cfg
    path.write_text('{"lora_rank": 8}')
    with pytest.raises(ValueError, match="lora_rank"):
        FinetuneConfig.load(path)


def test_parse_override():
    assert parse_override("learning_rate=1e-4") == ("learning_rate", 1e-4)
    assert parse_override("bf16=false") == ("bf16", False)
    assert parse_override("model_revision=none") == ("model_revision", None)
    with pytest.raises(ValueError, match="lora_r"):
        parse_override("lora_r=sixteen")
    with pytest.raises(ValueError, match="unknown config key"):
        parse_override("nope=1")


def test_run_id_tracks_training_settings_only():
    cfg = make_config()
    assert dataclasses.replace(cfg, eval_limit=5).run_id == cfg.run_id
    assert dataclasses.replace(cfg, learning_rate=1e-4).run_id != cfg.run_id
    assert cfg.run_dir.parent.name == "runs" and cfg.run_dir.name.endswith(cfg.run_id)
    assert cfg.run_name.startswith("lr2e-4_r16_t16k_ep3-")  # one step: 16,384 packed tokens
    assert dataclasses.replace(cfg, learning_rate=1e-4, lora_r=8, max_steps=500).run_name.startswith("lr1e-4_r8_t16k_s500-")
    assert dataclasses.replace(cfg, pack_tokens=0).run_name.startswith("lr2e-4_r16_b16_ep3-")  # 16 padded sequences


def test_builders_carry_the_config():
    cfg = make_config()
    bnb = cfg.bnb_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert str(bnb.bnb_4bit_compute_dtype).endswith("bfloat16")
    lora = cfg.lora_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)
    assert lora.target_modules == "all-linear"


def test_sft_config_matches():
    cfg = make_config("smoke", learning_rate=5e-4)
    args = cfg.sft_config()
    assert args.learning_rate == 5e-4
    assert args.completion_only_loss is True and args.packing is False
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.save_total_limit == 3 and args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.report_to == ["tensorboard"] and args.output_dir == str(cfg.run_dir)
    assert args.max_length == cfg.max_length and args.max_steps == cfg.max_steps
