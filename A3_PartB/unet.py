"""The noise-prediction network epsilon_theta(x_t, t): the course starter's U-Net (handout Fig. 2).

The same network as the starter's ``unet.py``, module for module and name for name, so a starter
checkpoint (a state_dict or a whole pickled model) loads here and the course's published losses
and FIDs apply. Each resolution level has two ResNet blocks conditioned on the time step, linear
attention and a resampling layer; the middle has full attention; the decoder mirrors the encoder
and concatenates the encoder's features (the skip connections of Fig. 2).
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def norm_eps(parameter):
    """The starter's epsilon for its normalisations: 1e-5 for a float32 network, else 1e-3.

    Read from the dtype of the network's own ``parameter``, not of the activations: autocast
    (bf16, fp16) rounds the activations but keeps the float32 parameters, so a network trained
    or sampled in mixed precision is the float32 network, epsilon included, and differs only
    by rounding. (The starter read the input's dtype: under autocast, 1e-3 in the LayerNorms
    and weight standardisations, a different function from the float32 one.)
    """
    return 1e-5 if parameter.dtype == torch.float32 else 1e-3


def split_heads(qkv, heads):
    """(batch, 3 * heads * dim_head, height, width) -> q, k, v, each (batch, heads, dim_head, pixels)."""
    batch, channels, height, width = qkv.shape
    return qkv.reshape(batch, 3, heads, channels // (3 * heads), height * width).unbind(1)


def merge_heads(out, height, width):
    """(batch, heads, dim_head, pixels) -> (batch, heads * dim_head, height, width)."""
    return out.reshape(out.shape[0], -1, height, width)


class Residual(nn.Module):
    """``fn(x) + x``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def layer_norm_over_channels(x, gain):
    """The starter's LayerNorm of (batch, channels, height, width): each pixel's channels are
    normalised (biased variance) and times ``gain``. Computed by ``F.layer_norm`` on the
    channels-last view, which reads contiguous channels instead of reducing over a strided axis;
    the result is in channels-last memory, which LinearAttention reads as tokens without a copy.
    """
    normalised = F.layer_norm(x.movedim(1, -1), x.shape[1:2], gain.reshape(-1), None,
                              norm_eps(gain))
    return normalised.movedim(-1, 1)


class LayerNorm(nn.Module):
    """Normalises each pixel's vector of channels (biased variance), times a learned gain ``g``."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        return layer_norm_over_channels(x, self.g)


class PreNorm(nn.Module):
    """``fn(LayerNorm(x))``."""

    def __init__(self, dim, fn):
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim)

    def forward(self, x):
        return self.fn(self.norm(x))


class WeightStandardizedConv2d(nn.Conv2d):
    """A convolution whose weight is standardised per output channel before use (Qiao et al.,
    2019, "Weight Standardization"); it works well with the GroupNorm that follows it."""

    def forward(self, x):
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        weight = (self.weight - mean) * (var + norm_eps(self.weight)).rsqrt()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SinusoidalPosEmb(nn.Module):
    """The Transformer's sinusoidal embedding of the time step: sin and cos of ``t * freq_k``,
    with frequencies falling geometrically from 1 to 1/10000."""

    def __init__(self, dim):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"the time embedding needs an even dim >= 4, got {dim}")
        self.dim = dim

    def forward(self, time):
        # Recomputed at each call (three tiny ops): a model pickled by the starter carries no buffer.
        half = self.dim // 2
        frequencies = torch.exp(torch.arange(half, device=time.device) * (-math.log(10000) / (half - 1)))
        angles = time[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def group_norm(norm, x):
    """``norm(x)``, a GroupNorm, in ``x``'s memory layout, through a channels-first copy where
    PyTorch's channels-last kernel is the slower on a CPU (2-core Zen 4):

    * in training, for its backward pass: at 32x32 in bf16, 1.75x the time of the two copies
      and the channels-first kernel together; over the whole step, 1.15x in bf16, even in fp32;
    * below 1,024 pixels with fewer than 8 channels a group (the U-Net's two first widths at
      16x16), where it vectorises over each group's few channels: 2.5-9x the time.
    Elsewhere, in sampling, the copies cost more than they save.
    """
    few_pixels = x.shape[-2] * x.shape[-1] < 1024
    few_channels_a_group = norm.num_channels < 8 * norm.num_groups
    if x.is_contiguous() or not (x.requires_grad or few_pixels and few_channels_a_group):
        return norm(x)
    return norm(x.contiguous()).contiguous(memory_format=torch.channels_last)


class Block(nn.Module):
    """Weight-standardised 3x3 conv, GroupNorm, the time step's ``(scale, shift)`` if given, SiLU."""

    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = group_norm(self.norm, self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = torch.addcmul(shift, x, scale + 1)  # x * (scale + 1) + shift, in one pass
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks plus a residual (a 1x1 conv where the width changes); the time embedding,
    through ``mlp``, scales and shifts the first Block's normalised features."""

    def __init__(self, dim, dim_out, *, time_emb_dim=None, groups=8):
        super().__init__()
        self.mlp = None
        if time_emb_dim is not None:
            self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb=None):
        scale_shift = None
        if self.mlp is not None and time_emb is not None:
            scale_shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, scale_shift)) + self.res_conv(x)


