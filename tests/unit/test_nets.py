from __future__ import annotations

import pytest
import torch

from asyndgan.nets import (
    DISCRIMINATORS,
    GENERATORS,
    NetConfig,
    build_discriminator,
    build_generator,
    gan_loss,
    one_hot,
    resolve_generator,
)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_map_labels_to_images(name: str) -> None:
    size = int(name.split("_")[1]) if name.startswith("unet") else 64
    g = build_generator(NetConfig(generator=name, ngf=8), cond_channels=5, out_channels=3, seed=0, size=size)
    x = one_hot(torch.randint(0, 5, (2, size, size)), 5)
    with torch.no_grad():
        y = g(x)
    assert y.shape == (2, 3, size, size)
    assert float(y.abs().max()) <= 1.0  # Tanh


@pytest.mark.parametrize("name", sorted(DISCRIMINATORS))
def test_discriminators_give_patch_logits(name: str) -> None:
    d = build_discriminator(NetConfig(discriminator=name, ndf=8), cond_channels=4, image_channels=2, seed=0)
    out = d(torch.randn(3, 6, 64, 64))
    assert out.shape[0] == 3 and out.shape[1] == 1 and out.shape[2] > 1


def test_init_is_seeded_and_normal() -> None:
    cfg = NetConfig(generator="unet_32", ngf=8)
    a = build_generator(cfg, 4, 1, seed=3, size=32)
    b = build_generator(cfg, 4, 1, seed=3, size=32)
    c = build_generator(cfg, 4, 1, seed=4, size=32)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    conv = next(m for m in a.modules() if isinstance(m, torch.nn.Conv2d))
    assert abs(float(conv.weight.detach().std()) - 0.02) < 0.005


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator(NetConfig(generator="vgg"), 4, 1, 0)
    with pytest.raises(ValueError, match="unknown discriminator"):
        build_discriminator(NetConfig(discriminator="big"), 4, 1, 0)
    with pytest.raises(ValueError, match="unknown norm"):
        NetConfig(norm="group").validate()
    with pytest.raises(ValueError, match="gan_mode"):
        NetConfig(gan_mode="wgan").validate()


def test_auto_generator_follows_size() -> None:
    assert resolve_generator("auto", 64) == "unet_64"
    assert resolve_generator("auto", 128) == "unet_128"
    assert resolve_generator("auto", 96) == "resnet_6blocks"
    assert resolve_generator("resnet_9blocks", 64) == "resnet_9blocks"


def test_gan_losses() -> None:
    logits = torch.tensor([[10.0, -10.0]])
    assert float(gan_loss(torch.full((1, 2), 10.0), True, "vanilla")) < 1e-3
    assert float(gan_loss(torch.full((1, 2), 10.0), False, "vanilla")) > 5
    assert float(gan_loss(torch.ones(1, 2), True, "lsgan")) == 0.0
    assert float(gan_loss(logits, True, "lsgan")) > 0
    with pytest.raises(ValueError):
        gan_loss(logits, True, "hinge")


def test_one_hot() -> None:
    x = one_hot(torch.tensor([[[0, 3], [1, 2]]], dtype=torch.uint8), 4)
    assert x.shape == (1, 4, 2, 2) and x.dtype == torch.float32
    assert torch.equal(x.argmax(1), torch.tensor([[[0, 3], [1, 2]]]))
