"""A short end-to-end training run: the loss drops and the samples look like the data."""

import pytest
import torch

from diffusion import Diffusion
from unet import Unet

SIZE = 8
COLOUR = torch.tensor([0.5, -0.3, 0.1])  # per-channel mean of the toy data, in [-1, 1]


def toy_images(batch, generator):
    """Flat images of one colour, jittered by up to +-0.1 per channel."""
    jitter = (torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1) * 0.1
    return (COLOUR.view(1, 3, 1, 1) + jitter).expand(batch, 3, SIZE, SIZE)


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_samples_match_the_data_mean():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    diffusion = Diffusion(Unet(16, dim_mults=(1, 2)), image_size=SIZE, timesteps=50)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = diffusion(toy_images(32, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.3 * first
    samples = diffusion.sample(64) * 2 - 1
    torch.testing.assert_close(samples.mean(dim=(0, 2, 3)), COLOUR, atol=0.1, rtol=0)
