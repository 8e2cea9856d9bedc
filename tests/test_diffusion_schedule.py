"""The improved cosine schedule (handout eq. 3) and the coefficients built from it (eqs. 6-7).

Expected values are computed here from the closed forms with numpy, independently of
diffusion.py, so these tests also check a student's own implementation.
"""

import math

import numpy as np
import pytest
import torch

from diffusion import Diffusion, cosine_schedule, extract

T = 50


def closed_form_alphas(timesteps, s=0.008):
    """alpha_t = clip(abar(t) / abar(t-1), 0.001, 1), abar(t) = f(t) / f(0), in float64."""
    def f(t):
        return math.cos(((t / timesteps + s) / (1 + s)) * math.pi / 2) ** 2

    abar = [f(t) / f(0) for t in range(timesteps + 1)]
    return np.clip([abar[t] / abar[t - 1] for t in range(1, timesteps + 1)], 0.001, 1.0)


class Echo(torch.nn.Module):
    """A stand-in network: the schedule tests never call it."""

    channels = 3

    def forward(self, x, t):
        return x


@pytest.fixture
def diffusion():
    return Diffusion(Echo(), image_size=8, timesteps=T)


@pytest.mark.parametrize("timesteps", [1, 10, 50, 1000])
def test_cosine_schedule_matches_closed_form(timesteps):
    alphas = cosine_schedule(timesteps)
    assert alphas.shape == (timesteps,)
    np.testing.assert_allclose(alphas.numpy(), closed_form_alphas(timesteps), rtol=1e-12)


def test_cosine_schedule_is_computed_in_float64():
    assert cosine_schedule(T).dtype == torch.float64


def test_cosine_schedule_clips_the_last_alpha_to_its_lower_bound():
    alphas = cosine_schedule(T)
    assert alphas.min().item() == pytest.approx(0.001)
    assert alphas[-1].item() == pytest.approx(0.001)
    assert torch.all((alphas >= 0.001) & (alphas <= 1.0))


def test_cosine_schedule_honours_the_offset_s():
    assert not torch.allclose(cosine_schedule(T, s=0.008), cosine_schedule(T, s=0.1))
    np.testing.assert_allclose(cosine_schedule(T, s=0.1).numpy(), closed_form_alphas(T, s=0.1), rtol=1e-12)


@pytest.mark.parametrize("timesteps", [0, -3, 2.5])
def test_cosine_schedule_rejects_invalid_timesteps(timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        cosine_schedule(timesteps)


def test_diffusion_rejects_invalid_timesteps():
    with pytest.raises(ValueError, match="timesteps"):
        Diffusion(Echo(), image_size=8, timesteps=0)


def test_alphas_buffer_holds_the_clipped_schedule(diffusion):
    np.testing.assert_allclose(diffusion.alphas.numpy(), closed_form_alphas(T), rtol=1e-6)


def test_alphas_cumprod_is_the_running_product_of_the_clipped_alphas(diffusion):
    expected = np.cumprod(closed_form_alphas(T))
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), expected, rtol=1e-5, atol=1e-12)


def test_alphas_cumprod_prev_is_one_before_the_first_step(diffusion):
    assert diffusion.alphas_cumprod_prev[0].item() == 1.0
    np.testing.assert_allclose(
        diffusion.alphas_cumprod_prev[1:].numpy(), diffusion.alphas_cumprod[:-1].numpy(), rtol=1e-6
    )


def test_sqrt_coefficients_of_q_sample(diffusion):
    abar = np.cumprod(closed_form_alphas(T))
    np.testing.assert_allclose(diffusion.sqrt_alphas_cumprod.numpy(), np.sqrt(abar), rtol=1e-5)
    np.testing.assert_allclose(diffusion.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - abar), rtol=1e-5)


def test_posterior_variance_matches_eq7_at_every_t(diffusion):
    alphas = closed_form_alphas(T)
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    expected = (1 - abar_prev) / (1 - abar) * (1 - alphas)
    np.testing.assert_allclose(diffusion.posterior_variance.numpy(), expected, rtol=1e-5, atol=1e-12)
    assert diffusion.posterior_variance[0].item() == 0.0


def test_posterior_mean_coefficients_match_corrected_eq7_at_every_t(diffusion):
    alphas = closed_form_alphas(T)
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    x0_coef = np.sqrt(abar_prev) * (1 - alphas) / (1 - abar)
    xt_coef = np.sqrt(alphas) * (1 - abar_prev) / (1 - abar)  # sqrt(alpha_t), not sqrt(abar_t)
    np.testing.assert_allclose(diffusion.posterior_mean_coef1.numpy(), x0_coef, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(diffusion.posterior_mean_coef2.numpy(), xt_coef, rtol=1e-5, atol=1e-12)


def test_extract_gathers_one_coefficient_per_sample_and_broadcasts():
    coefficients = torch.tensor([10.0, 20.0, 30.0])
    t = torch.tensor([2, 0, 1, 2])
    picked = extract(coefficients, t, (4, 3, 5, 5))
    assert picked.shape == (4, 1, 1, 1)
    assert picked.flatten().tolist() == [30.0, 10.0, 20.0, 30.0]


def test_schedule_buffers_follow_dtype_and_device(diffusion):
    names = ["alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
             "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod"]
    buffers = dict(diffusion.named_buffers())
    assert set(names) <= set(buffers)
    as_double = diffusion.to(torch.float64)
    assert all(getattr(as_double, name).dtype == torch.float64 for name in names)
    on_meta = diffusion.to("meta")
    assert all(getattr(on_meta, name).device.type == "meta" for name in names)
