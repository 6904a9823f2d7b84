"""SamplingParams, the one generation-settings object, and the sorted top-p reference sampler it drives."""
import pytest
import torch

from llmhelpers.config.profiles import make_config
from llmhelpers.inference.sampling import SamplingParams, sample_top_p_sorted


def test_sampling_params_check_their_values_and_say_what_is_wrong():
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
    for bad, message in ((dict(temperature=-0.1), "temperature must be >= 0"), (dict(top_p=0.0), "top_p must be"),
                         (dict(top_p=1.5), "top_p must be"), (dict(max_new_tokens=0), "max_new_tokens must be"),
                         (dict(temperature=float("nan")), "temperature must be")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)


def test_the_evaluation_protocol_is_one_sampling_params_from_cfg():
    cfg = make_config("smoke", eval_max_new_tokens=77, eval_temperature=0.7, eval_top_p=0.9, seed=5)
    assert SamplingParams.for_evaluation(cfg) == SamplingParams(77, 0.7, 0.9, 5)
    assert SamplingParams.for_evaluation(cfg.replace(eval_do_sample=False)).greedy
    assert SamplingParams(temperature=0.0).generate_kwargs() == {"do_sample": False}
    assert SamplingParams(temperature=0.7, top_p=0.9).generate_kwargs() == {"do_sample": True, "temperature": 0.7,
                                                                             "top_p": 0.9}


def test_the_sorted_sampler_takes_its_settings_as_tensors_as_the_engine_keeps_them():
    """The engine holds temperature and top-p in device tensors (its CUDA graphs read them, so new values need no new
    capture): numbers and tensors draw the same tokens."""
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]) + 1e-30).expand(500, 4)
    torch.manual_seed(0)
    as_numbers = sample_top_p_sorted(logits, 1.0, 0.8)
    torch.manual_seed(0)
    as_tensors = sample_top_p_sorted(logits, torch.tensor(1.0), torch.tensor(0.8))
    assert torch.equal(as_numbers, as_tensors) and set(as_numbers.tolist()) == {0, 1}  # the nucleus: 0.6 + 0.3
    torch.manual_seed(0)
    assert set(sample_top_p_sorted(logits, torch.tensor(1.0), torch.tensor(0.5)).tolist()) == {0}
