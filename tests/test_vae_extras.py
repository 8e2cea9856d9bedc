"""What only this package's vae.py offers: the notebook's layer layout and arguments checked at
construction. What any correct vae.py does is in A3_PartA/vae_contract.py."""
import pytest
from torch import nn

from vae import CVAE, VAE

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


def test_cvae_encoder_and_decoder_take_the_one_hot_class_as_extra_inputs():
    model = CVAE(INPUT_SIZE, NUM_CLASSES, LATENT_SIZE)
    assert layer_types(model.encoder) == ENCODER_TYPES
    assert layer_types(model.decoder) == DECODER_TYPES
    assert linear_shapes(model.encoder) == expected_encoder_shapes(INPUT_SIZE + NUM_CLASSES, model.hidden_dim)
    assert linear_shapes(model.decoder) == expected_decoder_shapes(LATENT_SIZE + NUM_CLASSES, model.hidden_dim)


@pytest.mark.parametrize("input_size", [0, 783, 28.0])
def test_models_reject_an_input_size_that_is_not_a_square_image(input_size):
    with pytest.raises(ValueError, match="input_size"):
        VAE(input_size)


@pytest.mark.parametrize("name, kwargs", [("latent_size", {"latent_size": 0}), ("num_classes", {"num_classes": -1})])
def test_cvae_rejects_sizes_that_are_not_positive(name, kwargs):
    with pytest.raises(ValueError, match=name):
        CVAE(INPUT_SIZE, **kwargs)
