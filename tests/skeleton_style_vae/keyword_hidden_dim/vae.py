"""A correct vae.py written the way a student fills in the skeleton, unlike A3_PartA/vae.py in:

* ``hidden_dim`` (200) and ``activation`` are extra constructor keywords;
* the VAE flattens with an ``nn.Flatten`` layer, the CVAE with ``torch.flatten`` in ``forward``;
* eps is ``torch.randn(N, Z).to(mu)`` and sigma is ``exp(logvar) ** 0.5``;
* the loss is ``(BCE + KL) / N`` written out by hand for the KL term.

tests/test_vae_contract_is_fair_and_sharp.py checks that the contract passes on it, and makes
its mutants from this text.
"""

import torch
import torch.nn.functional as F
from torch import nn


def hello_vae():
    print("Hello from vae.py!")


def hidden_stack(in_features, hidden_dim, activation):
    return [nn.Linear(in_features, hidden_dim), activation(),
            nn.Linear(hidden_dim, hidden_dim), activation(),
            nn.Linear(hidden_dim, hidden_dim), activation()]


def gaussian_head(hidden_dim, latent_size):
    return nn.Linear(hidden_dim, latent_size)


def pixel_decoder(in_features, hidden_dim, activation):
    return nn.Sequential(*hidden_stack(in_features, hidden_dim, activation),
                         nn.Linear(hidden_dim, 784), nn.Sigmoid(), nn.Unflatten(1, (1, 28, 28)))


class VAE(nn.Module):
    def __init__(self, input_size, latent_size=15, hidden_dim=200, activation=nn.ReLU):
        super().__init__()
        self.input_size = input_size
        self.latent_size = latent_size
        self.hidden_dim = hidden_dim
        self.encoder = nn.Sequential(nn.Flatten(), *hidden_stack(input_size, hidden_dim, activation))
        self.mu_layer = gaussian_head(hidden_dim, latent_size)
        self.logvar_layer = gaussian_head(hidden_dim, latent_size)
        self.decoder = pixel_decoder(latent_size, hidden_dim, activation)

    def forward(self, x):
        h = self.encoder(x)
        mu = self.mu_layer(h)
        logvar = self.logvar_layer(h)
        x_hat = self.decoder(reparametrize(mu, logvar))
        return x_hat, mu, logvar


class CVAE(nn.Module):
    def __init__(self, input_size, num_classes=10, latent_size=15, hidden_dim=200, activation=nn.ReLU):
        super().__init__()
        self.input_size = input_size
        self.latent_size = latent_size
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.encoder = nn.Sequential(*hidden_stack(input_size + num_classes, hidden_dim, activation))
        self.mu_layer = gaussian_head(hidden_dim, latent_size)
        self.logvar_layer = gaussian_head(hidden_dim, latent_size)
        self.decoder = pixel_decoder(latent_size + num_classes, hidden_dim, activation)

    def forward(self, x, c):
        h = self.encoder(torch.cat((torch.flatten(x, start_dim=1), c), dim=1))
        mu = self.mu_layer(h)
        logvar = self.logvar_layer(h)
        z = reparametrize(mu, logvar)
        x_hat = self.decoder(torch.cat((z, c), dim=1))
        return x_hat, mu, logvar


def reparametrize(mu, logvar):
    N, Z = mu.shape
    eps = torch.randn(N, Z).to(mu)
    sigma = torch.exp(logvar) ** 0.5
    return mu + sigma * eps


def loss_function(x_hat, x, mu, logvar):
    N = x.shape[0]
    bce = F.binary_cross_entropy(x_hat, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu * mu - torch.exp(logvar))
    return (bce + kl) / N
