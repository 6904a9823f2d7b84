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


def test_keyed_draws_follow_their_seeds_and_the_nucleus_distribution():
    """With seeds (the engine's draw_seed), a row's token is a function of its logits and its seed alone: the same
    in any batch and order; over many seeds the frequencies are the renormalised nucleus."""
    from llmhelpers.inference.sampling import draw_seed, keyed_uniform

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = probs.log()[None].expand(200_000, 5)
    seeds = torch.tensor([draw_seed(7, request, 30) for request in range(200_000)])
    drawn = sample_top_p_sorted(logits, 1.0, 0.85, seeds)
    assert torch.equal(sample_top_p_sorted(logits[:1000], 1.0, 0.85, seeds[:1000].flip(0)).flip(0), drawn[:1000])
    nucleus = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9  # 0.5 + 0.25 < 0.85: the third token is in it
    assert (torch.bincount(drawn, minlength=5) / 200_000 - nucleus).abs().max() < 0.005  # std error ~0.001
    u = keyed_uniform(seeds[:64], 1000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and torch.equal(u, keyed_uniform(seeds[:64], 1000))
    assert draw_seed(7, 1, 30) != draw_seed(7, 0, 31) != draw_seed(8, 0, 30)
