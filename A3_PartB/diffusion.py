"""Denoising diffusion (DDPM, Ho et al. 2020) with the improved cosine schedule.

The math of the handout, with its typos corrected (each also noted where the code uses it):

* time steps are 0-based here: ``t = 0 .. T-1`` stands for the handout's ``1 .. T``;
* ``alphas_cumprod`` (the handout's abar) is the running product of the *clipped* alphas;
* Algorithm 1 line 5 and Algorithm 2 line 5 use abar_t where the handout prints alpha_t;
* the x_t coefficient of the posterior mean (eq. 7) is sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t).

Images are in [-1, 1] inside this module and in [0, 1] outside it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def cosine_schedule(timesteps, s=0.008):
    """Alphas of the improved cosine schedule, eq. (3), computed in float64.

    abar(t) = f(t) / f(0) with f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2, and
    alpha_t = clip(abar(t) / abar(t-1), 0.001, 1). Returns a tensor of length T.
    """
    if int(timesteps) != timesteps or timesteps < 1:
        raise ValueError(f"timesteps must be a whole number >= 1, got {timesteps!r}")
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    abar = f / f[0]
    return torch.clip(abar[1:] / abar[:-1], 0.001, 1.0)


def extract(a, t, x_shape):
    """Pick ``a[t]`` for each sample of a batch, shaped to broadcast over ``x_shape``."""
    batch_size = t.shape[0]
    return a.gather(-1, t).reshape(batch_size, *((1,) * (len(x_shape) - 1)))


def unnormalize_to_zero_to_one(images):
    """Map images from the model's range [-1, 1] back to [0, 1]."""
    return (images + 1) * 0.5


class Diffusion(nn.Module):
    """DDPM around a noise-predicting network ``model(x_t, t) -> epsilon``.

    Every coefficient of the forward and reverse processes is computed once, in
    float64, and kept as a float32 buffer, so it follows ``.to(device)``. The buffers are
    not persistent: they derive from T, so the state_dict holds only the network's
    ``model.*`` entries, exactly as a starter checkpoint does.
    """

    def __init__(self, model, *, image_size, channels=3, timesteps=1000):
        super().__init__()
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive whole number, got {image_size!r}")
        model_channels = getattr(model, "channels", channels)
        if model_channels != channels:
            raise ValueError(
                f"the model takes {model_channels} channels but channels={channels}; "
                "pass the same number to both"
            )
        self.model = model
        self.image_size = int(image_size)
        self.channels = channels
        self.num_timesteps = int(timesteps)
        self._register_schedule(cosine_schedule(timesteps))

    def _register_schedule(self, alphas):
        """Register the schedule and every coefficient derived from it."""
        alphas_cumprod = torch.cumprod(alphas, dim=0)  # eq. (6): abar_t, of the *clipped* alphas
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)  # abar before step 0 is 1
        buffers = {
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            # eq. (2) with abar: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            # eq. (7): sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) * (1 - alpha_t)
            "posterior_variance": (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * (1 - alphas),
            # eq. (7): mu_t = coef1 * x_0 + coef2 * x_t, coef2 = sqrt(alpha_t)(1 - abar_{t-1})
            # / (1 - abar_t) as in Algorithm 2 line 7 (eq. 7 misprints it)
            "posterior_mean_coef1": alphas_cumprod_prev.sqrt() * (1 - alphas) / (1 - alphas_cumprod),
            "posterior_mean_coef2": alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @property
    def device(self):
        return self.alphas.device

    def noise_like(self, shape, device):
        """Standard normal noise; every random draw of the processes goes through here."""
        return torch.randn(shape, device=device)

    def _check_images(self, x_0):
        expected = (self.channels, self.image_size, self.image_size)
        if x_0.dim() != 4 or tuple(x_0.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (batch, {', '.join(map(str, expected))}), got "
                f"{tuple(x_0.shape)}; resize the data to image_size={self.image_size}"
            )

    # ---- forward process and training (Algorithm 1) ----

    def q_sample(self, x_0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0), eq. (2) with abar_t (eq. 6), where Algorithm 1 line 5
        prints alpha_t (a typo)."""
        if noise is None:
            noise = self.noise_like(x_0.shape, x_0.device)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise
        )

    def p_losses(self, x_0, t, noise=None):
        """L1 distance between the true noise and the predicted one (Algorithm 1, line 6)."""
        if noise is None:
            noise = self.noise_like(x_0.shape, x_0.device)
        x_t = self.q_sample(x_0, t, noise)
        predicted_noise = self.model(x_t, t)
        return F.l1_loss(predicted_noise.float(), noise)

    p_loss = p_losses  # the handout's name for the same method

    def forward(self, x_0, noise=None):
        """Training loss of a batch x_0 in [-1, 1], with t ~ Uniform{0, ..., T-1}."""
        self._check_images(x_0)
        t = torch.randint(0, self.num_timesteps, (x_0.shape[0],), device=x_0.device)
        return self.p_losses(x_0, t, noise)

    # ---- reverse process (Algorithm 2) ----

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        """One reverse step x_t -> x_{t-1} (Algorithm 2, lines 3-9)."""
        predicted_noise = self.model(x, t).float()  # line 4
        x_0_hat = (  # line 5, eq. (8), with abar_t where the handout prints alpha_t
            x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * predicted_noise
        ) / extract(self.sqrt_alphas_cumprod, t, x.shape)
        x_0_hat = x_0_hat.clamp(-1.0, 1.0)  # line 6
        posterior_mean = (  # line 7
            extract(self.posterior_mean_coef1, t, x.shape) * x_0_hat
            + extract(self.posterior_mean_coef2, t, x.shape) * x
        )
        if t_index == 0:  # line 3: z = 0 at the last step
            return posterior_mean
        posterior_std = extract(self.posterior_variance, t, x.shape).sqrt()  # line 8
        return posterior_mean + posterior_std * self.noise_like(x.shape, x.device)  # line 9

    @torch.no_grad()
    def p_sample_loop(self, img, return_all_timesteps=False):
        """Run the reverse process from x_T = ``img`` down to x_0; images in [0, 1].

        With ``return_all_timesteps`` the result has shape (T+1, B, C, H, W): frame k
        is the state after k reverse steps, frame 0 being x_T itself.
        """
        frames = [img] if return_all_timesteps else None
        for t_index in reversed(range(self.num_timesteps)):
            t = torch.full((img.shape[0],), t_index, device=img.device, dtype=torch.long)
            img = self.p_sample(img, t, t_index)
            if return_all_timesteps:
                frames.append(img)
        result = torch.stack(frames) if return_all_timesteps else img
        return unnormalize_to_zero_to_one(result).clamp(0.0, 1.0)

    @torch.no_grad()
    def sample(self, batch_size):
        """Generate ``batch_size`` images in [0, 1] on the model's device."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        was_training = self.training
        self.eval()
        try:
            return self.p_sample_loop(self.noise_like(shape, self.device))
        finally:
            self.train(was_training)
