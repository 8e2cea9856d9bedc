"""The probes of vae.py's contract (vae_contract.py): each calls the file under test and
returns only data, the one part of the contract a grader's box holds (contract_probes.py).

The file is imported, built and called as the notebook does, and nothing is assumed of its layers;
a3_helper.py's train_vae and show_images run with it as ``vae``, training on the CPU.
"""

import contextlib
import functools
import io
import sys
import types
from pathlib import Path

import matplotlib
import pytest
import torch
from torch.distributions import Normal

matplotlib.use("Agg")  # show_images draws without a display

HELPER_FILE = Path(__file__).resolve().parent / "a3_helper.py"
INPUT_SIZE = 784
LATENT = 15  # the notebook's LATENT_SIZE
CLASSES = 10


def load_under_test(path):
    """The vae.py at ``path``, run as a module with its folder importable."""
    with beside(path):
        return run_as_module("vae_under_contract", path)


@functools.cache
def helper_for(under_test):
    """a3_helper.py importing the file under test as ``vae``, as it does next to it in the notebook,
    training on the CPU on every machine. On a GPU, a mistake that trips a CUDA kernel's assert
    (BCE of an x_hat outside [0, 1], from a decoder without its sigmoid) breaks the CUDA context
    of the whole process, the notebook's kernel included, and every later check with it (on an
    H200, the file checked after one without its sigmoid failed checks it passes elsewhere)."""
    with beside(HELPER_FILE, vae=under_test):
        module = run_as_module("a3_helper_under_contract", HELPER_FILE)
    module.pick_device = lambda: torch.device("cpu")  # train_vae's device, read at each call
    return module


@contextlib.contextmanager
def beside(path, **modules):
    """While inside: the folder of ``path`` is importable and each name of ``modules`` imports
    the module given; afterwards both are as before."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.path.insert(0, str(path.parent))
    sys.modules.update(modules)
    try:
        yield
    finally:
        sys.path.remove(str(path.parent))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module


def run_as_module(name, path):
    """The module that running the file at ``path`` under ``name`` makes."""
    module = types.ModuleType(name)
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


class Kind:
    """One of the two models, built and called as the notebook does."""

    def __init__(self, name):
        self.name = name
        self.conditional = name == "CVAE"

    def __repr__(self):
        return self.name

    def build(self, under_test, latent_size=LATENT, seed=0):
        """The model with the notebook's keywords, its weights fixed by ``seed``."""
        torch.manual_seed(seed)
        if self.conditional:
            return under_test.CVAE(input_size=INPUT_SIZE, num_classes=CLASSES, latent_size=latent_size)
        return under_test.VAE(input_size=INPUT_SIZE, latent_size=latent_size)

    def forward(self, model, x, c):
        """x_hat, mu, logvar; the CVAE also gets the one-hot classes ``c``."""
        return model(x, c) if self.conditional else model(x)

    def decoder_input(self, z, c):
        """What the decoder reads: z, or [z, c] for the CVAE (eq. (5))."""
        return torch.cat([z, c], dim=1) if self.conditional else z


KINDS = [Kind("VAE"), Kind("CVAE")]
KIND = {kind.name: kind for kind in KINDS}


def decode(model, codes):
    """model.decoder(codes), failing with the shapes when the decoder cannot read them."""
    try:
        return model.decoder(codes)
    except RuntimeError as error:
        pytest.fail(f"{type(model).__name__}'s decoder cannot read codes of shape {tuple(codes.shape)} "
                    f"(the CVAE's are [z, c]: latent_size + num_classes values): {error}", pytrace=False)


def loss_value(under_test, x_hat, x, mu, logvar):
    loss = under_test.loss_function(x_hat, x, mu, logvar)
    assert loss.numel() == 1, f"loss_function returned shape {tuple(loss.shape)}, not one number"
    return loss.reshape(())


# ---- the probes: each calls the file under test and returns only data


def probe_hello(under_test):
    """What hello_vae() prints."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        under_test.hello_vae()
    return printed.getvalue()


def probe_forwards(under_test, kind, batches, latent_size=LATENT, weights_seed=0, draw_seed=0):
    """(x_hat, mu, logvar) of one model of ``kind`` on each (x, c) of ``batches``, its weights
    fixed by ``weights_seed``, after torch.manual_seed(draw_seed)."""
    model = KIND[kind].build(under_test, latent_size, weights_seed)
    torch.manual_seed(draw_seed)
    return [KIND[kind].forward(model, x, c) for x, c in batches]


def probe_forward_then_decoder(under_test, kind, x, c, weights_seed, draw_seed):
    """forward(x[, c]) after torch.manual_seed(draw_seed); then the decoder on the z of eq. (2)
    that forward's mu and logvar give under the same seed, and on z + 1:
    {"forward", "decoded", "decoded_elsewhere"}."""
    model = KIND[kind].build(under_test, seed=weights_seed)
    torch.manual_seed(draw_seed)
    x_hat, mu, logvar = KIND[kind].forward(model, x, c)
    torch.manual_seed(draw_seed)
    z = Normal(mu, torch.exp(0.5 * logvar)).rsample()
    return {"forward": (x_hat, mu, logvar), "decoded": decode(model, KIND[kind].decoder_input(z, c)),
            "decoded_elsewhere": decode(model, KIND[kind].decoder_input(z + 1, c))}


def probe_decoder(under_test, kind, codes, weights_seed):
    """model.decoder(codes) of a model of ``kind``, and the size of the grid show_images draws of
    it."""
    with torch.no_grad():
        generated = decode(KIND[kind].build(under_test, seed=weights_seed), codes)
    figure = helper_for(under_test).show_images(generated)
    grid = figure.axes[0].images[0].get_array()
    matplotlib.pyplot.close(figure)
    return {"generated": generated, "grid": list(grid.shape)}


def probe_reparametrize(under_test, mu, logvar, seed):
    torch.manual_seed(seed)
    return under_test.reparametrize(mu, logvar)


def probe_reparametrize_gradients(under_test, mu, logvar, seed):
    """Whether z = reparametrize(mu, logvar) (after torch.manual_seed(seed)) is in the graph, and
    the gradients of z.sum() with respect to mu and logvar."""
    mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    torch.manual_seed(seed)
    z = under_test.reparametrize(mu, logvar)
    if not z.requires_grad:
        return {"in_graph": False}
    z.sum().backward()
    return {"in_graph": True, "mu": mu.grad, "logvar": logvar.grad}


def probe_losses(under_test, cases):
    """loss_function(x_hat, x, mu, logvar) for each case, each one number."""
    return [loss_value(under_test, *case) for case in cases]


def probe_training(under_test, kind, batch, labels, held_out, held_out_labels, weights_seed, seed, epochs):
    """a3_helper's train_vae, as the notebook calls it, for ``epochs`` epochs on one batch, and
    the model's (x_hat, mu, logvar) on the images ``held_out`` before and after, each time after
    torch.manual_seed(seed): {"before", "after"}."""
    model = KIND[kind].build(under_test, seed=weights_seed)
    codes = torch.nn.functional.one_hot(held_out_labels, CLASSES).float()

    def outputs():
        torch.manual_seed(seed)
        return KIND[kind].forward(model, held_out, codes)

    before = outputs()
    torch.manual_seed(seed)
    helper = helper_for(under_test)
    for epoch in range(epochs):
        helper.train_vae(epoch, model, [(batch, labels)], cond=KIND[kind].conditional)
    return {"before": before, "after": outputs()}
