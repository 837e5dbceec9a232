"""Bytes on the wire per step and per epoch for three ways of training the same models: the authors' raw
float32 exchange, this project's default codecs (the real ``StepRequest``/``StepResponse`` messages of a short
real training run, built and read by :mod:`asyndgan.wire`), and FedAvg of G+D."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from asyndgan import codec, wire
from asyndgan.algorithm import Dropped, SiteTrainer, TrainConfig
from asyndgan.data import SiteData
from asyndgan.experiments.datasets import embedded_sites
from asyndgan.generator import GeneratorTrainer
from asyndgan.local import InProcessSites, LocalRun, build_trainers, run_steps
from asyndgan.messages import SiteDescription, StepAnswer, StepWork
from asyndgan.nets import NetConfig, build_discriminator, build_generator, resolve_generator
from asyndgan.services.generator.orchestrator import OrchestratorConfig
from asyndgan.v1 import discriminator_pb2 as pb

__all__ = ["WireSites", "bench_bytes"]

_TENSORS = ("fakes", "grad", "labels")


class WireSites(InProcessSites):
    """In-process sites behind the real messages: per step every site's ``StepRequest`` and ``StepResponse`` are
    built and decoded by :mod:`asyndgan.wire` with the orchestrator's default codecs (the site trains on the
    fakes it received, G on the gradient it received), and their serialized bytes are counted as the generator
    counts them on the wire."""

    def __init__(self, trainers: list[SiteTrainer], gen: GeneratorTrainer, cfg: OrchestratorConfig) -> None:
        # The fakes the sites train on are decoded from real messages already: no second rounding in-process.
        super().__init__(trainers, gen.modalities, codec.LOSSLESS, codec.Codec.parse(cfg.grad_codec))
        self.wire_image_codec = codec.Codec.parse(cfg.image_codec)
        self.gen = gen
        self.label_codec = codec.Codec.parse(cfg.label_codec)
        self.descriptions = [self._describe(j, t) for j, t in enumerate(trainers)]
        self.requests: dict[int, tuple[pb.StepRequest, torch.Tensor]] = {}
        self.counts = dict.fromkeys(("wire", "raw", *(f"{t}_{w}" for t in _TENSORS for w in ("wire", "raw"))), 0)

    @staticmethod
    def _describe(j: int, t: SiteTrainer) -> SiteDescription:
        _, h, w = t.data.labels.shape
        return SiteDescription(f"site-{j}", len(t.data), t.modalities, h, w, t.num_classes, t.sampler.batch_size)

    def _count(self, req: pb.StepRequest, reply: pb.StepResponse, part: torch.Tensor, answer: StepAnswer) -> None:
        c = self.counts
        c["wire"] += req.ByteSize() + reply.ByteSize()
        c["fakes_wire"] += codec.wire_nbytes(req.fakes)
        c["grad_wire"] += codec.wire_nbytes(reply.grad)
        c["labels_wire"] += codec.wire_nbytes(reply.next.labels)
        c["fakes_raw"] += part.numel() * 4
        c["grad_raw"] += answer.grad.numel() * 4
        c["labels_raw"] += answer.next_labels.numel()

    def send(self, j: int, fakes: torch.Tensor) -> None:
        b, d = self.batches[j], self.descriptions[j]
        work = StepWork(b.id, fakes, self.modalities, self.gen.steps, self.grad_codec, self.label_codec)
        req = wire.step_request_to_proto(work, self.wire_image_codec)
        self.requests[j] = (req, fakes)
        super().send(j, wire.step_request_from_proto(req, d).fakes)

    def answer(self, j: int) -> StepAnswer | Dropped:
        req, part = self.requests.pop(j)
        answer = super().answer(j)
        assert isinstance(answer, StepAnswer)  # an in-process site always answers
        reply = wire.step_reply_to_proto(answer, self.grad_codec, self.label_codec)
        self._count(req, reply, part, answer)
        return wire.step_reply_from_proto(reply, part, self.descriptions[j])


def _param_counts(
    gen: GeneratorTrainer, trainers: list[SiteTrainer], net: NetConfig, num_classes: int, size: int
) -> tuple[int, int]:
    """(G parameters, D parameters per site), checked to be the project's defaults at this size (not whatever
    the trainers built)."""
    g_params = sum(p.numel() for p in gen.G.parameters())
    d_params = sum(sum(p.numel() for p in d.parameters()) for d in trainers[0].discriminators.values())
    n_mod = len(gen.modalities)
    assert g_params == sum(p.numel() for p in build_generator(net, num_classes, n_mod, 0, size).parameters())
    assert d_params == n_mod * sum(p.numel() for p in build_discriminator(net, num_classes, 1, 0).parameters())
    return g_params, d_params


def _rows(
    size: int, per_step: dict[str, float], steps_per_epoch: int, fedavg_round: int, cfg: OrchestratorConfig
) -> list[dict[str, Any]]:
    schemes = [
        ("raw float32 (authors' exchange)", per_step["raw"], per_step["raw"] * steps_per_epoch),
        (
            f"this project (fakes {cfg.image_codec}, gradients {cfg.grad_codec}, labels {cfg.label_codec})",
            per_step["wire"],
            per_step["wire"] * steps_per_epoch,
        ),
        ("FedAvg of G+D weights (float32)", fedavg_round / steps_per_epoch, fedavg_round),
    ]
    return [
        {
            "size": size,
            "scheme": name,
            "MB_per_step": step_b / 1e6,
            "MB_per_epoch": epoch_b / 1e6,
            "vs_raw": step_b / per_step["raw"],
        }
        for name, step_b, epoch_b in schemes
    ]


def _breakdown(size: int, per_step: dict[str, float], cfg: OrchestratorConfig) -> list[dict[str, Any]]:
    codecs = {"fakes": cfg.image_codec, "grad": cfg.grad_codec, "labels": cfg.label_codec}
    return [
        {
            "size": size,
            "tensor": k,
            "codec": codecs[k],
            "raw_kB_per_step": per_step[f"{k}_raw"] / 1e3,
            "wire_kB_per_step": per_step[f"{k}_wire"] / 1e3,
            "ratio": per_step[f"{k}_raw"] / max(per_step[f"{k}_wire"], 1),
        }
        for k in _TENSORS
    ]


def bench_bytes(
    size: int, batch: int, sites: int, steps: int, threads: int, image_codec: str = "", grad_codec: str = ""
) -> dict[str, Any]:
    """Bytes per step and per epoch on the wire for three ways of training the same models.

    * raw float32: the authors' exchange (fakes and gradients as float32, label maps as uint8);
    * this project's default codecs: the real ``StepRequest``/``StepResponse`` messages of a short real training
      run (real sites, real generator), serialized exactly as the generator counts them on the wire;
    * FedAvg of G+D: every round each site downloads and uploads G and its D(s) as float32.

    One epoch = ceil(mean samples per site / batch) steps (every site sees each of its samples about once);
    one FedAvg round = one local epoch, so FedAvg's bytes per epoch are its bytes per round.
    ``image_codec`` / ``grad_codec`` replace the defaults for fakes / gradients (the generator's ``--codec`` and
    ``--grad-codec``); a lossy gradient codec runs with the sites' error feedback, as on the wire.
    """
    torch.set_num_threads(threads)
    data: list[SiteData] = embedded_sites(size, sites)
    cfg, net = OrchestratorConfig(), NetConfig()
    cfg = dataclasses.replace(cfg, image_codec=image_codec or cfg.image_codec, grad_codec=grad_codec or cfg.grad_codec)
    trainers, gen = build_trainers(data, net, TrainConfig(), LocalRun(batch_size=batch))
    exchange = WireSites(trainers, gen, cfg)
    run_steps(gen, exchange, steps)
    counts = exchange.counts
    counts["raw"] = counts["fakes_raw"] + counts["grad_raw"] + counts["labels_raw"]
    per_step = {k: v / steps for k, v in counts.items()}
    g_params, d_params = _param_counts(gen, trainers, net, data[0].num_classes, size)
    steps_per_epoch = math.ceil(sum(len(d) for d in data) / sites / batch)
    fedavg_round = 2 * sites * (g_params + d_params) * 4  # down + up, G + D(s), float32, every site
    return {
        "size": size,
        "batch": batch,
        "sites": sites,
        "steps_measured": steps,
        "samples_per_site": [len(d) for d in data],
        "steps_per_epoch": steps_per_epoch,
        "epoch_definition": "ceil(mean samples per site / batch) steps; one FedAvg round = one local epoch",
        "generator": resolve_generator(net.generator, size),
        "generator_params": g_params,
        "discriminator_params_per_site": d_params,
        "codecs": {"image": cfg.image_codec, "grad": cfg.grad_codec, "label": cfg.label_codec},
        "per_step": per_step,
        "wire_to_raw": per_step["wire"] / per_step["raw"],
        "rows": _rows(size, per_step, steps_per_epoch, fedavg_round, cfg),
        "breakdown": _breakdown(size, per_step, cfg),
    }
