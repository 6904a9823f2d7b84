"""Padding-free training: sequences packed into one row attend only to themselves (a sequence packed after others
gives its logits alone; with the mask left out it does not), a packed batch's loss is the padded batch's, every row
is trained once per epoch with the schedule's step count right, and a resume of a packed run is exact."""
import json
from pathlib import Path

import pytest
import torch

from llmhelpers.config.profiles import make_config
from llmhelpers.training.packing import (PackedMask, attention_implementation, dense_document_mask, document_ids,
                                flex_document_mask, trailing_padding)

LENGTHS = [30, 50, 20]


@pytest.fixture(scope="module")
def tiny(tiny_arch):
    """The tiny Qwen2 and the tiny Llama: the per-sequence mask holds on both."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_arch[1], dtype=torch.float32).eval()


# rows of 1,024 tokens, one per micro-batch (SFTConfig's packing arguments)
PACKED = dict(packing=True, max_length=1024, pad_to_multiple_of=1024, per_device_train_batch_size=1,
              per_device_eval_batch_size=1, train_sampling_strategy="random")

def packed_row():
    torch.manual_seed(0)
    seqs = [torch.randint(5, 1000, (n,)) for n in LENGTHS]
    return seqs, torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in LENGTHS])[None]


def segments(logits):
    out, start = [], 0
    for n in LENGTHS:
        out.append(logits[start:start + n])
        start += n
    return out


def test_document_ids_masks_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])  # two sequences, then 3 positions of padding
    assert document_ids(pos).tolist() == [0, 0, 0, 1, 1, 2, 3, 4]
    assert trailing_padding(pos) == 3 and trailing_padding(torch.tensor([[0, 1, 0, 1]])) == 0
    assert trailing_padding(torch.tensor([[0, 0, 0]])) == 0  # no sequence at all: nothing counted as padding
    mask = dense_document_mask(pos)[0, 0]
    assert mask[2].tolist() == [True, True, True, False, False, False, False, False]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]  # not the first sequence


def test_a_sequence_packed_after_others_gives_its_logits_alone_and_not_without_the_mask(tiny):
    seqs, ids, pos = packed_row()
    with torch.no_grad():
        alone = [tiny(input_ids=s[None]).logits[0] for s in seqs]
        with PackedMask(tiny).applied(tiny, {"position_ids": pos}):
            packed = segments(tiny(input_ids=ids, position_ids=pos).logits[0])
        leaky = segments(tiny(input_ids=ids, position_ids=pos).logits[0])  # the mask dropped
    assert all(torch.allclose(p, a, atol=1e-4) for p, a in zip(packed, alone))
    assert all((l - a).abs().max() > 1e-2 for l, a in zip(leaky[1:], alone[1:])), "without the mask nothing leaks?"


def test_the_flex_block_mask_equals_the_dense_mask(tiny):
    """The GPU path's BlockMask, forward only (flex_attention has no backward on the CPU)."""
    _, ids, pos = packed_row()
    with torch.no_grad():
        dense = tiny(input_ids=ids, position_ids=pos, attention_mask=dense_document_mask(pos)).logits
        with attention_implementation(tiny, "flex_attention"):
            flex = tiny(input_ids=ids, position_ids=pos, attention_mask=flex_document_mask(pos)).logits
    assert torch.allclose(flex, dense, atol=1e-4)
    assert tiny.config._attn_implementation != "flex_attention"  # put back afterwards


def trainer_on(rows, tiny_model_dir, tmp_path, **overrides):
    from datasets import Dataset

    from llmhelpers.data.sources import DataBundle, DataReport
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.trainer import build_trainer

    cfg = make_config("smoke", output_dir=str(tmp_path / "out"), tiny_model_dir=str(tiny_model_dir), lora_dropout=0.0,
                      accuracy_callback=False, **overrides)
    ds = Dataset.from_dict(rows)
    torch.manual_seed(0)
    model = attach_lora(load_base_model(cfg), cfg)
    return build_trainer(cfg, model, load_tokenizer(cfg), DataBundle(ds, ds, [], [], [], DataReport())), cfg


