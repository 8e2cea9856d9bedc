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

Each check hands its inputs to one probe (vae_probes.py: it calls the file and returns data) and
judges the answer, so that a grader runs the file in its box and judges in a process that never
imports it (contract_probes.py). Each check has a ``weight`` in Part A's points: the values of
eqs. (2)-(4) and a training that lowers eq. (4)'s negative ELBO, judged here on the model's
outputs, weigh the most; a check of a shape, a range or the file compared with itself
``rests_on`` those values and scores only when they pass.
"""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from contract_probes import rests_on, run, seeded, weight  # noqa: F401 - run is the checks' fixture
from vae_probes import (CLASSES, INPUT_SIZE, KINDS, LATENT, load_under_test, probe_decoder, probe_forward_then_decoder,
                        probe_forwards, probe_hello, probe_losses, probe_reparametrize, probe_reparametrize_gradients,
                        probe_training)

PART_A = Path(__file__).resolve().parent
DEFAULT_FILE = PART_A / "vae.py"
BATCH = 4
RTOL = 1e-5  # float32 round-off of sums over 784 pixels and a few images
ATOL = 1e-6  # for values that are 0 or nearly so


def trained(kind_name):
    """The check of a training that lowers eq. (4), for the model ``kind_name``: the one most
    checks of a model rest on."""
    return test_train_vae_lowers_the_negative_elbo_of_held_out_images, kind_name


@pytest.fixture(scope="module")
def under_test():
    """The vae.py named by $A3_VAE, else this package's own."""
    path = Path(os.environ.get("A3_VAE") or DEFAULT_FILE).resolve()
    if not path.is_file():
        pytest.fail(f"A3_VAE={path} is not a file; set it to your vae.py", pytrace=False)
    return load_under_test(path)


def generator(seed):
    """A generator of its own, fixed by ``seed`` (offset afresh for each grading)."""
    return torch.Generator().manual_seed(seeded(seed))


def images(batch, seed):
    """Gray levels in [0, 1), fixed by ``seed``."""
    return torch.rand(batch, 1, 28, 28, generator=generator(seed))


def classes(batch, seed):
    """One-hot classes (batch, 10), fixed by ``seed``."""
    return F.one_hot(torch.randint(0, CLASSES, (batch,), generator=generator(seed)), CLASSES).float()


def latent_statistics(batch, seed):
    """mu and logvar (batch, Z) of both signs, fixed by ``seed``."""
    drawn = generator(seed)
    return torch.randn(batch, LATENT, generator=drawn), torch.randn(batch, LATENT, generator=drawn)


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


@weight(1)
def test_hello_vae_prints_a_greeting(run):
    assert run(probe_hello).strip(), "hello_vae() printed nothing"


# ---- the models' forward pass


@pytest.mark.parametrize("latent", [LATENT, 4])
@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_forward_returns_x_hat_n_1_28_28_and_mu_logvar_n_z(run, request, kind, latent):
    """x_hat is shaped like the images; mu and log sigma^2 hold latent_size values per image."""
    rests_on(request, trained(kind.name))
    [(x_hat, mu, logvar)] = run(probe_forwards, kind=kind.name, batches=[(images(BATCH, 1), classes(BATCH, 2))],
                                latent_size=latent, weights_seed=seeded(0))
    shapes = tuple(tuple(tensor.shape) for tensor in (x_hat, mu, logvar))
    assert shapes == ((BATCH, 1, 28, 28), (BATCH, latent), (BATCH, latent)), (
        f"{kind}(latent_size={latent}).forward on {BATCH} images gave x_hat, mu, logvar of shapes "
        f"{shapes}; expected {(BATCH, 1, 28, 28)}, {(BATCH, latent)}, {(BATCH, latent)}")


