"""Networks (pix2pix family), built by name from a small registry, and GAN losses.

Generators map a one-hot label map (``cond_channels``) to ``out_channels`` images in [-1, 1] (Tanh).
Discriminators are 70x70-style PatchGANs over ``cond + image`` channels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DISCRIMINATORS",
    "GENERATORS",
    "NetConfig",
    "build_discriminator",
    "build_generator",
    "gan_loss",
    "init_weights",
    "one_hot",
    "resolve_generator",
    "style_condition",
]


@dataclass(frozen=True)
class NetConfig:
    """Architecture choice shared by the generator and every site."""

    generator: str = "auto"  # "auto": the U-Net whose depth fits the image size
    discriminator: str = "patchgan_3"
    ngf: int = 32
    ndf: int = 32
    norm: str = "instance"
    gan_mode: str = "vanilla"

    def validate(self) -> None:
        if self.generator != "auto" and self.generator not in GENERATORS:
            raise ValueError(f"unknown generator {self.generator!r}; choose one of {sorted(GENERATORS)}")
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(f"unknown discriminator {self.discriminator!r}; choose one of {sorted(DISCRIMINATORS)}")
        if self.norm not in _NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {sorted(_NORMS)}")
        if self.gan_mode not in ("vanilla", "lsgan"):
            raise ValueError(f"unknown gan_mode {self.gan_mode!r}; choose 'vanilla' or 'lsgan'")
        if self.ngf < 1 or self.ndf < 1:
            raise ValueError("ngf and ndf must be positive")


_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "instance": functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False),
    "batch": functools.partial(nn.BatchNorm2d, affine=True),
    "none": lambda _c: nn.Identity(),
}


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, K, H, W) float32 one-hot condition."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def style_condition(cond: torch.Tensor, styles: torch.Tensor, num_styles: int) -> torch.Tensor:
    """Append ``num_styles`` constant planes to the (B, K, H, W) condition: one-hot of each row's style
    (``styles``: (B,) indices in [0, num_styles), the site whose scanner G renders)."""
    planes = F.one_hot(styles.long().to(cond.device), num_styles).to(cond.dtype)
    return torch.cat([cond, planes[:, :, None, None].expand(-1, -1, *cond.shape[2:])], 1)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: Callable[[int], nn.Module], use_bias: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=use_bias),
            norm(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=use_bias),
            norm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """pix2pix/CycleGAN ResNet generator: c7s1, two stride-2 downs, n blocks, two ups, c7s1 + Tanh."""

    def __init__(self, in_ch: int, out_ch: int, ngf: int, norm: str, n_blocks: int) -> None:
        super().__init__()
        nl = _NORMS[norm]
        use_bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_ch, ngf, 7, bias=use_bias),
            nl(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                nl(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4, nl, use_bias) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=use_bias
                ),
                nl(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetBlock(nn.Module):
    """One level of the pix2pix U-Net: down -> submodule -> up, with a skip connection."""

    def __init__(
        self,
        outer: int,
        inner: int,
        in_ch: int | None,
        sub: nn.Module | None,
        norm: Callable[[int], nn.Module],
        use_bias: bool,
        outermost: bool = False,
        out_ch: int | None = None,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        down_conv = nn.Conv2d(in_ch or outer, inner, 4, stride=2, padding=1, bias=use_bias)
        if outermost:
            up_conv = nn.ConvTranspose2d(inner * 2, out_ch or outer, 4, stride=2, padding=1)
            layers: list[nn.Module] = [down_conv, sub or nn.Identity(), nn.ReLU(True), up_conv, nn.Tanh()]
        elif sub is None:  # innermost: no norm on the 1x1 bottleneck
            up_conv = nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=use_bias)
            layers = [nn.LeakyReLU(0.2, True), down_conv, nn.ReLU(True), up_conv, norm(outer)]
        else:
            up_conv = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1, bias=use_bias)
            layers = [
                nn.LeakyReLU(0.2, True),
                down_conv,
                norm(inner),
                sub,
                nn.ReLU(True),
                up_conv,
                norm(outer),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class UnetGenerator(nn.Module):
    """pix2pix U-Net with ``num_downs`` halvings (input side must be divisible by 2**num_downs)."""

    def __init__(self, in_ch: int, out_ch: int, ngf: int, norm: str, num_downs: int) -> None:
        super().__init__()
        nl = _NORMS[norm]
        use_bias = norm != "batch"
        block = UnetBlock(ngf * 8, ngf * 8, None, None, nl, use_bias)
        for _ in range(num_downs - 5):
            block = UnetBlock(ngf * 8, ngf * 8, None, block, nl, use_bias)
        block = UnetBlock(ngf * 4, ngf * 8, None, block, nl, use_bias)
        block = UnetBlock(ngf * 2, ngf * 4, None, block, nl, use_bias)
        block = UnetBlock(ngf, ngf * 2, None, block, nl, use_bias)
        self.model = UnetBlock(ngf, ngf, in_ch, block, nl, use_bias, outermost=True, out_ch=out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 convs; n_layers=3 gives the 70x70 receptive field."""

    def __init__(self, in_ch: int, ndf: int, norm: str, n_layers: int) -> None:
        super().__init__()
        nl = _NORMS[norm]
        use_bias = norm != "batch"
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=use_bias),
                nl(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=use_bias),
            nl(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


GeneratorFactory = Callable[[int, int, int, str], nn.Module]

GENERATORS: dict[str, GeneratorFactory] = {
    "resnet_9blocks": lambda i, o, f, n: ResnetGenerator(i, o, f, n, 9),
    "resnet_6blocks": lambda i, o, f, n: ResnetGenerator(i, o, f, n, 6),
    "resnet_3blocks": lambda i, o, f, n: ResnetGenerator(i, o, f, n, 3),
    "unet_32": lambda i, o, f, n: UnetGenerator(i, o, f, n, 5),
    "unet_64": lambda i, o, f, n: UnetGenerator(i, o, f, n, 6),
    "unet_128": lambda i, o, f, n: UnetGenerator(i, o, f, n, 7),
    "unet_256": lambda i, o, f, n: UnetGenerator(i, o, f, n, 8),
}

DISCRIMINATORS: dict[str, Callable[[int, int, str], nn.Module]] = {
    "patchgan_1": lambda i, f, n: PatchDiscriminator(i, f, n, 1),
    "patchgan_2": lambda i, f, n: PatchDiscriminator(i, f, n, 2),
    "patchgan_3": lambda i, f, n: PatchDiscriminator(i, f, n, 3),
}


def init_weights(net: nn.Module, seed: int, gain: float = 0.02) -> nn.Module:
    """pix2pix init: conv weights ~ N(0, gain), affine norm weights ~ N(1, gain), biases 0; seeded."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, gain, generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain, generator=gen)
            nn.init.zeros_(m.bias)
    return net


def resolve_generator(name: str, size: int) -> str:
    """``auto`` -> ``unet_<size>`` for 32/64/128/256 px, else ``resnet_6blocks``; other names unchanged."""
    if name != "auto":
        return name
    return f"unet_{size}" if f"unet_{size}" in GENERATORS else "resnet_6blocks"


def build_generator(cfg: NetConfig, cond_channels: int, out_channels: int, seed: int, size: int = 64) -> nn.Module:
    """Generator ``cfg.generator`` for ``cond_channels`` one-hot classes -> ``out_channels`` modalities."""
    cfg.validate()
    net = GENERATORS[resolve_generator(cfg.generator, size)](cond_channels, out_channels, cfg.ngf, cfg.norm)
    return init_weights(net, seed)


def build_discriminator(cfg: NetConfig, cond_channels: int, image_channels: int, seed: int) -> nn.Module:
    """Discriminator ``cfg.discriminator`` over ``cond_channels + image_channels`` inputs."""
    cfg.validate()
    net = DISCRIMINATORS[cfg.discriminator](cond_channels + image_channels, cfg.ndf, cfg.norm)
    return init_weights(net, seed)


def gan_loss(pred: torch.Tensor, target_is_real: bool, mode: str) -> torch.Tensor:
    """Vanilla (BCE with logits) or LSGAN (MSE) loss against an all-real or all-fake target."""
    target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred, target)
    if mode == "lsgan":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown gan mode {mode!r}")
