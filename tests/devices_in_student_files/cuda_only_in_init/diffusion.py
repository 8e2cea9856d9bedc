"""A DDPM whose math is right but that cannot be built on a CUDA GPU, as a public student file.

Its constructor moves the schedule to "cuda" when torch sees a GPU, then concatenates it with
``torch.tensor([1.0])``, made on the CPU: on any CUDA GPU that raises at construction. On a CPU
the condition is False and the line runs on CPU tensors alone, so only the contract's run as if
CUDA were present finds it, naming that line. Its methods take the device from their input.
"""

import math

import torch
from torch import nn


def extract(a, t, x_shape):
    return a[t].view(-1, *([1] * (len(x_shape) - 1)))


def cosine_schedule(timesteps, s=0.008):
    t = torch.arange(timesteps + 1, dtype=torch.float32)
    f = torch.cos((t / timesteps + s) / (1 + s) * (math.pi / 2)).pow(2)
    return (f[1:] / f[:-1]).clamp(0.001, 1.0)


def unnormalize_to_zero_to_one(t):
    return (t + 1) / 2


class Diffusion(nn.Module):
    def __init__(self, model, *, image_size, channels=3, timesteps=1000):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.num_timesteps = timesteps
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.alphas = cosine_schedule(timesteps).to(device)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.tensor([1.0]), self.alphas_cumprod[:-1]])

    def noise_like(self, shape, device):
        return torch.randn(shape, device=device)

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        alpha = extract(self.alphas, t, x.shape)
        abar = extract(self.alphas_cumprod, t, x.shape)
        abar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
        x0 = (x - (1 - abar).sqrt() * self.model(x, t)) / abar.sqrt()
        x0 = x0.clamp(-1, 1)
        mean = (abar_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - abar_prev) * x) / (1 - abar)
        if t_index == 0:
            return mean
        sigma = ((1 - abar_prev) / (1 - abar) * (1 - alpha)).sqrt()
        return mean + sigma * self.noise_like(x.shape, x.device)

    @torch.no_grad()
    def p_sample_loop(self, img):
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((img.shape[0],), i, dtype=torch.long, device=img.device)
            img = self.p_sample(img, t, i)
        return unnormalize_to_zero_to_one(img)

    @torch.no_grad()
    def sample(self, batch_size):
        device = next(self.model.parameters()).device
        return self.p_sample_loop(self.noise_like((batch_size, self.channels, self.image_size, self.image_size), device))

    def q_sample(self, x_0, t, noise):
        abar = extract(self.alphas_cumprod, t, x_0.shape)
        return abar.sqrt() * x_0 + (1 - abar).sqrt() * noise

    def p_losses(self, x_0, t, noise):
        return (noise - self.model(self.q_sample(x_0, t, noise), t)).abs().mean()

    def forward(self, x_0, noise):
        t = torch.randint(0, self.num_timesteps, (x_0.shape[0],), device=x_0.device)
        return self.p_losses(x_0, t, noise)
