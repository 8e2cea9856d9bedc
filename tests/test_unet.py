"""The noise-prediction U-Net: the course starter's network, its shapes, time conditioning and
argument checks.

``fixtures/starter_unet_*`` were made by the starter's own ``unet.py`` (see the shared starter
README): its state_dict, an input and its output for dim 8, dim_mults (1, 2), and every key and
shape for that size and for the handout's dim 16, dim_mults (1, 2, 4, 8).
"""

import io
import json
import pickle
from pathlib import Path

import pytest
import torch

import unet
from unet import Unet, group_norm

FIXTURES = Path(__file__).parent / "fixtures"
STARTER_SHAPES = json.loads((FIXTURES / "starter_unet_shapes.json").read_text())
STARTER_CLASSES = {"Residual", "PreNorm", "LayerNorm", "WeightStandardizedConv2d", "SinusoidalPosEmb",
                   "Block", "ResnetBlock", "LinearAttention", "Attention", "Unet"}


def unet_for(config):
    return Unet(config["dim"], dim_mults=tuple(config["dim_mults"]))


class RecordingUnpickler(pickle.Unpickler):
    """Records every (module, name) a pickle asks for: what a reader must be able to import."""

    def __init__(self, data):
        super().__init__(io.BytesIO(data))
        self.classes = set()

    def find_class(self, module, name):
        self.classes.add((module, name))
        return super().find_class(module, name)


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return Unet(8, dim_mults=(1, 2)).eval()


def test_unet_with_the_starters_weights_gives_the_starters_output():
    starter = torch.load(FIXTURES / "starter_unet_dim8_mults12.pt", weights_only=True)
    model = unet_for(starter["config"]).eval()
    model.load_state_dict(starter["state_dict"], strict=True)
    with torch.no_grad():
        output = model(starter["x"], starter["time"])
    relative_error = (output - starter["output"]).norm() / starter["output"].norm()
    assert relative_error < 1e-5


@pytest.mark.parametrize("size", ["dim8_mults12", "dim16_mults1248"])
def test_unet_state_dict_has_the_starters_keys_shapes_and_order(size):
    expected = STARTER_SHAPES[size]
    shapes = [(key, list(value.shape)) for key, value in unet_for(expected["config"]).state_dict().items()]
    assert shapes == list(expected["state_dict_shapes"].items())


def test_handout_unet_has_the_starters_2465827_parameters_in_276_entries():
    model = Unet(16)  # the handout's configuration: dim 16, dim_mults (1, 2, 4, 8)
    assert sum(p.numel() for p in model.parameters()) == 2_465_827
    assert len(model.state_dict()) == 276


def test_unet_pickles_under_the_starters_class_names_in_module_unet(tiny_unet):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 9])
    unpickler = RecordingUnpickler(pickle.dumps(tiny_unet))
    restored = unpickler.load()
    assert {name for module, name in unpickler.classes if module == "unet"} == STARTER_CLASSES
    with torch.no_grad():
        assert torch.equal(restored(x, t), tiny_unet(x, t))


def test_unet_runs_with_only_the_attributes_a_starter_pickle_carries(tiny_unet):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 9])
    with torch.no_grad():
        expected = tiny_unet(x, t)
    del tiny_unet.dim, tiny_unet.dim_mults  # ours, for the trainer; the starter's Unet has neither
    restored = pickle.loads(pickle.dumps(tiny_unet))
    with torch.no_grad():
        assert torch.equal(restored(x, t), expected)


def test_unet_maps_a_batch_of_32x32_images_and_steps_to_noise_of_the_same_shape():
    model = Unet(16)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 49])
    assert model(x, t).shape == (2, 3, 32, 32)


def test_a_cpu_forward_runs_channels_last_and_returns_channels_first_noise():
    torch.manual_seed(0)
    model, seen = Unet(16).eval(), []
    model.downs[1][0].block1.proj.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        noise = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 49]))
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert noise.is_contiguous()  # a student's .view() of it works


@pytest.mark.parametrize("side, channels, requires_grad", [
    (16, 16, False),  # through a channels-first copy: few channels a group, few pixels
    (32, 16, False),  # in place: 1,024 pixels
    (8, 64, False),  # in place: 8 channels a group
    (32, 16, True),  # through a copy: a backward pass follows
])
def test_group_norm_gives_the_group_norm_in_the_layout_it_was_given(side, channels, requires_grad):
    norm = torch.nn.GroupNorm(8, channels)
    x = torch.randn(4, channels, side, side).contiguous(memory_format=torch.channels_last)
    normalised = group_norm(norm, x.requires_grad_(requires_grad))
    assert normalised.is_contiguous(memory_format=torch.channels_last) and not normalised.is_contiguous()
    torch.testing.assert_close(normalised, norm(x.contiguous()))
    channels_first = torch.randn(4, channels, side, side)
    assert group_norm(norm, channels_first).is_contiguous()


def linear_attention_as_specified(attention, x):
    """LinearAttention as the starter writes it: q softmaxed over each head's features, k over
    the pixels, q * dim_head^-0.5, v / pixels, context = k v^T, out = context^T q, to_out."""
    batch, channels, height, width = x.shape
    heads = attention.heads
    q, k, v = (part.reshape(batch, heads, -1, height * width)
               for part in attention.to_qkv(x).chunk(3, dim=1))
    q, k = q.softmax(dim=-2) * attention.scale, k.softmax(dim=-1)
    context = torch.einsum("bhdn,bhen->bhde", k, v / (height * width))
    out = torch.einsum("bhde,bhdn->bhen", context, q)
    return attention.to_out(out.reshape(batch, -1, height, width))


@pytest.mark.parametrize("fused", [True, False], ids=["fused softmax", "matmuls"])
def test_linear_attention_is_the_starters_arithmetic_either_way_it_softmaxes(fused, monkeypatch):
    torch.manual_seed(0)
    attention = unet.LinearAttention(16)
    x = torch.randn(3, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    expected = linear_attention_as_specified(attention, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, attention.to_qkv.weight))
    monkeypatch.setattr(unet, "fused_softmax_pays", lambda x: fused)
    output = attention(x)
    torch.testing.assert_close(output, expected)
    grads = torch.autograd.grad(output.square().sum(), (x, attention.to_qkv.weight))
    torch.testing.assert_close(grads, expected_grads)


def test_unet_output_depends_on_the_time_step(tiny_unet):
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(tiny_unet(x, torch.tensor([1])), tiny_unet(x, torch.tensor([40])))


def test_unet_honours_out_dim_and_channels():
    model = Unet(8, dim_mults=(1, 2), channels=1, out_dim=2)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).shape == (2, 2, 8, 8)


def test_unet_accepts_a_first_width_other_than_dim():
    model = Unet(8, init_dim=16, dim_mults=(1, 2))
    assert model.init_conv.out_channels == 16 and model.downs[0][0].block1.proj.in_channels == 16
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([3, 4])).shape == (2, 3, 8, 8)


def test_unet_skip_connections_carry_gradients_to_every_parameter():
    model = Unet(8, dim_mults=(1, 2, 2))
    model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_unet_rejects_an_image_size_that_cannot_be_halved_often_enough():
    model = Unet(8, dim_mults=(1, 2, 4, 8))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 3, 12, 12), torch.tensor([0]))


def test_unet_rejects_widths_that_the_group_norm_cannot_split():
    with pytest.raises(ValueError, match="resnet_block_groups"):
        Unet(12, resnet_block_groups=8)
