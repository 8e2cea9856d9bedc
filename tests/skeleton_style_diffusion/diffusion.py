"""A second correct DDPM, written the way a student fills in the starter's skeleton.

It exists to keep A3_PartB/diffusion_contract.py fair: the contract must pass on it as
well as on A3_PartB/diffusion.py, although it differs from that file wherever the skeleton
leaves room:

* the schedule is plain tensor attributes, not buffers, computed in float32;
* ``noise`` is a required argument of ``q_sample``, ``p_losses`` and ``forward``;
* x_0 is predicted as sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, the form of Ho et al.'s code;
* the posterior standard deviation is stored as Ho et al.'s clipped log-variance, whose first
  entry borrows the second (log 0 is -inf): only Algorithm 2 line 3 keeps that noise out;
* the loop returns images in [0, 1] without clamping (the last step already lands in [-1, 1]).

Time steps are 0-based: index t here is the handout's step t + 1.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def extract(a, t, x_shape):
    """a[t] for every sample in the batch, reshaped to broadcast against x_shape."""
    picked = a.index_select(0, t.to(a.device))
    return picked.view(t.numel(), *[1] * (len(x_shape) - 1))


def cosine_schedule(timesteps, s=0.008):
    """eq. (3): alpha_t = clip(abar(t) / abar(t - 1), 0.001, 1), abar(t) = f(t) / f(0)."""
    steps = torch.linspace(0, timesteps, timesteps + 1)
    f = torch.cos((steps / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (abar[1:] / abar[:-1]).clamp(min=0.001, max=1.0)


def unnormalize_to_zero_to_one(t):
    return (t + 1) * 0.5


class Diffusion(nn.Module):
    def __init__(self, model, *, image_size, channels=3, timesteps=1000):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.num_timesteps = timesteps

        self.alphas = cosine_schedule(timesteps)
        self.alphas_bar = torch.cumprod(self.alphas, 0)  # eq. (6)
        self.alphas_bar_prev = torch.cat([torch.ones(1), self.alphas_bar[:-1]])

        # eq. (8), rearranged: x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps
        self.sqrt_recip_alphas_bar = torch.rsqrt(self.alphas_bar)
        self.sqrt_recipm1_alphas_bar = torch.sqrt(1.0 / self.alphas_bar - 1.0)

        # eq. (7), with sqrt(alpha_t) on x_t as in Algorithm 2 line 7
        one_minus_bar = 1.0 - self.alphas_bar
        self.coef_x0 = self.alphas_bar_prev.sqrt() * (1.0 - self.alphas) / one_minus_bar
        self.coef_xt = self.alphas.sqrt() * (1.0 - self.alphas_bar_prev) / one_minus_bar
        variance = (1.0 - self.alphas_bar_prev) / one_minus_bar * (1.0 - self.alphas)
        self.log_variance = torch.log(torch.cat([variance[1:2], variance[1:]]))

    def noise_like(self, shape, device):
        return torch.randn(shape, device=device)

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        """Algorithm 2, lines 3-9, for one step."""
        eps = self.model(x, t)
        x0 = extract(self.sqrt_recip_alphas_bar, t, x.shape) * x \
            - extract(self.sqrt_recipm1_alphas_bar, t, x.shape) * eps
        x0 = torch.clamp(x0, -1.0, 1.0)
        mean = extract(self.coef_x0, t, x.shape) * x0 + extract(self.coef_xt, t, x.shape) * x
        z = self.noise_like(x.shape, x.device) if t_index > 0 else torch.zeros_like(x)
        return mean + torch.exp(0.5 * extract(self.log_variance, t, x.shape)) * z

    @torch.no_grad()
    def p_sample_loop(self, img):
        b = img.shape[0]
        for i in reversed(range(0, self.num_timesteps)):
            img = self.p_sample(img, torch.full((b,), i, dtype=torch.long, device=img.device), i)
        return unnormalize_to_zero_to_one(img)

    @torch.no_grad()
    def sample(self, batch_size):
        device = next(self.model.parameters()).device
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(self.noise_like(shape, device))

    def q_sample(self, x_0, t, noise):
        """Algorithm 1 line 5: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        abar = extract(self.alphas_bar, t, x_0.shape)
        return abar.sqrt() * x_0 + (1.0 - abar).sqrt() * noise

    def p_losses(self, x_0, t, noise):
        """Algorithm 1 line 6: the L1 loss between the noise and its prediction."""
        x_t = self.q_sample(x_0, t, noise)
        return (noise - self.model(x_t, t)).abs().mean()

    def forward(self, x_0, noise):
        b = x_0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=x_0.device).long()
        return self.p_losses(x_0, t, noise)
