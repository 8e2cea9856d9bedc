"""What a GPU would refuse, found without one: the diffusion contract's simulated devices.

The trainer puts the model on CUDA, else Apple's MPS, else the CPU. Here the machine says it has
the one asked for (``contract_probes.machine_with``), tensors asked for on it are made on the
``meta`` device, which every machine has (``SimulatedOnMeta``), and every op is held to CUDA's
rule that its tensors share one device (``OneDevice``), the line of the file under test that made
a stray CPU tensor remembered for the message.
"""
import contextlib
import linecache
import re
import sys
import traceback
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def line_running(path):
    """'diffusion.py:83 (the source line)' for the innermost call into the file at ``path`` now
    running, or None when that file is not on the stack."""
    frame = sys._getframe()
    while frame is not None and frame.f_code.co_filename != path:
        frame = frame.f_back
    if frame is None:
        return None
    return f"{Path(path).name}:{frame.f_lineno} ({linecache.getline(path, frame.f_lineno).strip()})"


class PortabilityWarning(UserWarning):
    """The file runs on every device the trainer picks by default, but chooses its device itself
    (from torch.cuda.is_available() or at import) instead of from its input, so it breaks when the
    model is put on another device. A warning, never a failure."""


class DeviceMixing(Exception):
    """An op was given tensors on two devices, which CUDA and MPS refuse."""

    def __init__(self, op, here, made):
        self.op, self.here, self.made = op, here, made
        super().__init__(f"torch.{op} at {here} mixes devices: it gets a CPU tensor {made}")


ATEN = torch.ops.aten
SIMULATION_LIMITS = r"\bmeta\b|nvidia driver|not compiled with cuda"  # what only a simulated GPU raises
CROSSING = {ATEN._to_copy, ATEN.copy_}  # moves between devices, made to cross them
INDEXING = {ATEN.index, ATEN.index_put, ATEN.index_put_, ATEN._index_put_impl_}  # CPU indices allowed
class SimulatedOnMeta(TorchFunctionMode):
    """While active, ``device_type`` (cuda or mps) is simulated by the meta device: every tensor
    asked for on it (``device=``, ``.to(...)``, ``.cuda()``) is made on meta, so code written for
    a GPU runs, and is checked, on a machine without one."""

    def __init__(self, device_type):
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0].to("meta")
        if "device" in kwargs:
            kwargs["device"] = self.redirected(kwargs["device"], index_means_gpu=True)
        if func is torch.Tensor.to:
            args = tuple(self.redirected(item) for item in args)
        return func(*args, **kwargs)

    def redirected(self, device, index_means_gpu=False):
        """meta for a device of the simulated type (a bare index is a GPU's), else ``device``."""
        if index_means_gpu and isinstance(device, int) and not isinstance(device, bool):
            return torch.device("meta") if self.device_type == "cuda" else device
        if isinstance(device, str) and device.split(":")[0] == self.device_type:
            return torch.device("meta")
        if isinstance(device, torch.device) and device.type == self.device_type:
            return torch.device("meta")
        return device


class OneDevice(TorchDispatchMode):
    """While active, holds every op to CUDA's rule: all its tensors on one device, but for 0-dim
    CPU tensors, which count as numbers. Each CPU tensor made meanwhile is remembered with the line
    of the file under test that made it. Meta tensors hold no values: reading one back gives 0,
    where a GPU would give a number."""

    def __init__(self, under_test):
        super().__init__()
        self.path = under_test.__file__
        self.made_at = {}  # id of a CPU tensor -> (weak reference to it, the line that made it)
        self.failed_op = None  # (op, line of the file under test) of an op that raised

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in CROSSING:
            checked = (args[:1] + args[2:]) if func.overloadpacket in INDEXING else (args, kwargs)
            self.check(func, [item for item in tree_flatten(checked)[0] if isinstance(item, torch.Tensor)])
        if func is ATEN._local_scalar_dense.default and args[0].is_meta:
            return torch.zeros((), dtype=args[0].dtype).item()
        try:
            result = func(*args, **kwargs)
        except Exception:
            self.failed_op = (func.overloadpacket.__name__, line_running(self.path))
            raise
        sources = [self.origin(item) for item in tree_flatten((args, kwargs))[0] if isinstance(item, torch.Tensor)]
        origin = next((line for line in sources if line), None) or line_running(self.path)
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self.made_at[id(tensor)] = (weakref.ref(tensor), origin)
        return result

    def origin(self, tensor):
        """The line of the file under test where a CPU tensor made meanwhile, or the first CPU tensor
        it was computed from, was made; None for any other tensor."""
        reference, line = self.made_at.get(id(tensor), (None, None))
        return line if reference is not None and reference() is tensor else None

    def check(self, func, tensors):
        """Raise DeviceMixing, saying where, when ``tensors`` are on more than one device."""
        counted = [tensor for tensor in tensors if tensor.device.type != "cpu" or tensor.dim() > 0]
        if len({tensor.device for tensor in counted}) < 2:
            return
        on_cpu = next(tensor for tensor in counted if tensor.device.type == "cpu")
        here, made = line_running(self.path), self.origin(on_cpu)
        origin = ("made on that line" if made == here else f"made at {made}" if made
                  else "made before the call and left behind when the model moved (a tensor in a list, "
                       "a dict or a global?)")
        raise DeviceMixing(func.overloadpacket.__name__, here, f"of shape {tuple(on_cpu.shape)}, {origin}")


def move_as_the_trainer_does(diffusion, device):
    """device.move_to_device (Part B): ``.to(device)``, and the schedule tensors kept as plain attributes."""
    diffusion.to(device)
    for name, value in list(vars(diffusion).items()):
        if isinstance(value, torch.Tensor):
            setattr(diffusion, name, value.to(device))


def first_failure_on_device(steps, *modes):
    """Run ``steps``, (name, function) pairs, in order with ``modes`` active: (the step's name,
    what stopped it) for the first that raises, else (None, None). What stopped it is a
    DeviceMixing, or any other exception of the file's code, which that device raises too, or
    one of the simulation's own limits (``beyond_the_simulation``), which is no verdict on the
    file: the judge then says the check was not run."""
    step = None
    try:
        with contextlib.ExitStack() as active:
            for mode in modes:
                active.enter_context(mode)
            for step, run in steps:
                run()
    except Exception as error:  # noqa: BLE001 - whatever the file raises on that device is its verdict
        return step, error
    return None, None


def beyond_the_simulation(error):
    """Whether ``error`` comes from the simulated device's limits, not from the file's code: one
    that names the meta device (an op it has no kernel for, a value read back from a meta tensor,
    which holds none, a generator on it) or the missing NVIDIA driver (``pin_memory()``), or one
    raised inside torch.cuda or torch.mps (a call into the CUDA or MPS runtime, such as
    ``torch.cuda.synchronize()``, which no simulated GPU answers). No GPU raises these."""
    if re.search(SIMULATION_LIMITS, str(error), re.IGNORECASE):
        return True
    runtimes = [str(Path(module.__file__).parent) for module in (torch.cuda, torch.mps)]
    return any(frame.filename.startswith(tuple(runtimes)) for frame in traceback.extract_tb(error.__traceback__))


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def crash_on_device(error, device, path):
    """Where and how the file's code crashed on the simulated device: the op that raised (as
    ``OneDevice`` saw it) or else the file's innermost line, and the error."""
    if device.failed_op is not None:
        op, line = device.failed_op
        return f"torch.{op} at {line} raises {type(error).__name__}: {first_line(error)}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == path]
    where = f" at {Path(path).name}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    return f"{type(error).__name__}: {first_line(error)}{where}"