def test_the_loss_of_a_packed_batch_equals_the_padded_batchs(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import masking_utils
    from trl import SFTTrainer

    torch.manual_seed(1)
    ids = [torch.randint(5, 1000, (n,)).tolist() for n in (300, 120, 250)]
    rows = {"input_ids": ids, "completion_mask": [[0] * 40 + [1] * (len(r) - 40) for r in ids]}
    padded, _ = trainer_on(rows, tiny_model_dir, tmp_path / "a", per_device_train_batch_size=3,
                        per_device_eval_batch_size=3)
    packed, _ = trainer_on(rows, tiny_model_dir, tmp_path / "b", **PACKED)
    losses = {}
    for name, trainer in (("padded", padded), ("packed", packed)):
        (batch,) = list(trainer.get_eval_dataloader())
        batch = trainer._prepare_inputs(batch)
        losses[name] = trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)[0].item()
        if name == "packed":
            assert batch["input_ids"].shape == (1, 1024) and trailing_padding(batch["position_ids"]) == 1024 - 670
            # no mask at all: transformers' own packed-row detection (position_ids, no cache) switched off as well
            monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
            losses["leaky"] = SFTTrainer.prediction_step(trainer, trainer.model, batch, True)[0].item()
    assert abs(losses["packed"] - losses["padded"]) / losses["padded"] <= 1e-3, losses
    assert abs(losses["leaky"] - losses["padded"]) / losses["padded"] > 1e-3, "the test cannot see a missing mask"


def test_every_row_once_per_epoch_and_the_schedule_counts_packed_steps(tiny_model_dir, tmp_path):
    from llmhelpers.training.run import run_training

    torch.manual_seed(2)
    ids = [torch.randint(5, 1000, (n,)).tolist() for n in (700, 600, 500, 400, 300, 200, 100, 90)]
    rows = {"input_ids": ids, "completion_mask": [[0] * 10 + [1] * (len(r) - 10) for r in ids]}
    trainer, cfg = trainer_on(rows, tiny_model_dir, tmp_path, **PACKED, gradient_accumulation_steps=1,
                         max_steps=-1, num_train_epochs=2, eval_steps=100, save_steps=100)
    packs = trainer.train_dataset["seq_lengths"]
    assert sorted(n for pack in packs for n in pack) == sorted(map(len, ids))  # each row in exactly one pack, whole
    assert all(sum(pack) <= 1024 for pack in packs) and len(packs) == 3  # best-fit decreasing: 2,890 tokens in 3
    seen = []
    trainer.add_callback(type("Seen", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, a, s, c, **k: seen.append(s.global_step)})())
    out = run_training(trainer, cfg)
    assert out.global_step == 2 * len(packs) == seen[-1]  # the learning-rate schedule ran over the real step count
    # TRL counts whole rows (3 x 1,024 per epoch); the padding is taken off, added up on the device and read at
    # each log (bench/profile_train.py --syncs: no wait for it at every step)
    logged = [r["num_tokens"] for r in trainer.state.log_history if "loss" in r]
    assert len(logged) >= 2 and logged[-1] == 2 * 2890 and trainer.llm_padding_pending is None
    assert json.loads((Path(trainer.args.output_dir) / "run_complete.json").read_text())["global_step"] == 6


def test_a_checkpoint_between_logs_counts_the_tokens_trained_without_the_padding(tiny_model_dir, tmp_path):
    """The padding of packed rows is added up on the device and taken off TRL's count when the count is read: a
    checkpoint saved between two logs reads it too (run_totals.json is what a resume continues from)."""
    from llmhelpers.training.run import run_training

    torch.manual_seed(2)
    ids = [torch.randint(5, 1000, (n,)).tolist() for n in (700, 600, 500, 400, 300, 200, 100, 90)]
    rows = {"input_ids": ids, "completion_mask": [[0] * 10 + [1] * (len(r) - 10) for r in ids]}
    trainer, cfg = trainer_on(rows, tiny_model_dir, tmp_path, **PACKED, gradient_accumulation_steps=1, max_steps=3,
                              eval_strategy="no", load_best_model_at_end=False, save_steps=1, logging_steps=50)
    run_training(trainer, cfg)
    totals = [json.loads((cfg.run_dir / f"checkpoint-{s}" / "run_totals.json").read_text())["num_tokens"]
              for s in (1, 2, 3)]
    assert totals[0] < totals[1] < totals[2] == 2890  # the 8 rows once (3 rows of 1,024 tokens padded: 3,072)
