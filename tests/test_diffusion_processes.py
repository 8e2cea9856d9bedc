"""Forward process, training loss (Algorithm 1) and reverse process (Algorithm 2).

Networks here are stand-ins whose output is known, so every expected value is computed
by hand from the schedule.
"""

import pytest
import torch

from diffusion import Diffusion, cosine_schedule, unnormalize_to_zero_to_one

T = 20
SIZE = 4


class Oracle(torch.nn.Module):
    """Returns the exact noise that turns a known x_0 into x_t (eq. 2 solved for epsilon)."""

    channels = 3

    def __init__(self, x_0):
        super().__init__()
        self.x_0 = x_0
        self.alphas_cumprod = torch.cumprod(cosine_schedule(T), dim=0).float()
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append(t.clone())
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * self.x_0) / (1 - abar).sqrt()


class Scaled(torch.nn.Module):
    """Predicts 0.5 * x_t, whatever t is; records the steps it was asked about."""

    channels = 3

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.seen_t = []

    def forward(self, x_t, t):
        self.seen_t.append(t.clone())
        return self.weight * x_t


def images(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, SIZE, SIZE, generator=generator) * 2 - 1


def with_oracle(x_0):
    return Diffusion(Oracle(x_0), image_size=SIZE, timesteps=T)


def test_q_sample_has_the_mean_and_variance_of_eq6():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    torch.manual_seed(0)
    x_0 = torch.full((20000, 3, SIZE, SIZE), 0.7)
    t = torch.full((20000,), 7)
    x_t = diffusion.q_sample(x_0, t)
    abar = diffusion.alphas_cumprod[7]
    assert x_t.mean().item() == pytest.approx(abar.sqrt().item() * 0.7, abs=5e-3)
    assert x_t.var().item() == pytest.approx((1 - abar).item(), rel=1e-2)


def test_q_sample_uses_the_given_noise():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    x_0, noise, t = images(), images(seed=1), torch.tensor([0, T - 1])
    expected = torch.stack([
        diffusion.alphas_cumprod[i].sqrt() * x_0[k] + (1 - diffusion.alphas_cumprod[i]).sqrt() * noise[k]
        for k, i in enumerate(t.tolist())
    ])
    torch.testing.assert_close(diffusion.q_sample(x_0, t, noise), expected)


def test_p_losses_is_the_l1_distance_between_true_and_predicted_noise():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    x_0, noise, t = images(), images(seed=1), torch.tensor([3, 11])
    x_t = diffusion.q_sample(x_0, t, noise)
    expected = (noise - 0.5 * x_t).abs().mean()
    torch.testing.assert_close(diffusion.p_losses(x_0, t, noise), expected)


def test_p_loss_is_the_handouts_name_for_p_losses():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    x_0, noise, t = images(), images(seed=1), torch.tensor([3, 11])
    torch.testing.assert_close(diffusion.p_loss(x_0, t, noise), diffusion.p_losses(x_0, t, noise))


def test_p_losses_reaches_the_network_parameters():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    diffusion.p_losses(images(), torch.tensor([3, 11])).backward()
    assert diffusion.model.weight.grad is not None and diffusion.model.weight.grad != 0


def test_forward_returns_a_scalar_loss_and_draws_every_time_step():
    model = Scaled()
    diffusion = Diffusion(model, image_size=SIZE, timesteps=T)
    torch.manual_seed(0)
    for _ in range(60):
        loss = diffusion(images(batch=8))
    assert loss.dim() == 0
    drawn = torch.cat(model.seen_t)
    assert set(drawn.tolist()) == set(range(T))


def test_forward_rejects_images_of_the_wrong_size():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    with pytest.raises(ValueError, match="image_size=4"):
        diffusion(torch.zeros(2, 3, SIZE * 2, SIZE * 2))


def test_p_sample_recovers_x0_when_the_predicted_noise_is_exact():
    x_0 = images()
    diffusion = with_oracle(x_0)
    t = torch.zeros(2, dtype=torch.long)
    x_t = diffusion.q_sample(x_0, t)
    torch.testing.assert_close(diffusion.p_sample(x_t, t, 0), x_0)


MIDDLE_STEP = 9


def constant_noise(value):
    """A replacement for ``noise_like`` that returns a constant."""
    return lambda shape, device: torch.full(shape, float(value), device=device)


@pytest.fixture
def middle_step():
    """An oracle diffusion, its x_0, and x_t at a step in the middle of the chain."""
    x_0 = images()
    diffusion = with_oracle(x_0)
    t = torch.full((2,), MIDDLE_STEP)
    return diffusion, x_0, diffusion.q_sample(x_0, t), t


