"""vae.py: architecture of the VAE and CVAE, the reparametrization trick and the negative ELBO."""
import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

from vae import CVAE, VAE, loss_function, reparametrize

INPUT_SIZE = 784
LATENT_SIZE = 15
NUM_CLASSES = 10


def layer_types(sequential):
    return [type(layer) for layer in sequential]


def linear_shapes(sequential):
    return [(layer.in_features, layer.out_features) for layer in sequential if isinstance(layer, nn.Linear)]


def expected_encoder_shapes(in_features, hidden):
    return [(in_features, hidden), (hidden, hidden), (hidden, hidden)]


def expected_decoder_shapes(in_features, hidden):
    return [(in_features, hidden), (hidden, hidden), (hidden, hidden), (hidden, INPUT_SIZE)]


ENCODER_TYPES = [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
DECODER_TYPES = [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid, nn.Unflatten]


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(4, 1, 28, 28)


@pytest.fixture
def labels_one_hot():
    return torch.eye(NUM_CLASSES)[torch.tensor([3, 1, 4, 1])]


def test_vae_hidden_dim_is_256_or_512():
    assert VAE(INPUT_SIZE, LATENT_SIZE).hidden_dim in (256, 512)


def test_vae_encoder_is_flatten_then_three_linear_relu_layers():
    model = VAE(INPUT_SIZE, LATENT_SIZE)
    assert layer_types(model.encoder) == ENCODER_TYPES
    assert linear_shapes(model.encoder) == expected_encoder_shapes(INPUT_SIZE, model.hidden_dim)


def test_vae_mu_and_logvar_layers_map_hidden_to_latent():
    model = VAE(INPUT_SIZE, LATENT_SIZE)
    for layer in (model.mu_layer, model.logvar_layer):
        assert isinstance(layer, nn.Linear)
        assert (layer.in_features, layer.out_features) == (model.hidden_dim, LATENT_SIZE)


def test_vae_decoder_is_four_linear_layers_then_sigmoid_and_unflatten():
    model = VAE(INPUT_SIZE, LATENT_SIZE)
    assert layer_types(model.decoder) == DECODER_TYPES
    assert linear_shapes(model.decoder) == expected_decoder_shapes(LATENT_SIZE, model.hidden_dim)


def test_vae_forward_returns_image_shaped_probabilities_and_latent_statistics(images):
    x_hat, mu, logvar = VAE(INPUT_SIZE, LATENT_SIZE)(images)
    assert x_hat.shape == (4, 1, 28, 28)
    assert mu.shape == logvar.shape == (4, LATENT_SIZE)
    assert x_hat.min() >= 0 and x_hat.max() <= 1


def test_cvae_encoder_and_decoder_take_the_one_hot_class_as_extra_inputs():
    model = CVAE(INPUT_SIZE, NUM_CLASSES, LATENT_SIZE)
    assert layer_types(model.encoder) == ENCODER_TYPES
    assert layer_types(model.decoder) == DECODER_TYPES
    assert linear_shapes(model.encoder) == expected_encoder_shapes(INPUT_SIZE + NUM_CLASSES, model.hidden_dim)
    assert linear_shapes(model.decoder) == expected_decoder_shapes(LATENT_SIZE + NUM_CLASSES, model.hidden_dim)


def test_cvae_forward_returns_image_shaped_probabilities_and_latent_statistics(images, labels_one_hot):
    x_hat, mu, logvar = CVAE(INPUT_SIZE, NUM_CLASSES, LATENT_SIZE)(images, labels_one_hot)
    assert x_hat.shape == (4, 1, 28, 28)
    assert mu.shape == logvar.shape == (4, LATENT_SIZE)


def test_cvae_output_depends_on_the_class(images, labels_one_hot):
    model = CVAE(INPUT_SIZE, NUM_CLASSES, LATENT_SIZE)
    other_classes = labels_one_hot.roll(1, dims=1)
    torch.manual_seed(1)
    x_hat, mu, _ = model(images, labels_one_hot)
    torch.manual_seed(1)
    x_hat_other, mu_other, _ = model(images, other_classes)
    assert not torch.allclose(mu, mu_other)
    assert not torch.allclose(x_hat, x_hat_other)


def test_cvae_decoder_output_depends_on_the_class_for_a_fixed_latent_code():
    model = CVAE(INPUT_SIZE, NUM_CLASSES, LATENT_SIZE)
    z = torch.randn(1, LATENT_SIZE).expand(NUM_CLASSES, LATENT_SIZE)
    digits = model.decoder(torch.cat([z, torch.eye(NUM_CLASSES)], dim=1))
    assert not torch.allclose(digits[0], digits[1])


@pytest.mark.parametrize("input_size", [0, 783, 28.0])
def test_models_reject_an_input_size_that_is_not_a_square_image(input_size):
    with pytest.raises(ValueError, match="input_size"):
        VAE(input_size)


@pytest.mark.parametrize("name, kwargs", [("latent_size", {"latent_size": 0}), ("num_classes", {"num_classes": -1})])
def test_cvae_rejects_sizes_that_are_not_positive(name, kwargs):
    with pytest.raises(ValueError, match=name):
        CVAE(INPUT_SIZE, **kwargs)


def test_reparametrize_draws_from_the_gaussian_with_mean_mu_and_variance_exp_logvar():
    torch.manual_seed(0)
    mu = torch.full((200_000, 2), 2.0)
    logvar = torch.log(torch.tensor([0.25, 4.0])).expand(200_000, 2)
    z = reparametrize(mu, logvar)
    assert torch.allclose(z.mean(dim=0), torch.tensor([2.0, 2.0]), atol=0.02)
    assert torch.allclose(z.var(dim=0), torch.tensor([0.25, 4.0]), rtol=0.02)


def test_reparametrize_uses_one_randn_like_draw_of_mu_shape():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    torch.manual_seed(7)
    z = reparametrize(mu, logvar)
    torch.manual_seed(7)
    expected = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    assert torch.equal(z, expected)


def test_reparametrize_passes_gradients_to_mu_and_logvar():
    mu = torch.randn(6, 4, requires_grad=True)
    logvar = torch.randn(6, 4, requires_grad=True)
    torch.manual_seed(3)
    reparametrize(mu, logvar).sum().backward()
    torch.manual_seed(3)
    eps = torch.randn(6, 4)
    assert torch.allclose(mu.grad, torch.ones(6, 4))
    assert torch.allclose(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def negative_elbo_from_distributions(x_hat, x, mu, logvar):
    """Bernoulli negative log-likelihood plus Normal KL, per sample, independent of vae.py."""
    reconstruction = -Bernoulli(probs=x_hat, validate_args=False).log_prob(x).sum()
    posterior = Normal(mu, torch.exp(0.5 * logvar))
    kl = kl_divergence(posterior, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum()
    return (reconstruction + kl) / x.shape[0]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loss_function_matches_bernoulli_log_prob_and_normal_kl(batch_size):
    torch.manual_seed(batch_size)
    x = torch.rand(batch_size, 1, 28, 28)
    x_hat = torch.rand(batch_size, 1, 28, 28).clamp(0.01, 0.99)
    mu, logvar = torch.randn(batch_size, LATENT_SIZE), torch.randn(batch_size, LATENT_SIZE)
    loss = loss_function(x_hat, x, mu, logvar)
    assert loss.shape == ()
    assert torch.allclose(loss, negative_elbo_from_distributions(x_hat, x, mu, logvar), rtol=1e-5)


def test_loss_function_is_a_per_sample_mean_over_the_batch():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 28, 28)
    x_hat = torch.rand(1, 1, 28, 28).clamp(0.01, 0.99)
    mu, logvar = torch.randn(1, LATENT_SIZE), torch.randn(1, LATENT_SIZE)
    single = loss_function(x_hat, x, mu, logvar)
    repeated = loss_function(*(torch.cat([tensor] * 5) for tensor in (x_hat, x, mu, logvar)))
    assert torch.allclose(single, repeated)


def test_loss_function_kl_term_vanishes_for_the_standard_normal_posterior():
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    x_hat = torch.full((2, 1, 28, 28), 0.3)
    zeros = torch.zeros(2, LATENT_SIZE)
    expected_bce = -(x * torch.log(x_hat) + (1 - x) * torch.log(1 - x_hat)).sum() / 2
    assert torch.allclose(loss_function(x_hat, x, zeros, zeros), expected_bce)
