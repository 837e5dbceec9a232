"""Codec benchmark: compression ratio, encode/decode throughput and error of every wire codec on real tensors
(an image batch, a real discriminator gradient, a label batch)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from asyndgan import codec
from asyndgan.algorithm import SiteTrainer, TrainConfig
from asyndgan.data import load_site
from asyndgan.experiments.timing import best_of
from asyndgan.nets import NetConfig

__all__ = ["CODECS", "LABEL_CODECS", "bench_codecs", "real_payloads"]

CODECS = ["f32", "f32+zstd", "f32+lz4", "bf16", "bf16+zstd", "bf16+lz4", "f16", "f16+zstd"]
LABEL_CODECS = ["u8", "u8+zstd", "u8+lz4"]


def real_payloads(size: int, batch: int) -> dict[str, torch.Tensor]:
    """An image batch, a real discriminator gradient w.r.t. a generator output, and a label batch."""
    data = load_site(f"embedded:icbm152?site=0&of=3&size={size}")
    trainer = SiteTrainer(data, NetConfig(), TrainConfig(), batch_size=batch, seed=1)
    b = trainer.next_batch()
    fake = (b.real + 0.3 * torch.randn_like(b.real)).clamp(-1, 1)  # an imperfect generator output
    grad = trainer.step(b, fake, ["t1"])
    return {"image": b.real, "gradient": grad, "labels": b.labels}


def _row(name: str, spec: str, raw: int, enc: float, dec: float, ratio: float, err: float) -> dict[str, Any]:
    return {
        "tensor": name,
        "codec": spec,
        "ratio": ratio,
        "encode_GBps": raw / enc / 1e9,
        "decode_GBps": raw / dec / 1e9,
        "rel_l2_error": err,
    }


def bench_codecs(size: int, batch: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for name, x in real_payloads(size, batch).items():
        raw = x.numel() * (1 if x.dtype == torch.uint8 else 4)
        memcpy = best_of(functools.partial(np.copy, x.numpy()), repeat)
        rows.append(_row(name, "memcpy", raw, memcpy, memcpy, 1.0, 0.0))
        for spec in LABEL_CODECS if x.dtype == torch.uint8 else CODECS:
            msg = codec.encode(x, spec)
            enc = best_of(functools.partial(codec.encode, x, spec), repeat)
            dec = best_of(functools.partial(codec.decode, msg), repeat)
            y = codec.decode(msg)
            err = float(torch.linalg.vector_norm(y.float() - x.float()) / torch.linalg.vector_norm(x.float()))
            rows.append(_row(name, spec, raw, enc, dec, raw / codec.wire_nbytes(msg), err))
    return rows