def test_p_sample_mean_is_the_posterior_mean_of_eq7(monkeypatch, middle_step):
    diffusion, x_0, x_t, t = middle_step
    monkeypatch.setattr(diffusion, "noise_like", constant_noise(0))
    alpha, abar = diffusion.alphas[MIDDLE_STEP], diffusion.alphas_cumprod[MIDDLE_STEP]
    abar_prev = diffusion.alphas_cumprod[MIDDLE_STEP - 1]
    expected = (
        abar_prev.sqrt() * (1 - alpha) / (1 - abar) * x_0
        + alpha.sqrt() * (1 - abar_prev) / (1 - abar) * x_t
    )
    torch.testing.assert_close(diffusion.p_sample(x_t, t, MIDDLE_STEP), expected)


def test_p_sample_adds_noise_scaled_by_the_posterior_std(monkeypatch, middle_step):
    diffusion, _, x_t, t = middle_step
    monkeypatch.setattr(diffusion, "noise_like", constant_noise(0))
    mean = diffusion.p_sample(x_t, t, MIDDLE_STEP)
    monkeypatch.setattr(diffusion, "noise_like", constant_noise(1))
    shifted = diffusion.p_sample(x_t, t, MIDDLE_STEP)
    expected_std = diffusion.posterior_variance[MIDDLE_STEP].sqrt().item()
    torch.testing.assert_close(shifted - mean, torch.full_like(mean, expected_std))


def test_p_sample_clamps_the_x0_estimate():
    far_outside = torch.full((1, 3, SIZE, SIZE), 5.0)
    diffusion = with_oracle(far_outside)
    t = torch.zeros(1, dtype=torch.long)
    x_t = diffusion.q_sample(far_outside, t)
    assert diffusion.p_sample(x_t, t, 0).max().item() == pytest.approx(1.0)


def test_p_sample_adds_no_noise_at_the_last_step(monkeypatch):
    diffusion = with_oracle(images())
    draws = []
    monkeypatch.setattr(diffusion, "noise_like", lambda shape, device: draws.append(shape) or torch.ones(shape))
    diffusion.p_sample(images(seed=3), torch.zeros(2, dtype=torch.long), 0)
    assert draws == []


def test_p_sample_loop_walks_every_step_from_T_minus_1_to_0_and_recovers_x0():
    x_0 = images()
    diffusion = with_oracle(x_0)
    result = diffusion.p_sample_loop(torch.randn(2, 3, SIZE, SIZE))
    steps = [t[0].item() for t in diffusion.model.calls]
    assert steps == list(range(T - 1, -1, -1))
    torch.testing.assert_close(result, unnormalize_to_zero_to_one(x_0))


def test_p_sample_loop_returns_every_frame_starting_from_x_T():
    diffusion = with_oracle(images())
    x_T = torch.randn(2, 3, SIZE, SIZE)
    frames = diffusion.p_sample_loop(x_T, return_all_timesteps=True)
    assert frames.shape == (T + 1, 2, 3, SIZE, SIZE)
    torch.testing.assert_close(frames[0], unnormalize_to_zero_to_one(x_T).clamp(0, 1))
    assert frames.min() >= 0 and frames.max() <= 1


def test_all_sampling_noise_goes_through_noise_like(monkeypatch):
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    draws = []

    def zeros(shape, device):
        draws.append(tuple(shape))
        return torch.zeros(shape, device=device)

    monkeypatch.setattr(diffusion, "noise_like", zeros)
    torch.manual_seed(1)
    first = diffusion.sample(3)
    torch.manual_seed(2)
    second = diffusion.sample(3)
    torch.testing.assert_close(first, second)  # no randomness outside noise_like
    assert len(draws) == 2 * T  # x_T, then one draw for each step but the last


def test_sample_has_the_right_shape_device_and_range():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    samples = diffusion.sample(5)
    assert samples.shape == (5, 3, SIZE, SIZE)
    assert samples.device == diffusion.alphas.device
    assert samples.min() >= 0 and samples.max() <= 1


def test_sample_is_deterministic_under_a_fixed_seed():
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    torch.manual_seed(123)
    first = diffusion.sample(2)
    torch.manual_seed(123)
    torch.testing.assert_close(diffusion.sample(2), first)


@pytest.mark.parametrize("training", [True, False])
def test_sample_leaves_the_train_or_eval_mode_as_it_found_it(training):
    diffusion = Diffusion(Scaled(), image_size=SIZE, timesteps=T)
    diffusion.train(training)
    modes_seen = []
    diffusion.model.register_forward_hook(lambda module, args, out: modes_seen.append(module.training))
    diffusion.sample(1)
    assert set(modes_seen) == {False}
    assert diffusion.training is training and diffusion.model.training is training


def test_diffusion_rejects_a_model_with_other_channels():
    model = Scaled()
    model.channels = 1
    with pytest.raises(ValueError, match="channels"):
        Diffusion(model, image_size=SIZE, channels=3, timesteps=T)
