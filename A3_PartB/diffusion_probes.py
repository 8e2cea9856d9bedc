"""The probes of diffusion.py's contract (diffusion_contract.py): each calls the file under test
and returns only data, the one part of the contract a grader's box holds (contract_probes.py).

The Diffusion is built on a stub network whose prediction is known (``StubNetwork``), and
``noise_like`` is replaced by zeros, ones or a seeded generator, as the course's graders do.
Time steps are 0-based: t = 0 .. T-1 in code is the handout's 1 .. T. The device probes run the
file on the simulated devices (simulated_devices.py).
"""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from contract_probes import machine_with
from simulated_devices import (beyond_the_simulation, crash_on_device, DeviceMixing, first_failure_on_device,
                               first_line, line_running, move_as_the_trainer_does, OneDevice, SimulatedOnMeta)

T = 50  # the course's time_steps
SIZE = 4
CHANNELS = 3
BATCH = 2
METHODS = ("q_sample", "p_losses", "forward", "p_sample", "p_sample_loop", "sample")


def load_under_test(path):
    """The diffusion.py at ``path``, imported as on a machine without a GPU."""
    with machine_with("cpu"):
        return load_diffusion_file(path)


def load_diffusion_file(path):
    """Import a diffusion.py by path, under a name of its own; its folder is importable while it
    loads, as it is next to its siblings in A3_PartB."""
    spec = importlib.util.spec_from_file_location("diffusion_under_contract", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


class StubNetwork(nn.Module):
    """Stands in for the U-Net: predicts epsilon = predict(x_t, t) and records each call."""

    def __init__(self, predict):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # theta: .parameters(), .to() and a gradient to check
        self.predict = predict
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.gain * self.predict(x, t)


def known_noise_prediction(x, t):
    """A prediction that depends on both x_t and t, for either float precision."""
    return 0.5 * x + 0.02 * t.view(-1, 1, 1, 1)


def prediction(spec):
    """The stub network's epsilon_theta(x_t, t), named by ``spec`` so that it travels as data:
    "known" (known_noise_prediction), a tensor (that epsilon whatever x_t), ("linear", a, b)
    (a x_t + b) or "beyond" (-3 sign(x_t), pushing x0_hat beyond [-1, 1])."""
    if isinstance(spec, torch.Tensor):
        return lambda x, t: spec
    if spec == "known":
        return known_noise_prediction
    if spec == "beyond":
        return lambda x, t: -3 * x.sign()
    _, scale, shift = spec
    return lambda x, t: scale * x + shift


def make_diffusion(under_test, predict="known", **settings):
    settings = {"image_size": SIZE, "channels": CHANNELS, "timesteps": T, **settings}
    return under_test.Diffusion(StubNetwork(prediction(predict)), **settings)


def steps(t, batch=BATCH):
    return torch.full((batch,), t, dtype=torch.long)


def seeded_draws(seed):
    """Standard normal noise from a generator of its own, ``draw(shape)``."""
    generator = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=generator)


def noise_draws(spec):
    """noise_like's replacement named by ``spec``: "zeros", "ones", or the int seeding
    ``seeded_draws``."""
    return {"zeros": torch.zeros, "ones": torch.ones}.get(spec) or seeded_draws(spec)


def replace_noise(diffusion, draw):
    """Patch ``noise_like`` on the instance, as graders do: every draw becomes ``draw(shape)``."""
    diffusion.noise_like = lambda shape, device, *_args, **_kwargs: draw(tuple(shape)).to(device)


class GlobalDraws(TorchDispatchMode):
    """While active, records every random op that draws from torch's global generator (the ones
    of noise_like's replacements have generators of their own), with the line of the file under
    test that drew it."""

    def __init__(self, under_test):
        super().__init__()
        self.path = under_test.__file__
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and kwargs.get("generator") is None:
            self.seen.append(f"torch.{func.overloadpacket.__name__} at {line_running(self.path)}")
        return func(*args, **kwargs)

    def places(self):
        """Each op and line seen, once, in the order first seen ('' if none)."""
        return "; ".join(dict.fromkeys(self.seen))


