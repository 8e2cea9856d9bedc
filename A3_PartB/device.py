"""The device and how training uses it: the starter's choice of device, mixed precision, the
CPU's allocator, Adam, and the CUDA graph of a training step."""
import ctypes
import platform
import warnings

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype


def default_device():  # the same as Part A's a3_helper.pick_device, as each part ships alone
    """The starter's choice: CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16():
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX) and PyTorch may use it
    (``ATEN_CPU_CAPABILITY=avx2`` forbids AVX-512): elsewhere bf16 is emulated, and slower
    than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    allowed = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "ZVECTOR", "VSX")
    return allowed and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def keep_freed_memory_for_reuse():
    """Have glibc's malloc reuse the memory of freed tensors instead of returning it to the system.

    By default every tensor over 32 MB (q and k of the linear attention at 32x32, for a batch of
    64) is mapped fresh from the system and unmapped when freed, so each training step pays
    for touching those pages anew: about a third of a float32 step on a 2-core CPU. Mapping
    nothing and trimming nothing makes the heap keep them. PyTorch has no caching allocator on
    the CPU; this is the one knob. Linux with glibc only (elsewhere nothing changes).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2 ** 30)


def autocast_dtype(device, precision="auto"):
    """The dtype of mixed precision, None for float32.

    ``precision="auto"``: bf16 on GPUs that run it natively (compute capability 8.0, Ampere,
    and newer) and on CPUs with native bf16; fp16 (with a GradScaler) on older GPUs such as
    Colab's T4; float32 elsewhere. ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only) force one.
    """
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be 'auto' or one of {list(PRECISIONS)}, got {precision!r}.")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on a "
                         f"{device.type} device.")
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device, dtype):
    """Mixed precision to ``dtype`` (float32 for None), without autocast's weight cache, which
    a CUDA graph cannot hold (and which saves nothing here: each weight is cast once per
    forward pass). Autocast only rounds: the network's normalisations keep their float32
    epsilon (``unet.norm_eps``)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


def adam(parameters, learning_rate, device):
    """Adam, fused into one kernel per step on a GPU and a CPU, not a loop over the U-Net's 276
    tensors. Fused, it also lets a GradScaler (fp16, as on a T4) skip an overflowing step on
    the GPU, where a plain Adam makes the host wait for the overflow check at every step."""
    return torch.optim.Adam(parameters, lr=learning_rate, fused=device.type in ("cuda", "cpu"))


def move_to_device(diffusion_model, device):
    """``diffusion_model.to(device)``, and also the schedule tensors that a diffusion.py keeps as
    plain attributes rather than buffers (the skeleton allows it), which ``.to`` leaves behind."""
    diffusion_model.to(device)
    for name, value in list(vars(diffusion_model).items()):
        if isinstance(value, torch.Tensor):
            setattr(diffusion_model, name, value.to(device))
    return diffusion_model


class CudaGraphed:
    """``function()`` run as a CUDA graph: the first call captures it, later calls replay it.

    The U-Net of the handout is so small that a GPU finishes each of its kernels sooner than
    Python can launch the next one; replaying a captured graph launches the thousands of
    kernels of a training step at once. ``function`` must keep the rules stated at
    ``Trainer.loss_and_gradients``. Its random draws still change at every replay (PyTorch's
    graph-safe RNG), and its output tensor is overwritten by the next replay. If the capture
    fails, a warning gives the reason and ``function`` runs eagerly.
    """

    WARMUP_CALLS = 3  # cuDNN and cuBLAS pick kernels and allocate workspaces before the capture

    def __init__(self, function):
        self.function = function
        self.graph = None
        self.output = None
        self.failed = False

    def __call__(self):
        """Replay the graph (capturing it at the first call), or run ``function`` if it failed."""
        if self.failed:
            return self.function()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as error:
                self.failed = True
                warnings.warn(f"CUDA graph capture failed, so training goes on without it: {error}",
                              stacklevel=2)
                return self.function()
        self.graph.replay()
        return self.output

    def _capture(self):
        """Warm up on a side stream, then record one call of ``function`` on it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_CALLS):
                self.function()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.output = self.function()
        self.graph = graph