class LinearAttention(nn.Module):
    """Attention in time linear in the number of pixels (Shen et al., 2021, "Efficient
    Attention"): q is softmaxed over its features, k over the pixels, and k and v are first
    summed over the pixels into a (dim_head x dim_head) context per head."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), LayerNorm(dim))

    def forward(self, x):
        # The starter's arithmetic, reassociated so that no (pixels x heads * dim_head) tensor
        # is made but q and k, the two that are softmaxed. v = W_v x and to_out's 1x1 conv are
        # linear, so each head's  W_out context^T q  equals  q^T (k x^T W_v^T W_out^T): the
        # keys are summed against the input's few channels, then mapped by a weight-only
        # (channels x channels) matrix per head. The output of all heads is then q, heads side
        # by side, times their stacked contexts (the sum over heads included).
        batch, channels, height, width = x.shape
        pixels = height * width
        projection, norm = self.to_out
        features = x.reshape(batch, channels, pixels)
        tokens = features.mT.contiguous()  # (batch, pixels, channels): a small copy, if any
        w_q, w_k, w_v = self.to_qkv.weight.view(3, self.heads, -1, channels).unbind(0)
        fused = fused_softmax_pays(x)
        keys_by_channel = pooled_keys(tokens, features, w_k, fused)  # (batch, heads, d, c)
        w_out = projection.weight.view(channels, self.heads, -1).permute(1, 2, 0)  # (heads, d, c)
        value_to_out = w_v.mT @ w_out  # (heads, c, c)
        # q * dim_head^-0.5 and v / pixels, applied to the small contexts instead of q and v
        # (a matmul would broadcast value_to_out to every image of the batch, by a copy)
        contexts = torch.einsum("bhdc,hce->bhde", keys_by_channel, value_to_out)
        contexts = contexts * (self.scale / pixels)
        out = queried_contexts(tokens, w_q, contexts, projection.bias, fused)  # (b, pixels, c)
        return norm(out.mT.reshape(batch, channels, height, width))  # a view: no copy


def fused_softmax_pays(x):
    """Whether LinearAttention softmaxes inside ``F.scaled_dot_product_attention``'s fused
    kernel, which never writes q or k to memory: on the CPU in float32 (as without native
    bf16), where 512 samples are drawn 1.1x faster (docs/speed.md). Under bf16 autocast the
    kernel is slower than the plain matmuls and softmaxes, and on a GPU unmeasured."""
    on_cpu = x.device.type == "cpu"
    return on_cpu and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def pooled_keys(tokens, features, w_k, fused):
    """Each head's keys, softmaxed over the pixels, summed against the input's channels:
    softmax(W_k x) x^T, (batch, heads, dim_head, channels). ``tokens`` (batch, pixels, channels)
    and ``features`` (batch, channels, pixels) hold the same x; ``w_k`` is (heads, dim_head,
    channels)."""
    batch, _, channels = tokens.shape
    rows = w_k.reshape(-1, channels)  # (heads * dim_head, channels)
    if fused:  # W_k's rows as the queries, the pixels as the keys and as the values
        tokens = tokens[:, None]
        pooled = F.scaled_dot_product_attention(rows.expand(batch, 1, -1, -1), tokens, tokens,
                                                scale=1.0)
    else:  # k out of one matmul in the layout its softmax reads: a transposed one is copied
        pooled = torch.bmm(rows.expand(batch, -1, -1), features).softmax(dim=-1) @ tokens
    return pooled.view(batch, *w_k.shape)


def queried_contexts(tokens, w_q, contexts, bias, fused):
    """sum over heads of softmax(q) contexts + ``bias``, (batch, pixels, channels), with
    q = W_q x softmaxed over each head's features. ``tokens`` is x as (batch, pixels,
    channels), ``w_q`` (heads, dim_head, channels), ``contexts`` (batch, heads, dim_head,
    channels)."""
    batch, heads = contexts.shape[:2]
    if fused:  # x as the queries, each head's rows of W_q as its keys, its contexts as values
        per_head = F.scaled_dot_product_attention(
            tokens[:, None].expand(-1, heads, -1, -1), w_q.expand(batch, -1, -1, -1), contexts,
            scale=1.0)
        return per_head.sum(1) + bias
    # q out of one plain matmul, heads side by side, in the layout its softmax reads
    q = (tokens @ w_q.flatten(0, 1).mT).unflatten(-1, (heads, -1)).softmax(dim=-1)
    return torch.baddbmm(bias, q.flatten(2), contexts.flatten(1, 2))


class Attention(nn.Module):
    """Full self-attention on cosine similarities times a fixed ``scale`` (Henry et al., 2020,
    "Query-Key Normalization"), used where the feature map is smallest, in the middle."""

    def __init__(self, dim, heads=4, dim_head=32, scale=10):
        super().__init__()
        self.scale = scale
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        height, width = x.shape[-2:]
        q, k, v = split_heads(self.to_qkv(x), self.heads)
        # As in the starter, q and k are L2-normalised along the pixel axis (their last one).
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        out = F.scaled_dot_product_attention(q.mT, k.mT, v.mT, scale=self.scale)
        return self.to_out(merge_heads(out.mT, height, width))


def Upsample(dim, dim_out=None):  # noqa: N802 (the starter's name)
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(dim, dim_out or dim, 3, padding=1))


def Downsample(dim, dim_out=None):  # noqa: N802 (the starter's name)
    """Halve the resolution: a 4x4 conv with stride 2."""
    return nn.Conv2d(dim, dim_out or dim, 4, stride=2, padding=1)


def linear_attention_layer(dim):
    """The attention of every level: ``x + LinearAttention(LayerNorm(x))``."""
    return Residual(PreNorm(dim, LinearAttention(dim)))


def down_level(dim_in, dim_out, block, is_last):
    """block1, block2, attention at width dim_in, then Downsample (a 3x3 conv at the last level)."""
    resample = nn.Conv2d(dim_in, dim_out, 3, padding=1) if is_last else Downsample(dim_in, dim_out)
    return nn.ModuleList([block(dim_in, dim_in), block(dim_in, dim_in), linear_attention_layer(dim_in),
                          resample])


def up_level(dim_in, dim_out, block, is_last):
    """block1, block2 (each after concatenating a skip), attention, then Upsample to dim_in."""
    resample = nn.Conv2d(dim_out, dim_in, 3, padding=1) if is_last else Upsample(dim_out, dim_in)
    return nn.ModuleList([block(dim_out + dim_in, dim_out), block(dim_out + dim_in, dim_out),
                          linear_attention_layer(dim_out), resample])


def check_groups(widths, groups):
    """GroupNorm needs every block width to split into ``groups`` equal groups."""
    bad = sorted({width for width in widths if width % groups})
    if bad:
        raise ValueError(
            f"resnet_block_groups={groups} must divide every level width, but {bad} do not; "
            "choose dim/init_dim as a multiple of resnet_block_groups"
        )


def check_halvings(side, levels):
    """A U-Net of ``levels`` levels halves the image ``levels - 1`` times, so its side must be
    divisible by ``2 ** (levels - 1)``."""
    halvings = levels - 1
    if side % 2 ** halvings:
        raise ValueError(f"an image side of {side} cannot be halved {halvings} times by a "
                         f"{levels}-level U-Net; use an image size divisible by {2 ** halvings} "
                         "or fewer dim_mults")


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
        self.out_dim = out_dim or channels
        init_dim = init_dim or dim
        dims = [init_dim] + [dim * mult for mult in self.dim_mults]
        check_groups([*dims, dim], resnet_block_groups)
        time_dim = dim * 4
        block = partial(ResnetBlock, time_emb_dim=time_dim, groups=resnet_block_groups)
        pairs = list(zip(dims[:-1], dims[1:]))
        last = len(pairs) - 1

        # Registered in the starter's order, which fixes the order of parameters() and so of
        # the optimizer's state in a checkpoint.
        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.downs = nn.ModuleList([down_level(dim_in, dim_out, block, is_last=i == last)
                                    for i, (dim_in, dim_out) in enumerate(pairs)])
        self.ups = nn.ModuleList([up_level(dim_in, dim_out, block, is_last=i == last)
                                  for i, (dim_in, dim_out) in enumerate(reversed(pairs))])
        self.mid_block1 = block(dims[-1], dims[-1])
        self.mid_attn = Residual(PreNorm(dims[-1], Attention(dims[-1])))
        self.mid_block2 = block(dims[-1], dims[-1])
        self.final_res_block = block(init_dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    def _check_image_size(self, x):
        # from the layers, not self.dim_mults, which a model pickled by the starter lacks
        for side in x.shape[-2:]:
            check_halvings(side, levels=len(self.downs))

    def forward(self, x, time):
        """On a CPU, in channels-last memory: oneDNN's convolutions are 10-35% faster there, and
        the LayerNorms and LinearAttention read it as tokens without a copy; the noise comes
        back channels-first. On a GPU, the starter's channels-first memory."""
        self._check_image_size(x)
        t = self.time_mlp(time)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.init_conv(x)
        first_features = x
        skips = []
        for block1, block2, attention, downsample in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = attention(block2(x, t))
            skips.append(x)
            x = downsample(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for block1, block2, attention, upsample in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = attention(block2(torch.cat((x, skips.pop()), dim=1), t))
            x = upsample(x)
        x = self.final_res_block(torch.cat((x, first_features), dim=1), t)
        return self.final_conv(x).contiguous()
