"""DP-SGD gradients: per-sample gradients (torch.func), per-sample L2 clipping, Gaussian noise.

One call computes, for trainable parameters ``theta`` and examples ``x_1..x_B`` of a Poisson sample,

    g = ( sum_i clip_C( grad_theta loss(f_theta(x_i)) ) + N(0, sigma^2 C^2 I) ) / expected_batch

where ``clip_C`` scales a sample's *whole* gradient (all parameters jointly) to L2 norm at most ``C`` and
``expected_batch = q * n_subjects`` (not the realised batch size, which must stay secret). The model must treat
each example independently (InstanceNorm/GroupNorm/no norm; never BatchNorm): the forward pass runs one example at
a time under ``vmap``, so a layer that mixes examples cannot leak across them here, but one that keeps running
statistics would be updated from private data outside the clipped gradient, and ``vmap`` refuses such in-place
buffer updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from asyndgan.nets import gan_loss

log = logging.getLogger(__name__)

__all__ = [
    "accumulate_grads",
    "check_dp_compatible",
    "clip_per_sample",
    "dp_sgd_gradients",
    "gan_real_loss",
    "per_sample_gradients",
]

_EPS = 1e-6  # as Opacus: scale = C / (norm + 1e-6), so a clipped norm is strictly below C


def gan_real_loss(mode: str = "vanilla") -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample D loss on a real example: the GAN loss against "real", averaged over that sample's patch map."""

    def loss(pred: torch.Tensor) -> torch.Tensor:
        return gan_loss(pred, True, mode)

    return loss


def check_dp_compatible(module: nn.Module) -> None:
    """Raise ``ValueError`` if ``module`` mixes examples or keeps statistics of its inputs (BatchNorm, any norm
    with ``track_running_stats``): those would let private data bypass the per-sample clip."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "track_running_stats", False):
            raise ValueError(
                f"layer {name or type(m).__name__!r} ({type(m).__name__}) is not allowed under DP-SGD: "
                "use InstanceNorm/GroupNorm without running statistics, or no normalisation"
            )


def _check_batch(inputs: tuple[torch.Tensor, ...]) -> int:
    if not inputs:
        raise ValueError("inputs must hold at least one tensor")
    sizes = {int(t.shape[0]) for t in inputs}
    if len(sizes) != 1:
        raise ValueError(f"all inputs need the same batch size (dim 0), got {sorted(sizes)}")
    return sizes.pop()


def per_sample_gradients(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Gradient of ``loss_fn(module(*x_i))`` for each example ``x_i`` w.r.t. every trainable parameter:
    ``{name: (B, *param.shape)}``. Each example is fed with a batch dimension of 1; the module is not changed."""
    check_dp_compatible(module)
    batch = _check_batch(inputs)
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    buffers = dict(module.named_buffers())
    if batch == 0:
        return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}

    def loss_one(p: dict[str, torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, {**p, **frozen, **buffers}, tuple(x.unsqueeze(0) for x in xs))
        return loss_fn(out)

    in_dims = (None,) + (0,) * len(inputs)
    grads: dict[str, torch.Tensor] = vmap(grad(loss_one), in_dims=in_dims, chunk_size=chunk_size)(params, *inputs)
    return grads


def _per_sample_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,) L2 norm of each sample's gradient over all parameters jointly."""
    squares = [g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()]
    return torch.stack(squares, 0).sum(0).sqrt()


def clip_per_sample(t: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each row ``t[i]`` of a (B, ...) tensor to L2 norm at most ``clip`` (rows below it are unchanged)."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norms = t.reshape(t.shape[0], -1).norm(dim=1)
    scale = (clip / (norms + _EPS)).clamp(max=1.0)
    return t * scale.reshape(-1, *([1] * (t.dim() - 1))).to(t.dtype)


def dp_sgd_gradients(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    clip: float,
    sigma: float,
    expected_batch: float,
    generator: torch.Generator,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """DP-SGD gradient ``{name: tensor}`` for every trainable parameter of ``module`` (see the module docstring).

    ``inputs`` are per-example tensors (batch dim 0, possibly empty: then the result is noise only);
    ``module(*inputs_i)`` is called per example, ``loss_fn`` maps that output to a scalar. The noise,
    N(0, (sigma * clip)^2) per coordinate, is drawn from ``generator`` in parameter order. ``sigma=0`` gives the
    clipped, noiseless gradient (tests and ablations only)."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if expected_batch <= 0:
        raise ValueError(f"expected_batch must be > 0, got {expected_batch}")
    grads = per_sample_gradients(module, loss_fn, inputs, chunk_size=chunk_size)
    if not grads:
        return {}
    batch = next(iter(grads.values())).shape[0]
    scale = (clip / (_per_sample_norms(grads) + _EPS)).clamp(max=1.0) if batch else None
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        summed = torch.einsum("b,b...->...", scale.to(g.dtype), g) if scale is not None else g.new_zeros(g.shape[1:])
        if sigma > 0:
            noise = torch.normal(
                0.0,
                sigma * clip,
                size=tuple(summed.shape),
                generator=generator,
                dtype=summed.dtype,
                device=summed.device,
            )
            summed = summed + noise
        out[name] = summed / expected_batch
    return out


def accumulate_grads(module: nn.Module, grads: Mapping[str, torch.Tensor]) -> None:
    """Add ``grads`` into ``param.grad`` of the named parameters (creating it when None), so further unclipped
    terms that use no private data (D's loss on the generator's fakes) can be accumulated with backward()."""
    named = dict(module.named_parameters())
    for name, g in grads.items():
        p = named[name]
        g = g.to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)
