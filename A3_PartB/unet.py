"""The noise-prediction network epsilon_theta(x_t, t): a U-Net (handout Fig. 2).

Each resolution level has two ResNet blocks conditioned on the time step, an
optional self-attention layer (only at the two coarsest levels, where the
feature map is small enough for attention to be cheap) and a resampling layer.
The decoder mirrors the encoder and concatenates its features (skip connections).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

ATTENTION_LEVELS = 2  # how many of the coarsest levels get self-attention


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the integer time step."""

    def __init__(self, dim):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"the time embedding needs an even dim >= 4, got {dim}")
        half = dim // 2
        frequencies = torch.exp(torch.arange(half) * (-math.log(10000) / (half - 1)))
        # computed once, not at every step; not persistent, so checkpoints do not change
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, time):
        angles = time.float()[:, None] * self.frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class ResnetBlock(nn.Module):
    """Two conv-GroupNorm-SiLU blocks; the time embedding scales and shifts the first."""

    def __init__(self, dim_in, dim_out, *, time_emb_dim, groups=8):
        super().__init__()
        self.time_to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, dim_out)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, dim_out)
        self.residual = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        scale, shift = rearrange(self.time_to_scale_shift(time_emb), "b c -> b c 1 1").chunk(2, dim=1)
        h = F.silu(self.norm1(self.conv1(x)) * (scale + 1) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.residual(x)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(1, dim)
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        height, width = x.shape[-2:]
        q, k, v = rearrange(
            self.to_qkv(self.norm(x)), "b (qkv h d) x y -> qkv b h (x y) d", qkv=3, h=self.heads
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=height, y=width)
        return x + self.to_out(out)


def downsample(dim_in, dim_out):
    """Halve the resolution without losing pixels: space-to-depth, then a 1x1 conv."""
    return nn.Sequential(
        Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2),
        nn.Conv2d(dim_in * 4, dim_out, 1),
    )


def upsample(dim_in, dim_out):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


class Level(nn.Module):
    """One resolution level: two ResNet blocks, optional attention, then resampling."""

    def __init__(self, block_in, block_out, resample, *, time_emb_dim, groups, attention):
        super().__init__()
        self.block1 = ResnetBlock(block_in, block_out, time_emb_dim=time_emb_dim, groups=groups)
        self.block2 = ResnetBlock(block_in, block_out, time_emb_dim=time_emb_dim, groups=groups)
        self.attention = Attention(block_out) if attention else nn.Identity()
        self.resample = resample


class Unet(nn.Module):
    """U-Net predicting the noise of x_t at time step t: ``forward(x, time) -> epsilon``.

    ``dim`` is the width of the first level; level i has width ``dim * dim_mults[i]``.
    The image side must be divisible by 2 ** (len(dim_mults) - 1).
    """

    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3,
                 resnet_block_groups=8):
        super().__init__()
        self.dim = dim
        self.dim_mults = tuple(dim_mults)
        self.channels = channels
        init_dim = init_dim or dim
        out_dim = out_dim or channels
        dims = [init_dim] + [dim * m for m in self.dim_mults]
        self._check_group_divisibility(dims, resnet_block_groups)
        time_emb_dim = dim * 4
        level_args = dict(time_emb_dim=time_emb_dim, groups=resnet_block_groups)

        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(dim), nn.Linear(dim, time_emb_dim), nn.GELU(),
            nn.Linear(time_emb_dim, time_emb_dim),
        )
        pairs = list(zip(dims[:-1], dims[1:]))
        num_levels = len(pairs)
        self.downs = nn.ModuleList()
        for i, (dim_in, dim_out) in enumerate(pairs):
            is_last = i == num_levels - 1
            resample = nn.Conv2d(dim_in, dim_out, 3, padding=1) if is_last else downsample(dim_in, dim_out)
            self.downs.append(Level(dim_in, dim_in, resample, attention=i >= num_levels - ATTENTION_LEVELS,
                                    **level_args))
        mid_dim = dims[-1]
        self.mid_block1 = ResnetBlock(mid_dim, mid_dim, **level_args)
        self.mid_attention = Attention(mid_dim)
        self.mid_block2 = ResnetBlock(mid_dim, mid_dim, **level_args)
        self.ups = nn.ModuleList()
        for i, (dim_in, dim_out) in enumerate(reversed(pairs)):
            is_last = i == num_levels - 1
            resample = nn.Conv2d(dim_out, dim_in, 3, padding=1) if is_last else upsample(dim_out, dim_in)
            self.ups.append(Level(dim_out + dim_in, dim_out, resample, attention=i < ATTENTION_LEVELS,
                                    **level_args))
        self.final_block = ResnetBlock(init_dim * 2, dim, **level_args)
        self.final_conv = nn.Conv2d(dim, out_dim, 1)

    @staticmethod
    def _check_group_divisibility(dims, groups):
        bad = [d for d in dims if d % groups]
        if bad:
            raise ValueError(
                f"resnet_block_groups={groups} must divide every level width, but {bad} do not; "
                "choose dim/init_dim as a multiple of resnet_block_groups"
            )

    def _check_image_size(self, x):
        factor = 2 ** (len(self.dim_mults) - 1)
        height, width = x.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"a {height}x{width} image cannot be halved {len(self.dim_mults) - 1} times "
                f"(dim_mults={self.dim_mults}); use an image size divisible by {factor} or fewer dim_mults"
            )

    def forward(self, x, time):
        self._check_image_size(x)
        t = self.time_mlp(time)
        x = self.init_conv(x)
        first_features = x
        skips = []
        for level in self.downs:
            x = level.block1(x, t)
            skips.append(x)
            x = level.attention(level.block2(x, t))
            skips.append(x)
            x = level.resample(x)
        x = self.mid_block2(self.mid_attention(self.mid_block1(x, t)), t)
        for level in self.ups:
            x = level.block1(torch.cat((x, skips.pop()), dim=1), t)
            x = level.attention(level.block2(torch.cat((x, skips.pop()), dim=1), t))
            x = level.resample(x)
        x = self.final_block(torch.cat((x, first_features), dim=1), t)
        return self.final_conv(x)