def schedule(under_test, timesteps, **settings):
    """cosine_schedule(timesteps, **settings), failing in one line unless it is one tensor of
    the T alphas."""
    alphas = under_test.cosine_schedule(timesteps, **settings)
    if isinstance(alphas, torch.Tensor) and tuple(alphas.shape) == (timesteps,):
        return alphas
    got = (f"a tensor of shape {tuple(alphas.shape)}" if isinstance(alphas, torch.Tensor)
           else f"a {type(alphas).__name__}" + (f" of {len(alphas)} items" if isinstance(alphas, (tuple, list)) else ""))
    pytest.fail(f"cosine_schedule({timesteps}) returned {got}, not one tensor of the {timesteps} alphas "
                "of eq. (3)", pytrace=False)


# ---- the probes: each calls the file under test and returns only data


def probe_extract(under_test, values, t, shape):
    return under_test.extract(values, t, shape)


def probe_unnormalize(under_test, x):
    return under_test.unnormalize_to_zero_to_one(x)


def probe_cosine_schedule(under_test, timesteps, settings):
    return schedule(under_test, timesteps, **settings)


def probe_draws_outside_noise_like(under_test, method, x, global_seeds, noise_seed):
    """``method`` called as the trainer and graders call it, noise_like drawing from
    ``noise_seed``, once after each of torch's ``global_seeds``: its results and where it drew
    from torch's global generator; None when the method requires ``noise``, so draws none."""
    results, places = [], set()
    for seed in global_seeds:
        diffusion = make_diffusion(under_test)
        replace_noise(diffusion, seeded_draws(noise_seed))
        torch.manual_seed(seed)
        with GlobalDraws(under_test) as draws:
            result = call_drawing_noise(diffusion, method, x)
        if result is None:
            return None
        results.append(result)
        places.add(draws.places())
    return {"results": results, "places": "; ".join(sorted(place for place in places if place))}


def probe_settings(under_test, image_size, channels, timesteps):
    network = StubNetwork(known_noise_prediction)
    diffusion = under_test.Diffusion(network, image_size=image_size, channels=channels, timesteps=timesteps)
    return {"keeps_network": diffusion.model is network,
            "settings": [diffusion.image_size, diffusion.channels, diffusion.num_timesteps]}


def probe_q_sample(under_test, x_0, t, noise):
    return make_diffusion(under_test).q_sample(x_0, t, noise)


def probe_q_sample_beside_the_schedule(under_test, x_0, t, noise):
    return {"x_t": probe_q_sample(under_test, x_0, t, noise), "alphas": schedule(under_test, len(t))}


def probe_p_losses_at_each_t(under_test, x_0, noise, ts):
    diffusion = make_diffusion(under_test)
    return torch.stack([diffusion.p_losses(x_0, steps(t, len(x_0)), noise).reshape(()) for t in ts])


def probe_gradient_of_p_losses(under_test, x_0, noise, t):
    """d p_losses / d(the stub network's one parameter), None where no gradient reaches it."""
    diffusion = make_diffusion(under_test)
    diffusion.p_losses(x_0, steps(t, len(x_0)), noise).backward()
    return diffusion.model.gain.grad


def probe_forward(under_test, x_0, noise, seed):
    """forward(x_0, noise) after torch.manual_seed(seed): the loss and the steps t the network got."""
    diffusion = make_diffusion(under_test)
    torch.manual_seed(seed)
    loss = diffusion(x_0, noise)
    return {"loss": loss, "drawn": diffusion.model.calls[-1][1]}


def probe_noise_like(under_test, shape, seed):
    torch.manual_seed(seed)
    return make_diffusion(under_test).noise_like(shape, torch.device("cpu"))


def probe_p_sample(under_test, x, ts, cases):
    """p_sample(x[k], t, t) for each t of ``ts``, for each (prediction, noise) of ``cases``
    (``x`` holds one state per t): one row of results per case, and where torch's global
    generator was drawn from."""
    with GlobalDraws(under_test) as draws:
        results = []
        for predict, noise in cases:
            diffusion = make_diffusion(under_test, predict)
            replace_noise(diffusion, noise_draws(noise))
            results.append(torch.stack([diffusion.p_sample(x[k], steps(t, x.shape[1]), t) for k, t in enumerate(ts)]))
    return {"results": torch.stack(results), "places": draws.places()}


def probe_p_sample_loop(under_test, x_T, predict, noise):
    """p_sample_loop(x_T): the result, each (x_t, t) the network got, and where torch's global
    generator was drawn from."""
    diffusion = make_diffusion(under_test, predict)
    replace_noise(diffusion, noise_draws(noise))
    with GlobalDraws(under_test) as draws:
        result = diffusion.p_sample_loop(x_T)
    return {"result": result, "states": [x for x, _ in diffusion.model.calls],
            "steps": [t for _, t in diffusion.model.calls], "places": draws.places()}


