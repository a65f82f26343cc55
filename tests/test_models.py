"""Shape, input-handling and rebuild contracts of b2kd.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from b2kd.models import (
    Classifier,
    Discriminator,
    Generator,
    available_models,
    build_model,
    count_parameters,
    quantize_uint8,
    to_unit,
)

ARCHS = available_models()
CHEAP_ARCHS = ["cnn_small", "lenet5", "resnet8"]


def _uint8_images(n: int, channels: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)


def test_zoo_is_complete() -> None:
    expected = {f"resnet{d}" for d in (8, 20, 32, 56, 110)}
    expected |= {f"vgg{d}{bn}" for d in (11, 13, 19) for bn in ("", "_bn")}
    expected |= {"mobilenet", "lenet5", "cnn_small"}
    assert expected <= set(ARCHS)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape(arch: str, image_size: int, in_channels: int) -> None:
    model = build_model(arch, num_classes=7, in_channels=in_channels, image_size=image_size)
    assert isinstance(model, Classifier)
    with torch.no_grad():
        logits = model.eval()(torch.rand(2, in_channels, image_size, image_size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_64px(arch: str) -> None:
    model = build_model(arch, num_classes=5, in_channels=3, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("arch", CHEAP_ARCHS)
def test_uint8_input_equals_float_input_over_255(arch: str) -> None:
    model = build_model(arch, in_channels=3, image_size=28).eval()
    images = _uint8_images(3, 3, 28)
    with torch.no_grad():
        from_bytes = model(images)
        from_floats = model(images.float() / 255)
    assert torch.equal(from_bytes, from_floats)


@pytest.mark.parametrize("arch", CHEAP_ARCHS)
def test_channels_last_input(arch: str) -> None:
    model = build_model(arch, in_channels=3, image_size=32).eval()
    images = _uint8_images(2, 3, 32)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        got = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_normalisation_buffers_are_saved() -> None:
    model = build_model("resnet8", in_channels=3)
    state = model.state_dict()
    assert torch.equal(state["mean"], torch.full((1, 3, 1, 1), 0.5))
    assert torch.equal(state["std"], torch.full((1, 3, 1, 1), 0.5))
    assert "mean" not in dict(model.named_parameters())


def test_custom_normalisation_is_applied_and_recorded() -> None:
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    model = build_model("lenet5", in_channels=3, mean=mean, std=std).eval()
    assert torch.allclose(model.mean.flatten(), torch.tensor(mean))
    assert model.config["mean"] == mean
    # The network sees (x - mean) / std: feeding mean gives the logits of zeros.
    x = torch.tensor(mean).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.features_logits(torch.zeros(1, 3, 32, 32)))


def test_wrong_number_of_channel_stats() -> None:
    with pytest.raises(ValueError, match="mean has 3 values but the model has 1 channels"):
        build_model("lenet5", in_channels=1, mean=(0.1, 0.2, 0.3))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_rebuilds_identical_model(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, in_channels=3, image_size=28)
    assert model.arch == arch
    torch.manual_seed(0)
    rebuilt = build_model(**model.config)
    assert rebuilt.config == model.config
    original, copy = model.state_dict(), rebuilt.state_dict()
    assert original.keys() == copy.keys()
    assert all(torch.equal(original[k], copy[k]) for k in original)  # seeded init is reproducible


def test_extra_kwargs_are_recorded() -> None:
    model = build_model("mobilenet", in_channels=3, width_mult=0.5)
    assert model.config["width_mult"] == 0.5
    assert count_parameters(build_model(**model.config)) == count_parameters(model)
    assert count_parameters(model) < count_parameters(build_model("mobilenet", in_channels=3))


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet9'; choose from: .*resnet8"):
        build_model("resnet9")


def test_count_parameters() -> None:
    # ResNet8: 3x3 stem, three basic blocks, two 1x1 shortcuts, BN affine, fc.
    assert count_parameters(build_model("resnet8", num_classes=10, in_channels=3)) == 78_042
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=32)
    assert count_parameters(model) == 61_706  # the classic LeNet-5 figure
    model.classifier.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 6 * 26 + 16 * 151


@pytest.mark.parametrize(("image_size", "channels"), [(28, 1), (32, 3)])
def test_generator_shape_and_range(image_size: int, channels: int) -> None:
    generator = Generator(latent_dim=10, image_size=image_size, channels=channels, widths=(32, 16))
    images = generator(torch.randn(4, 10) * 10)  # large z pushes tanh towards its limits
    assert images.shape == (4, channels, image_size, image_size)
    assert images.min() >= -1 and images.max() <= 1


def test_generator_rejects_size_not_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(latent_dim=10, image_size=30)


def test_generator_uses_default_batchnorm_eps() -> None:
    norms = [m for m in Generator(latent_dim=10).modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3
    assert all(m.eps == 1e-5 for m in norms)


def test_gan_config_rebuilds() -> None:
    generator = Generator(latent_dim=10, image_size=28, widths=(64, 32))
    discriminator = Discriminator(image_size=28, channels=1)
    for net, cls in ((generator, Generator), (discriminator, Discriminator)):
        rebuilt = cls(**net.config)
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}


@pytest.mark.parametrize(("image_size", "channels"), [(28, 1), (32, 3)])
def test_discriminator_returns_raw_logits(image_size: int, channels: int) -> None:
    discriminator = Discriminator(image_size=image_size, channels=channels).eval()
    with torch.no_grad():
        logits = discriminator(torch.rand(3, channels, image_size, image_size) * 2 - 1)
    assert logits.shape == (3, 1)
    assert discriminator.head.in_features == 128 * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2; 32 -> ... -> 2
    assert not any(isinstance(m, nn.Sigmoid) for m in discriminator.modules())


def test_spectral_norm_discriminator_has_unit_norm_layers_and_no_batchnorm() -> None:
    torch.manual_seed(0)
    discriminator = Discriminator(image_size=28, channels=1, spectral_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules())
    discriminator.train()
    for _ in range(30):  # power iterations run in train mode, one per forward
        discriminator(torch.rand(2, 1, 28, 28) * 2 - 1)
    discriminator.eval()
    layers = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == 5
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 0.02
    rebuilt = Discriminator(**discriminator.config)
    assert rebuilt.state_dict().keys() == discriminator.state_dict().keys()


def test_quantize_uint8_exact_values() -> None:
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, -1 + 2 / 255, 1 - 2 / 255, 0.5])
    # 0 -> 127.5 -> 128 (torch.round: half to even); 0.5 -> 191.25 -> 191.
    expected = torch.tensor([0, 255, 128, 0, 255, 1, 254, 191], dtype=torch.uint8)
    assert torch.equal(quantize_uint8(x), expected)
    assert quantize_uint8(x).dtype == torch.uint8


def test_to_unit() -> None:
    assert torch.equal(to_unit(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_generator_bytes_feed_a_classifier() -> None:
    generator = Generator(latent_dim=10, image_size=28).eval()
    model = build_model("cnn_small", image_size=28).eval()
    with torch.no_grad():
        images = generator(torch.randn(2, 10))
        logits_bytes = model(quantize_uint8(images))
        logits_float = model(to_unit(images))
    # Quantisation moves pixels by at most half a grey level.
    assert (quantize_uint8(images).float() / 255 - to_unit(images)).abs().max() <= 0.5 / 255 + 1e-6
    assert logits_bytes.shape == logits_float.shape == (2, 10)
