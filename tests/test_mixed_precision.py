"""Mixed precision only rounds: the U-Net under bf16 or fp16 autocast computes the float32
network (the starter's epsilons included), so a model trained in one precision samples the
same images in another.

The network here has its normalised variances made small (every standardised convolution's
weight, and the projection before each attention's LayerNorm, scaled by 0.1: the functions
they feed are nearly scale-free, so training reaches such weights), where the epsilon of a
normalisation decides the output: the test that catches a precision-dependent epsilon, shown
by the mutant that takes the starter's 1e-3 under autocast. The measurement is
``benchmarks/precision_fidelity.py``'s, which reports the same figures for a trained model.
"""
import sys
from pathlib import Path

import pytest
import torch

import unet
from diffusion import Diffusion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from precision_fidelity import (BOUNDS, beyond_bounds, network_fidelity,  # noqa: E402
                                reverse_step_fidelity, with_small_variances)

MIXED_PRECISIONS = [torch.bfloat16, torch.float16]  # bf16 emulated where the CPU lacks it


@pytest.fixture
def small_variance_unet():
    torch.manual_seed(0)
    return with_small_variances(unet.Unet(8, dim_mults=(1, 2))).eval()


@pytest.fixture
def noised_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.tensor([0, 10, 25, 49])


def starters_epsilon_under_autocast(parameter):
    """The mutant: the starter's rule, 1e-3 whenever autocast makes the activations bf16/fp16."""
    return 1e-3 if torch.is_autocast_enabled("cpu") else 1e-5


def test_small_variances_make_the_output_depend_on_the_epsilon(small_variance_unet, noised_batch,
                                                                monkeypatch):
    with torch.no_grad():
        with_float32_epsilon = small_variance_unet(*noised_batch)
        monkeypatch.setattr(unet, "norm_eps", lambda parameter: 1e-3)
        with_starters_half_epsilon = small_variance_unet(*noised_batch)
    difference = (with_starters_half_epsilon - with_float32_epsilon).norm() / with_float32_epsilon.norm()
    assert difference > 0.1


@pytest.mark.parametrize("dtype", MIXED_PRECISIONS, ids=str)
def test_unet_under_autocast_is_the_float32_network_to_rounding(small_variance_unet, noised_batch,
                                                               dtype):
    errors = network_fidelity(small_variance_unet, *noised_batch, dtype)
    assert beyond_bounds(errors) == {}
    # every other place whose arithmetic could follow a dtype rounds no worse than the U-Net
    assert max(errors.values()) <= BOUNDS["unet"]


@pytest.mark.parametrize("dtype", MIXED_PRECISIONS, ids=str)
def test_an_epsilon_that_follows_autocast_is_caught(small_variance_unet, noised_batch, dtype,
                                                    monkeypatch):
    monkeypatch.setattr(unet, "norm_eps", starters_epsilon_under_autocast)
    errors = network_fidelity(small_variance_unet, *noised_batch, dtype)
    assert errors["LinearAttention"] > BOUNDS["LinearAttention"]
    assert errors["unet"] > BOUNDS["unet"]


def test_the_epsilon_of_a_network_cast_to_half_is_the_starters():
    assert unet.norm_eps(torch.zeros(1)) == 1e-5
    assert unet.norm_eps(torch.zeros(1, dtype=torch.bfloat16)) == 1e-3
    assert unet.norm_eps(torch.zeros(1, dtype=torch.float16)) == 1e-3


@pytest.mark.parametrize("dtype", MIXED_PRECISIONS, ids=str)
def test_a_reverse_step_under_autocast_rounds_only(small_variance_unet, noised_batch, dtype):
    diffusion = Diffusion(small_variance_unet, image_size=8, timesteps=50)
    x_t, _ = noised_batch
    assert reverse_step_fidelity(diffusion, x_t, 10, dtype) < BOUNDS["unet"]
