"""device.py through the Trainer: the device, mixed precision, Adam, the CUDA graph's logic and
the CPU's allocator."""
import contextlib
import math
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import device as device_module
import trainer as trainer_module
from afhq_data import part_b_environment  # noqa: F401 (autouse fixture)
from device import adam, autocast_dtype, CudaGraphed
from tiny_trainer import afhq, make_trainer  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


def test_plain_tensor_attributes_of_a_diffusion_follow_it_to_the_device():
    class PlainSchedule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.alphas = torch.ones(5)  # a plain attribute, as a student may keep it

    moved = device_module.move_to_device(PlainSchedule(), torch.device("meta"))
    assert moved.alphas.device.type == "meta" and moved.weight.device.type == "meta"


class RecordedOps(TorchDispatchMode):
    """Records the name of every aten op run, the backward pass's included."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        self.names.add(str(op.overloadpacket))
        return op(*args, **(kwargs or {}))


HOST_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal",
                 "aten.is_nonzero", "aten._unique2", "aten.repeat_interleave"}


@pytest.mark.parametrize("shuffle", [True, False])
def test_gradient_computation_never_waits_for_the_device(afhq, tmp_path, shuffle):
    trainer = make_trainer(afhq, tmp_path, shuffle=shuffle, gradient_accumulate_every=2)
    with RecordedOps() as recorded:
        trainer.loss_and_gradients()
    assert "aten.convolution_backward" in recorded.names  # the backward pass was seen
    assert not recorded.names & HOST_SYNC_OPS


def test_cpu_training_is_not_captured_in_a_cuda_graph(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, cuda_graph=True)
    assert not isinstance(trainer.gradient_pass, CudaGraphed)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on a machine without a GPU: counts replays."""

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's streams and graphs replaced by fakes; returns the graphs made."""
    graphs = []
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(FakeGraph()) or graphs[-1])
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream: contextlib.nullcontext())
    return graphs


def test_cuda_graph_logic_with_fake_graphs_captures_after_warm_up_then_only_replays(
        fake_cuda_graphs):
    calls = []
    graphed = CudaGraphed(lambda: calls.append(1) or torch.tensor(float(len(calls))))
    outputs = [graphed() for _ in range(3)]
    assert len(calls) == CudaGraphed.WARMUP_CALLS + 1
    assert len(fake_cuda_graphs) == 1 and fake_cuda_graphs[0].replays == 3
    assert all(output is outputs[0] for output in outputs)
    assert outputs[0].item() == CudaGraphed.WARMUP_CALLS + 1


def test_cuda_graph_logic_with_a_faked_capture_failure_warns_and_runs_eagerly(monkeypatch):
    def no_capture():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", no_capture)
    calls = []
    graphed = CudaGraphed(lambda: calls.append(1) or torch.tensor(float(len(calls))))
    with pytest.warns(UserWarning, match="CUDA graph capture failed.*not permitted"):
        first = graphed()
    second = graphed()
    assert (first.item(), second.item()) == (1.0, 2.0)


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_mixed_precision_logic_with_faked_gpu_capabilities_is_fp16_on_a_t4_bf16_from_ampere(
        monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype(torch.device("cuda")) == dtype


@pytest.mark.parametrize("device, fused", [("cuda", True), ("cpu", True), ("mps", False)])
def test_adam_is_built_fused_for_a_gpu_so_a_grad_scaler_needs_no_host_sync(device, fused):
    optimizer = adam([torch.nn.Parameter(torch.zeros(3))], 1e-3, torch.device(device))
    assert optimizer.defaults["fused"] is fused
    assert getattr(optimizer, "_step_supports_amp_scaling", False) is fused


def test_fused_adam_on_a_cpu_takes_the_plain_adams_steps():
    torch.manual_seed(0)
    start, gradients = torch.randn(5, 7), [torch.randn(5, 7) for _ in range(3)]
    plain, fused = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = torch.optim.Adam([plain], lr=1e-3), adam([fused], 1e-3, torch.device("cpu"))
    for gradient in gradients:
        for parameter, optimizer in zip((plain, fused), optimizers):
            parameter.grad = gradient.clone()
            optimizer.step()
    assert not torch.equal(plain, start)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, None)])
def test_mixed_precision_logic_with_a_faked_cpu_flag_is_bf16_only_where_the_cpu_has_it(
        monkeypatch, native_bf16, dtype):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native_bf16)
    assert autocast_dtype(torch.device("cpu")) is dtype


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_precision_can_be_forced_either_way(monkeypatch, precision, dtype):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: dtype is None)
    assert autocast_dtype(torch.device("cpu"), precision) is dtype


@pytest.mark.parametrize("precision, message", [("fp16", "needs a CUDA GPU"),
                                                ("half", "must be 'auto' or one of")])
def test_a_precision_the_device_cannot_run_is_refused_when_the_trainer_is_built(
        afhq, tmp_path, precision, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(afhq, tmp_path, precision=precision)


def test_bf16_on_a_cpu_trains_without_a_grad_scaler(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, precision="bf16", train_num_steps=2)
    trainer.train()
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert all(math.isfinite(row["loss"]) for row in trainer.history)


def test_bf16_is_not_native_where_pytorch_is_capped_below_avx512(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert device_module.cpu_has_native_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not device_module.cpu_has_native_bf16()


FREED_TENSOR_KEPT = """
import ctypes, sys, torch
sys.path.insert(0, {part_b!r})
import device

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def free_heap_bytes_after_freeing_a_large_tensor():
    tensor = torch.ones(12 * 2 ** 20)  # 48 MB, above glibc's largest mmap threshold
    del tensor
    return libc.mallinfo2().fordblks

before = free_heap_bytes_after_freeing_a_large_tensor()
device.keep_freed_memory_for_reuse()
print(before, free_heap_bytes_after_freeing_a_large_tensor())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_freed_large_tensors_stay_in_the_heap_for_the_next_step(tmp_path):
    import subprocess
    from pathlib import Path
    part_b = str(Path(trainer_module.__file__).parent)
    result = subprocess.run([sys.executable, "-c", FREED_TENSOR_KEPT.format(part_b=part_b)],
                            capture_output=True, text=True, check=True, timeout=120)
    before, after = map(int, result.stdout.split())
    assert before < 2 ** 25 <= 48 * 2 ** 20 <= after  # returned to the system, then kept
