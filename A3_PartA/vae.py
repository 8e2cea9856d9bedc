"""A variational autoencoder (VAE) and a conditional VAE (CVAE) for MNIST digits.

Both models are multilayer perceptrons over flattened 28x28 images. The encoder
maps an image to the mean ``mu`` and log-variance ``logvar`` of a diagonal
Gaussian posterior q(z|x); the decoder maps a latent code z back to one
Bernoulli probability per pixel. Training maximises the evidence lower bound,
eq. (1) of variational_autoencoders.ipynb,

    log p(x) >= E_{q(z|x)}[log p(x|z)] - KL(q(z|x) || N(0, I)),

which ``loss_function`` implements (negated, averaged over the batch), using
``reparametrize`` to draw z so that gradients reach the encoder. Equation
numbers below refer to that notebook.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_DIM = 256


def hello_vae():
    """Print a greeting, to check that vae.py is importable from the notebook."""
    print("Hello from vae.py!")


def _check_positive(name, value):
    """Raise ValueError unless ``value`` is a positive integer."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _square_image_side(input_size):
    """Return the side of the square one-channel image that has ``input_size`` pixels."""
    _check_positive("input_size", input_size)
    side = math.isqrt(input_size)
    if side * side != input_size:
        raise ValueError(
            f"input_size must be the pixel count of a square image (784 for 28x28 MNIST), got {input_size}."
        )
    return side


def _hidden_layers(in_features, hidden_dim):
    """Three Linear+ReLU layers of width ``hidden_dim``, shared by every encoder and decoder."""
    return [
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
    ]


def _encoder(in_features, hidden_dim):
    """Flatten, then the hidden layers.

    Flatten leaves an already flat (N, in_features) input unchanged, so the CVAE
    can feed it the concatenation [flatten(x), c].
    """
    return nn.Sequential(nn.Flatten(), *_hidden_layers(in_features, hidden_dim))


def _decoder(in_features, hidden_dim, image_side):
    """The hidden layers, then one Bernoulli probability per pixel, shaped (N, 1, side, side)."""
    return nn.Sequential(
        *_hidden_layers(in_features, hidden_dim),
        nn.Linear(hidden_dim, image_side * image_side),
        nn.Sigmoid(),
        nn.Unflatten(1, (1, image_side, image_side)),
    )


class VAE(nn.Module):
    """Variational autoencoder with a Gaussian posterior q(z|x) and a Bernoulli decoder p(x|z).

    Args:
        input_size: pixels per image (784 for MNIST).
        latent_size: dimension Z of the latent code z.
    """

    def __init__(self, input_size, latent_size=15):
        super().__init__()
        image_side = _square_image_side(input_size)
        _check_positive("latent_size", latent_size)
        self.input_size = input_size
        self.latent_size = latent_size
        self.hidden_dim = HIDDEN_DIM
        self.encoder = _encoder(input_size, self.hidden_dim)
        self.mu_layer = nn.Linear(self.hidden_dim, latent_size)
        self.logvar_layer = nn.Linear(self.hidden_dim, latent_size)
        self.decoder = _decoder(latent_size, self.hidden_dim, image_side)

    def forward(self, x):
        """Encode x (N, 1, 28, 28), sample z from q(z|x) and decode it.

        Returns:
            x_hat: (N, 1, 28, 28) pixel probabilities of the reconstruction.
            mu: (N, Z) posterior means.
            logvar: (N, Z) posterior log-variances.
        """
        hidden = self.encoder(x)
        mu = self.mu_layer(hidden)
        logvar = self.logvar_layer(hidden)
        x_hat = self.decoder(reparametrize(mu, logvar))
        return x_hat, mu, logvar


class CVAE(nn.Module):
    """Conditional VAE: encoder q(z|x, c) and decoder p(x|z, c) both see the one-hot class c (eq. (5)).

    Args:
        input_size: pixels per image (784 for MNIST).
        num_classes: number of classes C (length of the one-hot vector c).
        latent_size: dimension Z of the latent code z.
    """

    def __init__(self, input_size, num_classes=10, latent_size=15):
        super().__init__()
        image_side = _square_image_side(input_size)
        _check_positive("num_classes", num_classes)
        _check_positive("latent_size", latent_size)
        self.input_size = input_size
        self.num_classes = num_classes
        self.latent_size = latent_size
        self.hidden_dim = HIDDEN_DIM
        self.encoder = _encoder(input_size + num_classes, self.hidden_dim)
        self.mu_layer = nn.Linear(self.hidden_dim, latent_size)
        self.logvar_layer = nn.Linear(self.hidden_dim, latent_size)
        self.decoder = _decoder(latent_size + num_classes, self.hidden_dim, image_side)

    def forward(self, x, c):
        """Encode [flatten(x), c], sample z from q(z|x, c) and decode [z, c].

        Args:
            x: (N, 1, 28, 28) images.
            c: (N, C) one-hot class vectors.

        Returns:
            x_hat (N, 1, 28, 28), mu (N, Z), logvar (N, Z), as in ``VAE.forward``.
        """
        hidden = self.encoder(torch.cat([torch.flatten(x, start_dim=1), c], dim=1))
        mu = self.mu_layer(hidden)
        logvar = self.logvar_layer(hidden)
        z = reparametrize(mu, logvar)
        x_hat = self.decoder(torch.cat([z, c], dim=1))
        return x_hat, mu, logvar


def reparametrize(mu, logvar):
    """Draw z ~ N(mu, exp(logvar)) as a differentiable function of mu and logvar.

    The reparametrization trick, eq. (2): z = mu + sigma * eps with
    sigma = exp(logvar / 2) and eps ~ N(0, I) drawn once with
    ``torch.randn_like(mu)``, so the randomness does not depend on the
    parameters and gradients flow to mu and logvar.
    """
    sigma = torch.exp(0.5 * logvar)
    eps = torch.randn_like(mu)
    return mu + sigma * eps


def loss_function(x_hat, x, mu, logvar):
    """Negative ELBO, eq. (4): reconstruction BCE plus KL(q(z|x) || N(0, I)), averaged over the batch.

    Reconstruction: -log p(x|z) = BCE(x_hat, x) summed over all pixels.
    KL of a diagonal Gaussian from the standard normal, in closed form (eq. (3)):
        KL = -1/2 * sum(1 + logvar - mu^2 - exp(logvar)).
    Both sums run over the whole batch; the total is divided by the batch size N.
    """
    reconstruction = F.binary_cross_entropy(x_hat, x, reduction="sum")
    kl_divergence = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (reconstruction + kl_divergence) / x.shape[0]