def forward_on(run, kind, x, c):
    """(x_hat, mu, logvar) of a model of ``kind`` on ``x`` (and ``c``)."""
    [outputs] = run(probe_forwards, kind=kind.name, batches=[(x, c)], weights_seed=seeded(0))
    return outputs


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_x_hat_is_one_bernoulli_probability_per_pixel(run, request, kind):
    """The decoder ends in a Sigmoid: every x_hat_i lies in [0, 1], the p(x|z) of eq. (1)."""
    rests_on(request, trained(kind.name))
    x_hat, _, _ = forward_on(run, kind, images(16, 3), classes(16, 4))
    low, high = x_hat.min().item(), x_hat.max().item()
    assert 0 <= low and high <= 1, f"{kind}'s x_hat spans [{low:.4g}, {high:.4g}], not [0, 1]"


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_encoder_gives_mu_of_either_sign_and_logvar_below_zero(run, request, kind):
    """The heads are plain Linear layers: mu is any real number and so is logvar = log sigma^2,
    negative where sigma < 1 (nothing after the heads, no ReLU, no BatchNorm)."""
    rests_on(request, trained(kind.name))
    _, mu, logvar = forward_on(run, kind, images(16, 5), classes(16, 6))
    spans = {name: (value.min().item(), value.max().item()) for name, value in (("mu", mu), ("logvar", logvar))}
    if not spans["mu"][0] < 0 < spans["mu"][1] or not spans["logvar"][0] < 0:
        pytest.fail(f"{kind}'s encoder gave mu in [{spans['mu'][0]:.4g}, {spans['mu'][1]:.4g}] and logvar in "
                    f"[{spans['logvar'][0]:.4g}, {spans['logvar'][1]:.4g}] on 16 random images: mu must take "
                    "either sign and logvar go below 0; the heads must be Linear(H, Z) with nothing after "
                    "them", pytrace=False)


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_encoder_encodes_each_image_on_its_own(run, request, kind):
    """q(z|x) is a function of x (and c) alone: an image's mu and logvar do not depend on the
    other images of its batch (no BatchNorm)."""
    rests_on(request, trained(kind.name))
    x, c = images(6, 7), classes(6, 8)
    alone = (torch.cat([x[:1], images(5, 9)]), torch.cat([c[:1], classes(5, 10)]))
    (_, *together), (_, *first_alone) = run(probe_forwards, kind=kind.name, batches=[(x, c), alone],
                                            weights_seed=seeded(0))
    for name, in_batch, apart in zip(("mu", "logvar"), together, first_alone):
        assert_close(f"{kind}'s {name} of an image, encoded again among other images", in_batch[0], apart[0],
                     rtol=1e-4, atol=1e-5)


@weight(2)
@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_forward_decodes_z_drawn_by_reparametrize(run, request, kind):
    """x_hat = decoder(z) with z = mu + sigma eps (eq. (2)); the CVAE's decoder reads [z, c]
    (eq. (5)). Seen under one seed: x_hat equals the decoder on the z drawn from forward's mu,
    logvar and the same eps, and another z gives other images."""
    rests_on(request, test_reparametrize_is_mu_plus_sigma_times_one_standard_normal_draw_of_mu_shape,
             trained(kind.name))
    answer = run(probe_forward_then_decoder, kind=kind.name, x=images(BATCH, 11), c=classes(BATCH, 12),
                 weights_seed=seeded(0), draw_seed=seeded(13))
    label = "decoder([z, c])" if kind.conditional else "decoder(z)"
    assert_close(f"{kind}'s x_hat = {label}, z of eq. (2)", per_image(answer["forward"][0]),
                 per_image(answer["decoded"]), rtol=1e-4, atol=1e-6)
    moved = (per_image(answer["decoded_elsewhere"]) - per_image(answer["decoded"])).abs().max().item()
    assert moved > 1e-4, f"{kind}'s decoder gives the same images for z and z + 1: it ignores z"


def test_cvae_encoder_reads_the_class(run, request):
    """eq. (5): q(z|x, c) sees [flatten(x), c], so the same image gets another mu with another class."""
    rests_on(request, trained("CVAE"))
    x, c = images(BATCH, 14), classes(BATCH, 15)
    (_, mu, _), (_, mu_other, _) = run(probe_forwards, kind="CVAE", batches=[(x, c), (x, c.roll(1, dims=1))],
                                       weights_seed=seeded(0))
    assert not torch.allclose(mu, mu_other), "CVAE's mu is the same whatever the class: the encoder ignores c"


