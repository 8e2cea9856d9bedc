"""This package's diffusion.py beyond the skeleton's contract (A3_PartB/diffusion_contract.py).

What a student's file need not do, and ours does: a float64 schedule, named buffers that follow
``.to()`` and stay out of the state_dict, the handout's name ``p_loss``, argument checks,
optional ``noise``, no draw at the last step, every frame of the reverse process, and the
train/eval mode kept around sampling.
"""

import pytest
import torch

from diffusion import Diffusion, cosine_schedule, unnormalize_to_zero_to_one
from diffusion_contract import images
from diffusion_probes import CHANNELS, replace_noise, SIZE
from diffusion_probes import known_noise_prediction, StubNetwork
from diffusion_reference import Handout

T = 20
HANDOUT = Handout(T)


def stub_diffusion(**settings):
    return Diffusion(StubNetwork(known_noise_prediction), image_size=SIZE, timesteps=T, **settings)


# ---- schedule


@pytest.mark.parametrize("timesteps", [1, 10, 50, 1000])
def test_cosine_schedule_is_eq_3_in_float64(timesteps):
    """eq. (3) to float64 round-off, where the contract allows float32's 1e-4."""
    alphas = cosine_schedule(timesteps)
    assert alphas.dtype == torch.float64
    torch.testing.assert_close(alphas, Handout(timesteps).alpha, rtol=1e-12, atol=0)


