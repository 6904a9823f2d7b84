"""Shared fixtures: R1-style tokenizers in both template revisions and a tiny model on disk."""
import pytest

from llmhelpers.data.sources import Example
from llmhelpers.model.tiny import build_tiny_r1, build_tokenizer


@pytest.fixture(scope="session")
def tok_current():
    return build_tokenizer("current")


@pytest.fixture(scope="session")
def tok_original():
    return build_tokenizer("original")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_r1(tmp_path_factory.mktemp("tiny") / "tiny-r1")


@pytest.fixture
def example():
    return Example(question="What is 6 times 7?\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
                   reasoning="6 * 7 = 42.", answer="The answer is $\\boxed{42}$.", gold="42",
                   source="mathcodeinstruct")
