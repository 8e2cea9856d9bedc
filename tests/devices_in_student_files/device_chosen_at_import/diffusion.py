"""A correct DDPM that picks its device once, at import, as many public student files do.

The schedule is plain tensor attributes, which the trainer moves with the model, and every
tensor made in a method is made on DEVICE, chosen below from what the machine has: the same
device the trainer picks by default. So it trains and samples on a CUDA GPU, an Apple GPU and
a CPU, and breaks only when the model is put on another device than that default. The
contract gives it a PortabilityWarning naming the line, not a failure.
"""

import math

import torch
import torch.nn as nn

DEVICE = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def extract(a, t, x_shape):
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def cosine_schedule(timesteps, s=0.008):
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = f / f[0]
    return torch.clip(alphas_cumprod[1:] / alphas_cumprod[:-1], 0.001, 1).float()


def unnormalize_to_zero_to_one(t):
    return (t + 1) * 0.5


class Diffusion(nn.Module):
    def __init__(self, model, *, image_size, channels=3, timesteps=1000):
        super().__init__()
        self.model = model
        self.channels = channels
        self.image_size = image_size
        self.num_timesteps = int(timesteps)
        self.alphas = cosine_schedule(self.num_timesteps)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = nn.functional.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        self.posterior_variance = (1 - self.alphas) * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    def noise_like(self, shape, device):
        return torch.randn(shape, device=device)

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        eps = self.model(x, t)
        alpha_t = extract(self.alphas, t, x.shape)
        abar_t = extract(self.alphas_cumprod, t, x.shape)
        abar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
        x_0 = ((x - torch.sqrt(1 - abar_t) * eps) / torch.sqrt(abar_t)).clamp(-1, 1)
        mean = (torch.sqrt(abar_prev) * (1 - alpha_t) * x_0 + torch.sqrt(alpha_t) * (1 - abar_prev) * x) / (1 - abar_t)
        if t_index == 0:
            return mean
        return mean + torch.sqrt(extract(self.posterior_variance, t, x.shape)) * self.noise_like(x.shape, DEVICE)

    @torch.no_grad()
    def p_sample_loop(self, img):
        b = img.shape[0]
        for i in reversed(range(self.num_timesteps)):
            img = self.p_sample(img, torch.full((b,), i, device=DEVICE, dtype=torch.long), i)
        return unnormalize_to_zero_to_one(img)

    @torch.no_grad()
    def sample(self, batch_size):
        return self.p_sample_loop(self.noise_like((batch_size, self.channels, self.image_size, self.image_size), DEVICE))

    def q_sample(self, x_0, t, noise=None):
        if noise is None:
            noise = self.noise_like(x_0.shape, DEVICE)
        abar_t = extract(self.alphas_cumprod, t, x_0.shape)
        return torch.sqrt(abar_t) * x_0 + torch.sqrt(1 - abar_t) * noise

    def p_losses(self, x_0, t, noise=None):
        if noise is None:
            noise = self.noise_like(x_0.shape, DEVICE)
        predicted = self.model(self.q_sample(x_0, t, noise), t)
        return nn.functional.l1_loss(predicted, noise)

    def forward(self, x_0, noise=None):
        t = torch.randint(0, self.num_timesteps, (x_0.shape[0],), device=DEVICE).long()
        return self.p_losses(x_0, t, noise)