@pytest.mark.parametrize("timesteps", [0, -3, 2.5])
def test_cosine_schedule_rejects_a_timesteps_that_is_not_a_whole_number_from_1(timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        cosine_schedule(timesteps)


# eq. (6) and eq. (7), each buffer from the handout's float64 values
EXPECTED_BUFFERS = {
    "alphas": lambda h: h.alpha,
    "alphas_cumprod": lambda h: h.abar,
    "alphas_cumprod_prev": lambda h: h.abar_prev,
    "sqrt_alphas_cumprod": lambda h: h.abar.sqrt(),
    "sqrt_one_minus_alphas_cumprod": lambda h: (1 - h.abar).sqrt(),
    "posterior_variance": lambda h: h.sigma ** 2,
    "posterior_mean_coef1": lambda h: h.abar_prev.sqrt() * (1 - h.alpha) / (1 - h.abar),
    "posterior_mean_coef2": lambda h: h.alpha.sqrt() * (1 - h.abar_prev) / (1 - h.abar),
}


@pytest.mark.parametrize("name", EXPECTED_BUFFERS)
def test_buffer_is_the_float64_value_rounded_once_to_float32(name):
    buffer = getattr(stub_diffusion(), name)
    assert buffer.dtype == torch.float32
    torch.testing.assert_close(buffer, EXPECTED_BUFFERS[name](HANDOUT).float(), rtol=1e-6, atol=0)


def test_schedule_buffers_follow_dtype_and_device():
    diffusion = stub_diffusion()
    assert set(EXPECTED_BUFFERS) <= dict(diffusion.named_buffers()).keys()
    as_double = diffusion.to(torch.float64)
    assert all(getattr(as_double, name).dtype == torch.float64 for name in EXPECTED_BUFFERS)
    on_meta = diffusion.to("meta")
    assert all(getattr(on_meta, name).device.type == "meta" for name in EXPECTED_BUFFERS)


def test_state_dict_holds_only_the_network_as_a_starter_checkpoint():
    """The buffers derive from T, so they are not saved."""
    assert list(stub_diffusion().state_dict()) == ["model.gain"]


# ---- arguments


def test_diffusion_rejects_a_timesteps_below_1():
    with pytest.raises(ValueError, match="timesteps"):
        Diffusion(StubNetwork(known_noise_prediction), image_size=SIZE, timesteps=0)


@pytest.mark.parametrize("image_size", [0, 2.5])
def test_diffusion_rejects_an_image_size_that_is_not_a_positive_whole_number(image_size):
    with pytest.raises(ValueError, match="image_size"):
        Diffusion(StubNetwork(known_noise_prediction), image_size=image_size, timesteps=T)


def test_diffusion_rejects_a_model_with_other_channels():
    network = StubNetwork(known_noise_prediction)
    network.channels = 1
    with pytest.raises(ValueError, match="channels"):
        Diffusion(network, image_size=SIZE, channels=3, timesteps=T)


def test_forward_rejects_images_of_the_wrong_size():
    with pytest.raises(ValueError, match=f"image_size={SIZE}"):
        stub_diffusion()(torch.zeros(2, CHANNELS, 2 * SIZE, 2 * SIZE))


# ---- training


def test_p_loss_is_the_handouts_name_for_p_losses():
    assert Diffusion.p_loss is Diffusion.p_losses


def test_p_loss_is_the_l1_loss_of_algorithm_1():
    """Line 6: mean |noise - eps_theta(x_t, t)|, x_t of eq. (6) from the float64 schedule."""
    diffusion = stub_diffusion()
    x_0, noise, t = images(2, seed=1), images(2, seed=2), torch.tensor([3, 11])
    abar = HANDOUT.abar[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x_0.double() + (1 - abar).sqrt() * noise.double()
    expected = (noise.double() - known_noise_prediction(x_t, t)).abs().mean()
    torch.testing.assert_close(diffusion.p_loss(x_0, t, noise).double(), expected, rtol=1e-6,
                               atol=0)


def test_noise_left_out_is_drawn_by_noise_like():
    """q_sample, p_losses and forward default to noise_like's draw."""
    diffusion = stub_diffusion()
    replace_noise(diffusion, torch.ones)
    x_0, t, ones = images(2, seed=3), torch.tensor([3, 11]), torch.ones(2, CHANNELS, SIZE, SIZE)
    assert torch.equal(diffusion.q_sample(x_0, t), diffusion.q_sample(x_0, t, ones))
    assert diffusion.p_losses(x_0, t) == diffusion.p_losses(x_0, t, ones)
    torch.manual_seed(0)
    default = diffusion(x_0)
    torch.manual_seed(0)
    assert default == diffusion(x_0, ones)


# ---- sampling


def test_sample_draws_x_T_then_one_noise_per_step_but_the_last():
    """Algorithm 2 line 3: z = 0 at the last step, so nothing is drawn for it."""
    diffusion = stub_diffusion()
    draws = []
    replace_noise(diffusion, lambda shape: draws.append(shape) or torch.zeros(shape))
    diffusion.sample(3)
    assert draws == [(3, CHANNELS, SIZE, SIZE)] * T


def test_p_sample_loop_returns_every_frame_from_x_T_down_to_x_0():
    diffusion = stub_diffusion()
    replace_noise(diffusion, torch.zeros)
    x_T = images(2, seed=4)
    frames = diffusion.p_sample_loop(x_T, return_all_timesteps=True)
    assert frames.shape == (T + 1, 2, CHANNELS, SIZE, SIZE)
    x = x_T
    for steps_done, t_index in enumerate(reversed(range(T)), start=1):  # frame k: after k steps
        x = diffusion.p_sample(x, torch.full((2,), t_index), t_index)
        torch.testing.assert_close(frames[steps_done], unnormalize_to_zero_to_one(x).clamp(0, 1))
    assert torch.equal(frames[0], unnormalize_to_zero_to_one(x_T).clamp(0, 1))
    assert torch.equal(frames[-1], diffusion.p_sample_loop(x_T))


def test_sample_is_made_on_the_device_of_the_buffers():
    assert stub_diffusion().to("meta").sample(2).device.type == "meta"


@pytest.mark.parametrize("training", [True, False])
def test_sample_runs_the_network_in_eval_mode_and_restores_the_mode(training):
    diffusion = stub_diffusion()
    diffusion.train(training)
    modes = []
    diffusion.model.register_forward_hook(lambda module, args, output: modes.append(module.training))
    diffusion.sample(1)
    assert set(modes) == {False}
    assert diffusion.training is training and diffusion.model.training is training
