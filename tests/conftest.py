"""Shared fixtures: R1-style tokenizers in both template revisions and a tiny model on disk."""
import pytest

from llmhelpers.data.sources import Example
from llmhelpers.model.tiny import build_tiny_llama, build_tiny_r1, build_tokenizer


@pytest.fixture(scope="session")
def tok_current():
    return build_tokenizer("current")


@pytest.fixture(scope="session")
def tok_original():
    return build_tokenizer("original")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_r1(tmp_path_factory.mktemp("tiny") / "tiny-r1")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny LlamaForCausalLM (no biases, tied embeddings) with a ChatML tokenizer that lacks R1's markers."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def tiny_arch(request, tiny_model_dir, tiny_llama_dir):
    """(architecture, model folder): the tests that take it run on the tiny Qwen2 and on the tiny Llama."""
    return request.param, tiny_model_dir if request.param == "qwen2" else tiny_llama_dir


def arch_config(tiny_arch, **changes):
    """The smoke profile on one of the tiny models."""
    from llmhelpers.config.profiles import make_config

    arch, path = tiny_arch
    where = {"tiny_model_dir": str(path)} if arch == "qwen2" else {"model_id": str(path)}
    return make_config("smoke", **{**where, **changes})


def build_tiny_trainer(cfg):
    """The notebook's trainer for `cfg`, built as the CLI builds it: (trainer, cfg, tokenizer, data)."""
    from llmhelpers.data.sources import build_datasets
    from llmhelpers.model.loading import attach_lora, load_base_model, load_tokenizer
    from llmhelpers.training.trainer import build_trainer

    tokenizer = load_tokenizer(cfg)
    data = build_datasets(cfg, tokenizer)
    return build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), tokenizer, data), cfg, tokenizer, data


@pytest.fixture
def tiny_trainer(tmp_path, tiny_model_dir):
    """`tiny_trainer(cfg)` for a config of the test's own, or `tiny_trainer(**changes)` for the smoke profile with
    those changes (output under tmp_path, the accuracy callback off unless asked): build_tiny_trainer's tuple."""
    from llmhelpers.config.profiles import make_config

    def build(cfg=None, **changes):
        if cfg is None:
            cfg = make_config("smoke", **{"output_dir": str(tmp_path / "out"), "tiny_model_dir": str(tiny_model_dir),
                                          "accuracy_callback": False, **changes})
        return build_tiny_trainer(cfg)

    return build


def interrupted_and_rerun(trainer, cfg, step: int) -> str:
    """A KeyboardInterrupt (what Kernel > Interrupt raises) after `step` of the run's training; returns the one-line
    message the training cell shows. The caller then calls train() again on the same trainer, as a re-run cell does."""
    import transformers

    from llmhelpers.training.run import TrainingInterrupted, run_training

    class Interrupt(transformers.TrainerCallback):
        def __init__(self):
            self.armed = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed and state.global_step == step:
                self.armed = False
                raise KeyboardInterrupt

    trainer.add_callback(Interrupt())
    with pytest.raises(TrainingInterrupted) as caught:
        run_training(trainer, cfg)
    return str(caught.value)


def greedy_tokens_match(llm, model, prompt: list[int], n: int = 8) -> bool:
    """llama.cpp's greedy continuation of `prompt` (token ids) equals transformers' for `n` tokens."""
    import torch

    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    llm.reset()
    ours = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        ours.append(token)
        if len(ours) == n:
            break
    return ours == hf


@pytest.fixture
def example():
    return Example(question="What is 6 times 7?\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
                   reasoning="6 * 7 = 42.", answer="The answer is $\\boxed{42}$.", gold="42",
                   source="mathcodeinstruct")