def probe_sample(under_test, batch_size, settings, noise, seed):
    """sample(batch_size) after torch.manual_seed(seed), noise_like replaced where ``noise``
    names a replacement (None: the file's own): the result and where torch's global generator
    was drawn from."""
    diffusion = make_diffusion(under_test, **settings)
    if noise is not None:
        replace_noise(diffusion, noise_draws(noise))
    torch.manual_seed(seed)
    with GlobalDraws(under_test) as draws:
        result = diffusion.sample(batch_size)
    return {"result": result, "places": draws.places()}


# ---- what the probes call


def call_drawing_noise(diffusion, method, x):
    """Call ``method`` of the skeleton on ``x`` as the trainer and the graders do, leaving
    ``noise`` out where the file allows it; None when the method requires ``noise``, so draws none."""
    calls = {"p_sample": lambda: diffusion.p_sample(x, steps(T // 2, len(x)), T // 2),
             "p_sample_loop": lambda: diffusion.p_sample_loop(x),
             "sample": lambda: diffusion.sample(len(x)),
             "q_sample": lambda: diffusion.q_sample(x, steps(T // 2, len(x))),
             "p_losses": lambda: diffusion.p_losses(x, steps(T // 2, len(x)))}
    noise = inspect.signature(getattr(diffusion, method)).parameters.get("noise")
    if noise is not None and noise.default is inspect.Parameter.empty:
        return None
    return calls[method]()


def call_on(diffusion, method, device):
    """Call ``method`` of the skeleton on inputs made on ``device``, passing noise."""
    x = torch.zeros(BATCH, CHANNELS, SIZE, SIZE, device=device)
    t = torch.full((BATCH,), T // 2, device=device, dtype=torch.long)
    calls = {"q_sample": lambda: diffusion.q_sample(x, t, torch.zeros_like(x)),
             "p_losses": lambda: diffusion.p_losses(x, t, torch.zeros_like(x)),
             "forward": lambda: diffusion(x, torch.zeros_like(x)),
             "p_sample": lambda: diffusion.p_sample(x, t, T // 2),
             "p_sample_loop": lambda: diffusion.p_sample_loop(x),
             "sample": lambda: diffusion.sample(BATCH)}
    return calls[method]()


def probe_on_the_trainers_device(under_test, method, device_type):
    """The file imported afresh and its Diffusion built on a machine whose best device is
    ``device_type`` (simulated on meta), moved there as the trainer moves it, then ``method``
    called on inputs there: the step that stopped and how ("mixing" or "crash", with what
    happened), or no step."""
    built = {}

    def build():
        built["diffusion"] = make_diffusion(load_diffusion_file(Path(under_test.__file__)))
        move_as_the_trainer_does(built["diffusion"], torch.device(device_type))

    one_device = OneDevice(under_test)
    call = (method, lambda: call_on(built["diffusion"], method, torch.device(device_type)))
    step, stopped = first_failure_on_device([("building the Diffusion", build), call],
                                            machine_with(device_type), SimulatedOnMeta(device_type), one_device)
    if stopped is None:
        return {"step": None}
    if beyond_the_simulation(stopped):
        return {"step": step, "beyond": f"{type(stopped).__name__}: {first_line(stopped)}"}
    if isinstance(stopped, DeviceMixing):
        return {"step": step, "mixing": str(stopped)}
    return {"step": step, "crash": crash_on_device(stopped, one_device, under_test.__file__)}


def probe_on_another_device(under_test, method):
    """``method`` of a Diffusion moved to the meta device, on this CPU-only machine: where it
    stopped, if it did, and how ("mixing": the op, the line, the CPU tensor it got)."""
    diffusion = make_diffusion(under_test)
    move_as_the_trainer_does(diffusion, torch.device("meta"))
    step, stopped = first_failure_on_device([(method, lambda: call_on(diffusion, method, torch.device("meta")))],
                                            OneDevice(under_test))
    if stopped is None:
        return {"step": None}
    if isinstance(stopped, DeviceMixing):
        return {"step": step, "mixing": {"op": stopped.op, "here": stopped.here, "made": stopped.made}}
    return {"step": step, "stopped": f"{type(stopped).__name__}: {stopped}"}


