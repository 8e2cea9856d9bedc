"""The contract of vae.py: what any correct file written to the assignment's skeleton does.

Point it at any vae.py (the one beside it is the default):

    A3_VAE=path/to/vae.py python -m pytest A3_PartA/vae_contract.py
    python -m pytest vae_contract.py        # in A3_PartA: its own vae.py

The notebook runs it before training through ``contract_check.check_before_training``.

Only the skeleton's names are used: ``hello_vae``, ``VAE(input_size, latent_size=15)``,
``CVAE(input_size, num_classes=10, latent_size=15)``, their ``forward`` and ``decoder``, as the
notebook calls them, ``reparametrize(mu, logvar)`` and ``loss_function(x_hat, x, mu, logvar)``.
Nothing is assumed of the layers: the hidden width, where the image is flattened and whether the
decoder or ``forward`` shapes the images are the student's choice. Values are compared to float32
round-off against references written here with ``torch.distributions``, and a failure names the
equation of variational_autoencoders.ipynb with the numbers. The notebook's ``train_vae`` and
``show_images`` are this package's A3_PartA/a3_helper.py, run with the file under test as ``vae``.
"""

import contextlib
import math
import os
import sys
import types
from pathlib import Path

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

matplotlib.use("Agg")  # show_images draws without a display

PART_A = Path(__file__).resolve().parent
DEFAULT_FILE = PART_A / "vae.py"
HELPER_FILE = PART_A / "a3_helper.py"
INPUT_SIZE = 784
LATENT = 15  # the notebook's LATENT_SIZE
CLASSES = 10
BATCH = 4
RTOL = 1e-5  # float32 round-off of sums over 784 pixels and a few images
ATOL = 1e-6  # for values that are 0 or nearly so


@pytest.fixture(scope="module")
def under_test():
    """The vae.py named by $A3_VAE, else this package's own."""
    path = Path(os.environ.get("A3_VAE") or DEFAULT_FILE).resolve()
    if not path.is_file():
        pytest.fail(f"A3_VAE={path} is not a file; set it to your vae.py", pytrace=False)
    with beside(path):
        return run_as_module("vae_under_contract", path)


@pytest.fixture(scope="module")
def helper(under_test):
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

    def build(self, under_test, latent_size=LATENT):
        """The model with the notebook's keywords, its weights fixed by one seed."""
        torch.manual_seed(0)
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


def decode(model, codes):
    """model.decoder(codes), failing with the shapes when the decoder cannot read them."""
    try:
        return model.decoder(codes)
    except RuntimeError as error:
        pytest.fail(f"{type(model).__name__}'s decoder cannot read codes of shape {tuple(codes.shape)} "
                    f"(the CVAE's are [z, c]: latent_size + num_classes values): {error}", pytrace=False)


def images(batch, seed):
    """Gray levels in [0, 1), fixed by ``seed``."""
    return torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def classes(batch, seed):
    """One-hot classes (batch, 10), fixed by ``seed``."""
    labels = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(seed))
    return F.one_hot(labels, CLASSES).float()


def latent_statistics(batch, seed):
    """mu and logvar (batch, Z) of both signs, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT, generator=generator), torch.randn(batch, LATENT, generator=generator)


def per_image(tensor):
    """(N, 1, 28, 28) or (N, 784) as (N, 784), to compare images whichever shape holds them."""
    return tensor.reshape(len(tensor), -1)


def assert_close(what, actual, expected, *, rtol=RTOL, atol=ATOL):
    """Fail unless |actual - expected| <= atol + rtol |expected| everywhere, naming ``what`` (the
    equation), how many entries are off and the worst one with its relative error."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.numel() == expected.numel(), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    actual, expected = actual.reshape(expected.shape), expected
    error = (actual - expected).abs().nan_to_num(nan=math.inf)
    ratio = (error / (atol + rtol * expected.abs())).flatten()
    if bool((ratio <= 1).all()):
        return
    worst = int(ratio.argmax())
    got, wanted = actual.flatten()[worst].item(), expected.flatten()[worst].item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), expected.shape))
    where = f" at index {index}" if index else ""
    pytest.fail(
        f"{what} is off in {int((ratio > 1).sum())} of {ratio.numel()} values. Worst{where}: got "
        f"{got:.7g}, expected {wanted:.7g}, relative error {abs(got - wanted) / max(abs(wanted), atol):.3g} "
        f"(tolerance {rtol:g} relative, {atol:g} absolute)", pytrace=False)


