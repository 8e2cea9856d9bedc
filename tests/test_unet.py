"""The noise-prediction U-Net: shapes, time conditioning and argument checks."""

import pytest
import torch

from unet import Unet


def test_unet_maps_a_batch_of_32x32_images_and_steps_to_noise_of_the_same_shape():
    model = Unet(16)  # the handout's configuration: dim 16, dim_mults (1, 2, 4, 8)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 49])
    assert model(x, t).shape == (2, 3, 32, 32)


def test_unet_output_depends_on_the_time_step():
    torch.manual_seed(0)
    model = Unet(8, dim_mults=(1, 2))
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([40])))


def test_unet_honours_out_dim_and_channels():
    model = Unet(8, dim_mults=(1, 2), channels=1, out_dim=2)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).shape == (2, 2, 8, 8)


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
