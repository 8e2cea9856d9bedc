"""The arithmetic of a piece of work, counted by torch's FLOP counter, as the benchmark's shares
of the machine's rate need it.

torch counts the attention kernels of the GPU but not the CPU's fused one, which the U-Net's
attention runs on a CPU in float32 (``unet.fused_softmax_pays``); it is counted here by torch's
formulas for the same arithmetic, so that a model's count is the same whichever kernel runs it.
"""
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """FLOP of the CPU's fused softmax(q k^T) v, by torch's formula for the GPU's kernels."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                out_shape=None, **kwargs):
    """FLOP of the gradients of softmax(q k^T) v: four matmuls (of dq, dk, dv and d(q k^T)),
    twice the forward. (torch's formula for a GPU's flash kernel adds a fifth, the scores that
    kernel computes again: the kernel's cost, not the model's.)"""
    return 2 * flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flop,
}


def gflop(function, *args):
    """GFLOP of ``function(*args)`` by torch's FLOP counter, the CPU's fused attention included."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        function(*args)
    return counter.get_total_flops() / 1e9