def test_cvae_decoder_draws_a_different_image_for_each_class_from_one_code(run, request):
    """eq. (5): p(x|z, c) reads [z, c]; the notebook decodes one code with each of the 10 classes."""
    rests_on(request, trained("CVAE"))
    z = torch.randn(1, LATENT, generator=generator(29)).expand(CLASSES, LATENT)
    generated = run(probe_decoder, kind="CVAE", codes=torch.cat([z, torch.eye(CLASSES)], dim=1),
                    weights_seed=seeded(0))["generated"]
    digits = per_image(generated)
    spread = (digits - digits.mean(dim=0)).abs().max().item()
    assert spread > 1e-4, f"CVAE's decoder gives one image for all 10 classes (spread {spread:.3g})"


# ---- reparametrize, eq. (2)


@weight(8)
def test_reparametrize_is_mu_plus_sigma_times_one_standard_normal_draw_of_mu_shape(run):
    """eq. (2): z = mu + exp(logvar / 2) eps with eps ~ N(0, I) of mu's shape, drawn once: under
    one seed it equals Normal(mu, sigma).rsample(), as the notebook's check says."""
    mu, logvar = latent_statistics(5, seed=16)
    z = run(probe_reparametrize, mu=mu, logvar=logvar, seed=seeded(17))
    torch.manual_seed(seeded(17))
    expected = Normal(mu, torch.exp(0.5 * logvar)).rsample()
    assert_close("eq. (2) z = mu + sigma eps (eps drawn once, of mu's shape)", z, expected)


@weight(4)
def test_reparametrize_draws_with_mean_mu_and_variance_exp_logvar(run):
    """eq. (2): z ~ N(mu, diag exp(logvar)), seen in the moments of many draws."""
    draws = 200_000
    mu = torch.tensor([1.0, -2.0]).expand(draws, 2)
    variance = torch.tensor([0.25, 4.0])
    z = run(probe_reparametrize, mu=mu, logvar=variance.log().expand(draws, 2), seed=seeded(18))
    assert_close("eq. (2) sample mean of z", z.mean(dim=0), mu[0], rtol=0, atol=0.02)
    assert_close("eq. (2) sample variance of z", z.var(dim=0), variance, rtol=0.02, atol=0)


@weight(4)
def test_reparametrize_passes_gradients_to_mu_and_logvar(run):
    """The trick's point: dz/dmu = 1 and dz/dlogvar = sigma eps / 2."""
    mu, logvar = latent_statistics(6, seed=19)
    answer = run(probe_reparametrize_gradients, mu=mu, logvar=logvar, seed=seeded(20))
    assert answer["in_graph"], "reparametrize's z is cut from the graph: no gradient reaches the encoder"
    torch.manual_seed(seeded(20))
    eps = torch.randn_like(mu)
    assert_close("dz/dmu", answer["mu"], torch.ones_like(mu))
    assert_close("dz/dlogvar = sigma eps / 2", answer["logvar"], 0.5 * torch.exp(0.5 * logvar) * eps)


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


@weight(8)
def test_loss_reconstruction_term_is_bce_summed_over_pixels_and_averaged_over_the_batch(run):
    """eq. (4)'s first term with a posterior equal to the prior (KL = 0):
    -sum_i [x_i log x_hat_i + (1 - x_i) log(1 - x_hat_i)] per image, averaged over the N images."""
    x_hat, x = reconstructions(3, seed=21)
    zeros = torch.zeros(3, LATENT)
    [loss] = run(probe_losses, cases=[(x_hat, x, zeros, zeros)])
    assert_close("eq. (4) BCE summed over pixels / N (with KL = 0)", loss, negative_elbo(x_hat, x, zeros, zeros))


@weight(8)
def test_loss_kl_term_is_eq_3_summed_over_latent_dimensions_and_averaged_over_the_batch(run):
    """eq. (3): KL = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)) per image, averaged over the
    N images; seen as the loss minus the loss of the same images with the prior as posterior."""
    x_hat, x = reconstructions(3, seed=23)
    mu, logvar = latent_statistics(3, seed=25)
    zeros = torch.zeros_like(mu)
    loss, prior_loss = run(probe_losses, cases=[(x_hat, x, mu, logvar), (x_hat, x, zeros, zeros)])
    expected = negative_elbo(x_hat, x, mu, logvar) - negative_elbo(x_hat, x, zeros, zeros)
    assert_close("eq. (3) KL summed over latent dimensions / N", loss.double() - prior_loss, expected,
                 rtol=1e-4, atol=1e-3)