# ---- the notebook's first calls


def test_hello_vae_prints_a_greeting(under_test, capsys):
    under_test.hello_vae()
    assert capsys.readouterr().out.strip(), "hello_vae() printed nothing"


# ---- the models' forward pass


@pytest.mark.parametrize("latent", [LATENT, 4])
@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_forward_returns_x_hat_n_1_28_28_and_mu_logvar_n_z(under_test, kind, latent):
    """x_hat is shaped like the images; mu and log sigma^2 hold latent_size values per image."""
    x_hat, mu, logvar = kind.forward(kind.build(under_test, latent), images(BATCH, 1), classes(BATCH, 2))
    shapes = tuple(tuple(tensor.shape) for tensor in (x_hat, mu, logvar))
    assert shapes == ((BATCH, 1, 28, 28), (BATCH, latent), (BATCH, latent)), (
        f"{kind}(latent_size={latent}).forward on {BATCH} images gave x_hat, mu, logvar of shapes "
        f"{shapes}; expected {(BATCH, 1, 28, 28)}, {(BATCH, latent)}, {(BATCH, latent)}")


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_x_hat_is_one_bernoulli_probability_per_pixel(under_test, kind):
    """The decoder ends in a Sigmoid: every x_hat_i lies in [0, 1], the p(x|z) of eq. (1)."""
    x_hat, _, _ = kind.forward(kind.build(under_test), images(16, 3), classes(16, 4))
    low, high = x_hat.min().item(), x_hat.max().item()
    assert 0 <= low and high <= 1, f"{kind}'s x_hat spans [{low:.4g}, {high:.4g}], not [0, 1]"


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_encoder_gives_mu_of_either_sign_and_logvar_below_zero(under_test, kind):
    """The heads are plain Linear layers: mu is any real number and so is logvar = log sigma^2,
    negative where sigma < 1 (nothing after the heads, no ReLU, no BatchNorm)."""
    _, mu, logvar = kind.forward(kind.build(under_test), images(16, 5), classes(16, 6))
    spans = {name: (value.min().item(), value.max().item()) for name, value in (("mu", mu), ("logvar", logvar))}
    if not spans["mu"][0] < 0 < spans["mu"][1] or not spans["logvar"][0] < 0:
        pytest.fail(f"{kind}'s encoder gave mu in [{spans['mu'][0]:.4g}, {spans['mu'][1]:.4g}] and logvar in "
                    f"[{spans['logvar'][0]:.4g}, {spans['logvar'][1]:.4g}] on 16 random images: mu must take "
                    "either sign and logvar go below 0; the heads must be Linear(H, Z) with nothing after "
                    "them", pytrace=False)


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_encoder_encodes_each_image_on_its_own(under_test, kind):
    """q(z|x) is a function of x (and c) alone: an image's mu and logvar do not depend on the
    other images of its batch (no BatchNorm)."""
    model = kind.build(under_test)
    x, c = images(6, 7), classes(6, 8)
    _, *together = kind.forward(model, x, c)
    _, *first_alone = kind.forward(model, torch.cat([x[:1], images(5, 9)]), torch.cat([c[:1], classes(5, 10)]))
    for name, in_batch, alone in zip(("mu", "logvar"), together, first_alone):
        assert_close(f"{kind}'s {name} of an image, encoded again among other images", in_batch[0], alone[0],
                     rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_forward_decodes_z_drawn_by_reparametrize(under_test, kind):
    """x_hat = decoder(z) with z = mu + sigma eps (eq. (2)); the CVAE's decoder reads [z, c]
    (eq. (5)). Seen under one seed: x_hat equals the decoder on the z drawn from forward's mu,
    logvar and the same eps."""
    model = kind.build(under_test)
    x, c = images(BATCH, 11), classes(BATCH, 12)
    torch.manual_seed(13)
    x_hat, mu, logvar = kind.forward(model, x, c)
    torch.manual_seed(13)
    z = Normal(mu, torch.exp(0.5 * logvar)).rsample()
    expected = decode(model, kind.decoder_input(z, c))
    label = "decoder([z, c])" if kind.conditional else "decoder(z)"
    assert_close(f"{kind}'s x_hat = {label}, z of eq. (2)", per_image(x_hat), per_image(expected),
                 rtol=1e-4, atol=1e-6)


def test_cvae_encoder_reads_the_class(under_test):
    """eq. (5): q(z|x, c) sees [flatten(x), c], so the same image gets another mu with another class."""
    model = KINDS[1].build(under_test)
    x, c = images(BATCH, 14), classes(BATCH, 15)
    _, mu, _ = model(x, c)
    _, mu_other, _ = model(x, c.roll(1, dims=1))
    assert not torch.allclose(mu, mu_other), "CVAE's mu is the same whatever the class: the encoder ignores c"


def test_cvae_decoder_draws_a_different_image_for_each_class_from_one_code(under_test):
    """eq. (5): p(x|z, c) reads [z, c]; the notebook decodes one code with each of the 10 classes."""
    model = KINDS[1].build(under_test)
    z = torch.randn(1, LATENT).expand(CLASSES, LATENT)
    with torch.no_grad():
        digits = per_image(decode(model, torch.cat([z, torch.eye(CLASSES)], dim=1)))
    spread = (digits - digits.mean(dim=0)).abs().max().item()
    assert spread > 1e-4, f"CVAE's decoder gives one image for all 10 classes (spread {spread:.3g})"


# ---- reparametrize, eq. (2)


def test_reparametrize_is_mu_plus_sigma_times_one_standard_normal_draw_of_mu_shape(under_test):
    """eq. (2): z = mu + exp(logvar / 2) eps with eps ~ N(0, I) of mu's shape, drawn once: under
    one seed it equals Normal(mu, sigma).rsample(), as the notebook's check says."""
    mu, logvar = latent_statistics(5, seed=16)
    torch.manual_seed(17)
    z = under_test.reparametrize(mu, logvar)
    torch.manual_seed(17)
    expected = Normal(mu, torch.exp(0.5 * logvar)).rsample()
    assert_close("eq. (2) z = mu + sigma eps (eps drawn once, of mu's shape)", z, expected)


def test_reparametrize_draws_with_mean_mu_and_variance_exp_logvar(under_test):
    """eq. (2): z ~ N(mu, diag exp(logvar)), seen in the moments of many draws."""
    draws = 200_000
    mu = torch.tensor([1.0, -2.0]).expand(draws, 2)
    variance = torch.tensor([0.25, 4.0])
    torch.manual_seed(18)
    z = under_test.reparametrize(mu, variance.log().expand(draws, 2))
    assert_close("eq. (2) sample mean of z", z.mean(dim=0), mu[0], rtol=0, atol=0.02)
    assert_close("eq. (2) sample variance of z", z.var(dim=0), variance, rtol=0.02, atol=0)


def test_reparametrize_passes_gradients_to_mu_and_logvar(under_test):
    """The trick's point: dz/dmu = 1 and dz/dlogvar = sigma eps / 2."""
    mu, logvar = (tensor.requires_grad_() for tensor in latent_statistics(6, seed=19))
    torch.manual_seed(20)
    z = under_test.reparametrize(mu, logvar)
    assert z.requires_grad, "reparametrize's z is cut from the graph: no gradient reaches the encoder"
    z.sum().backward()
    torch.manual_seed(20)
    eps = torch.randn_like(mu)
    assert_close("dz/dmu", mu.grad, torch.ones_like(mu))
    assert_close("dz/dlogvar = sigma eps / 2", logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


# ---- loss_function, eqs. (3) and (4)


def negative_elbo(x_hat, x, mu, logvar):
    """eq. (4) from torch.distributions: Bernoulli negative log-likelihood summed over the pixels
    plus the Normal-to-Normal KL summed over the latent dimensions, averaged over the batch."""
    reconstruction = -Bernoulli(probs=x_hat.double(), validate_args=False).log_prob(x.double()).sum()
    posterior = Normal(mu.double(), torch.exp(0.5 * logvar.double()))
    prior = Normal(torch.zeros_like(posterior.loc), torch.ones_like(posterior.scale))
    return (reconstruction + kl_divergence(posterior, prior).sum()) / len(x)


def reconstructions(batch, seed):
    """x in [0, 1] and x_hat in [0.01, 0.99], fixed by ``seed``."""
    return images(batch, seed).clamp(0.01, 0.99), images(batch, seed + 1)


def loss_value(under_test, x_hat, x, mu, logvar):
    loss = under_test.loss_function(x_hat, x, mu, logvar)
    assert loss.numel() == 1, f"loss_function returned shape {tuple(loss.shape)}, not one number"
    return loss.reshape(())


def test_loss_reconstruction_term_is_bce_summed_over_pixels_and_averaged_over_the_batch(under_test):
    """eq. (4)'s first term with a posterior equal to the prior (KL = 0):
    -sum_i [x_i log x_hat_i + (1 - x_i) log(1 - x_hat_i)] per image, averaged over the N images."""
    x_hat, x = reconstructions(3, seed=21)
    zeros = torch.zeros(3, LATENT)
    assert_close("eq. (4) BCE summed over pixels / N (with KL = 0)",
                 loss_value(under_test, x_hat, x, zeros, zeros), negative_elbo(x_hat, x, zeros, zeros))


def test_loss_kl_term_is_eq_3_summed_over_latent_dimensions_and_averaged_over_the_batch(under_test):
    """eq. (3): KL = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)) per image, averaged over the
    N images; seen as the loss minus the loss of the same images with the prior as posterior."""
    x_hat, x = reconstructions(3, seed=23)
    mu, logvar = latent_statistics(3, seed=25)
    zeros = torch.zeros_like(mu)
    kl = loss_value(under_test, x_hat, x, mu, logvar).double() - loss_value(under_test, x_hat, x, zeros, zeros)
    expected = negative_elbo(x_hat, x, mu, logvar) - negative_elbo(x_hat, x, zeros, zeros)
    assert_close("eq. (3) KL summed over latent dimensions / N", kl, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("batch", [1, BATCH])
def test_loss_function_is_the_negative_elbo_of_eq_4(under_test, batch):
    """eq. (4): the notebook's check, BCE plus KL of every image, divided by the batch size N."""
    x_hat, x = reconstructions(batch, seed=26)
    mu, logvar = latent_statistics(batch, seed=28)
    assert_close(f"eq. (4) negative ELBO (N={batch})", loss_value(under_test, x_hat, x, mu, logvar),
                 negative_elbo(x_hat, x, mu, logvar))


# ---- the notebook's generation and training cells


def prior_codes(kind):
    """The notebook's codes: 10 draws of z ~ N(0, I), with the one-hot digits 0-9 for the CVAE."""
    torch.manual_seed(30)
    return kind.decoder_input(torch.randn(CLASSES, LATENT), torch.eye(CLASSES))


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_decoder_turns_codes_from_the_prior_into_images_that_show_images_draws(under_test, helper, kind):
    """The notebook's generation cells: model.decoder(z) gives 10 images of 784 pixels in [0, 1],
    which show_images lays out in a 4 x 3 grid."""
    with torch.no_grad():
        generated = decode(kind.build(under_test), prior_codes(kind))
    assert per_image(generated).shape == (CLASSES, INPUT_SIZE), (
        f"{kind}'s decoder gave shape {tuple(generated.shape)} for 10 codes; expected 10 images of 784 pixels")
    assert 0 <= generated.min().item() and generated.max().item() <= 1, "the decoded images are not in [0, 1]"
    figure = helper.show_images(generated)
    grid = figure.axes[0].images[0].get_array()
    matplotlib.pyplot.close(figure)
    assert grid.shape == (3 * 30 + 2, 4 * 30 + 2)


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_train_vae_lowers_the_loss_on_a_tiny_batch(under_test, helper, kind, capsys):
    """The notebook's training cells: train_vae(epoch, model, loader, cond) runs Adam on
    loss_function; eight epochs of one batch of 16 images lower it by more than round-off."""
    torch.manual_seed(31)
    batch = [((images(16, 32) < 0.2).float(), torch.randint(0, CLASSES, (16,)))]
    model = kind.build(under_test)
    losses = [helper.train_vae(epoch, model, batch, cond=kind.conditional) for epoch in range(8)]
    assert losses[-1] < 0.97 * losses[0], f"{kind}'s loss over eight epochs on one batch: {losses}"