@weight(4)
@pytest.mark.parametrize("batch", [1, BATCH])
def test_loss_function_is_the_negative_elbo_of_eq_4(run, batch):
    """eq. (4): the notebook's check, BCE plus KL of every image, divided by the batch size N."""
    x_hat, x = reconstructions(batch, seed=26)
    mu, logvar = latent_statistics(batch, seed=28)
    [loss] = run(probe_losses, cases=[(x_hat, x, mu, logvar)])
    assert_close(f"eq. (4) negative ELBO (N={batch})", loss, negative_elbo(x_hat, x, mu, logvar))


# ---- the notebook's generation and training cells


def prior_codes(kind):
    """The notebook's codes: 10 draws of z ~ N(0, I), with the one-hot digits 0-9 for the CVAE."""
    return kind.decoder_input(torch.randn(CLASSES, LATENT, generator=generator(30)), torch.eye(CLASSES))


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_decoder_turns_codes_from_the_prior_into_images_that_show_images_draws(run, request, kind):
    """The notebook's generation cells: model.decoder(z) gives 10 images of 784 pixels in [0, 1],
    which show_images lays out in a 4 x 3 grid."""
    rests_on(request, trained(kind.name))
    answer = run(probe_decoder, kind=kind.name, codes=prior_codes(kind), weights_seed=seeded(0))
    generated = answer["generated"]
    assert per_image(generated).shape == (CLASSES, INPUT_SIZE), (
        f"{kind}'s decoder gave shape {tuple(generated.shape)} for 10 codes; expected 10 images of 784 pixels")
    assert 0 <= generated.min().item() and generated.max().item() <= 1, "the decoded images are not in [0, 1]"
    assert tuple(answer["grid"]) == (3 * 30 + 2, 4 * 30 + 2)


def binary_images(batch, seed):
    """Images of 0s and 1s, about a fifth of them 1, as MNIST's strokes, fixed by ``seed``."""
    return (images(batch, seed) < 0.2).float()


@weight(8)
@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_train_vae_lowers_the_negative_elbo_of_held_out_images(run, request, kind):
    """The notebook's training cells: train_vae(epoch, model, loader, cond) runs Adam on
    loss_function. Eight epochs of one batch of 16 images lower eq. (4)'s negative ELBO, computed
    here from the model's x_hat, mu and logvar, on 16 other images of the same kind, by more than
    round-off: the model learns through its parameters, whatever losses it reports. A model is a
    VAE's when its latent is drawn by eq. (2): this rests on reparametrize."""
    rests_on(request, test_reparametrize_is_mu_plus_sigma_times_one_standard_normal_draw_of_mu_shape)
    held_out, held_out_labels = binary_images(16, 34), torch.randint(0, CLASSES, (16,), generator=generator(35))
    answer = run(probe_training, kind=kind.name, batch=binary_images(16, 32),
                 labels=torch.randint(0, CLASSES, (16,), generator=generator(33)), held_out=held_out,
                 held_out_labels=held_out_labels, weights_seed=seeded(0), seed=seeded(31), epochs=8)
    before, after = (negative_elbo_of(kind, answer[when], held_out) for when in ("before", "after"))
    assert after < 0.97 * before, (
        f"{kind}'s negative ELBO (eq. (4)) of 16 held-out images went from {before:.4g} to {after:.4g} over eight "
        "epochs of train_vae: the model does not learn")


def negative_elbo_of(kind, outputs, x):
    """eq. (4) on a model's (x_hat, mu, logvar) for the images ``x``, failing in one line where
    they are not shaped as forward's."""
    x_hat, mu, logvar = outputs
    if per_image(x_hat).shape != per_image(x).shape or mu.shape != logvar.shape or len(mu) != len(x):
        pytest.fail(f"{kind}'s forward gave x_hat, mu, logvar of shapes {tuple(x_hat.shape)}, {tuple(mu.shape)}, "
                    f"{tuple(logvar.shape)} for {len(x)} images", pytrace=False)
    return negative_elbo(per_image(x_hat).clamp(0, 1), per_image(x), mu, logvar).item()
