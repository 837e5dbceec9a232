"""The one place that turns ``asyndgan.v1`` messages into domain values and back (``x_to_proto`` /
``x_from_proto`` pairs). Servicers, the orchestrator, clients and benchmarks go through here.

Decoding treats every message as hostile: tensors are decoded against explicit limits and checked against
the geometry the receiver expects; a bad message raises :class:`~asyndgan.codec.CodecError` or
:class:`~asyndgan.errors.BadRequest` (both ``ValueError``), never anything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from google.protobuf.message import Message

from asyndgan import codec
from asyndgan.errors import BadRequest
from asyndgan.messages import (
    LossTerm,
    PrivacyState,
    SiteDescription,
    SiteState,
    SiteStatus,
    StepAnswer,
    StepWork,
    TrainingSettings,
    TrainingState,
)
from asyndgan.v1 import discriminator_pb2 as dpb
from asyndgan.v1 import federation_pb2 as fpb
from asyndgan.v1 import generator_pb2 as gpb
from asyndgan.v1 import tensor_pb2

__all__ = [
    "MAX_CHANNELS",
    "MAX_SYNTH_BATCH",
    "WORK_METHODS",
    "batch_from_proto",
    "batch_request_from_proto",
    "batch_request_to_proto",
    "batch_to_proto",
    "checkpoint_reply_from_proto",
    "checkpoint_reply_to_proto",
    "checkpoint_request_to_proto",
    "codec_from_proto",
    "describe_request_to_proto",
    "hello_from_proto",
    "hello_to_proto",
    "labels_from_tensor",
    "losses_from_proto",
    "losses_to_proto",
    "privacy_from_proto",
    "privacy_to_proto",
    "settings_from_proto",
    "settings_to_proto",
    "site_info_from_proto",
    "site_info_to_proto",
    "site_message_from_proto",
    "site_message_to_proto",
    "site_status_from_proto",
    "site_status_to_proto",
    "step_reply_from_proto",
    "step_reply_to_proto",
    "step_request_from_proto",
    "step_request_to_proto",
    "synthesize_request_from_proto",
    "synthesize_request_to_proto",
    "synthetic_batch_from_proto",
    "synthetic_batch_to_proto",
    "training_status_from_proto",
    "training_status_to_proto",
    "work_from_proto",
    "work_to_proto",
]

MAX_CHANNELS = 16  # a site never decodes more than a batch of this many image channels
MAX_SYNTH_BATCH = 64  # label maps per Synthesize request


def codec_from_proto(spec: str, default: codec.Codec) -> codec.Codec:
    """A codec named in a request (empty: ``default``)."""
    return codec.Codec.parse(spec) if spec else default


# -- losses, privacy -----------------------------------------------------------------------------------


def losses_to_proto(losses: Iterable[LossTerm]) -> list[dpb.Loss]:
    return [dpb.Loss(network=t.network, modality=t.modality, term=t.term, value=t.value) for t in losses]


def losses_from_proto(msgs: Iterable[dpb.Loss]) -> list[LossTerm]:
    return [LossTerm(m.network, m.modality, m.term, m.value) for m in msgs]


def privacy_to_proto(p: PrivacyState) -> dpb.Privacy:
    return dpb.Privacy(
        mode=p.mode,
        epsilon_budget=p.epsilon_budget,
        delta=p.delta,
        epsilon_spent=p.epsilon_spent,
        exhausted=p.exhausted,
    )


def privacy_from_proto(m: dpb.Privacy) -> PrivacyState:
    # A site too old to report a guard is treated as unguarded: the honest reading.
    return PrivacyState(m.mode or "none", m.epsilon_budget, m.delta, m.epsilon_spent, m.exhausted)


# -- Describe / Status ---------------------------------------------------------------------------------


def site_info_to_proto(d: SiteDescription) -> dpb.DescribeResponse:
    return dpb.DescribeResponse(
        site_id=d.site_id,
        num_samples=d.num_samples,
        modalities=list(d.modalities),
        height=d.height,
        width=d.width,
        num_classes=d.num_classes,
        batch_size=d.batch_size,
        version=d.version,
        privacy=privacy_to_proto(d.privacy),
        settings=settings_to_proto(d.settings) if d.settings else None,
    )


def site_info_from_proto(m: dpb.DescribeResponse) -> SiteDescription:
    return SiteDescription(
        site_id=m.site_id,
        num_samples=m.num_samples,
        modalities=tuple(m.modalities),
        height=m.height,
        width=m.width,
        num_classes=m.num_classes,
        batch_size=m.batch_size,
        version=m.version,
        privacy=privacy_from_proto(m.privacy),
        settings=settings_from_proto(m.settings) if m.HasField("settings") else None,
    )


def settings_to_proto(t: TrainingSettings) -> dpb.TrainingSettings:
    return dpb.TrainingSettings(
        gan_mode=t.gan_mode,
        lambda_l1=t.lambda_l1,
        lambda_gan=t.lambda_gan,
        lr_d=t.lr_d,
        discriminator_net=t.discriminator_net,
        ndf=t.ndf,
        norm=t.norm,
    )


def settings_from_proto(m: dpb.TrainingSettings) -> TrainingSettings:
    return TrainingSettings(m.gan_mode, m.lambda_l1, m.lambda_gan, m.lr_d, m.discriminator_net, m.ndf, m.norm)


def site_status_to_proto(s: SiteStatus) -> dpb.StatusResponse:
    return dpb.StatusResponse(
        site_id=s.site_id,
        steps=s.steps,
        last_losses=losses_to_proto(s.last_losses),
        serving=s.serving,
        privacy=privacy_to_proto(s.privacy),
    )


def site_status_from_proto(m: dpb.StatusResponse) -> SiteStatus:
    return SiteStatus(m.site_id, m.steps, losses_from_proto(m.last_losses), m.serving, privacy_from_proto(m.privacy))


# -- empty requests, NextBatch request, Checkpoint -----------------------------------------------------


def describe_request_to_proto() -> dpb.DescribeRequest:
    return dpb.DescribeRequest()


def batch_request_to_proto(label_codec: str | codec.Codec) -> dpb.NextBatchRequest:
    return dpb.NextBatchRequest(label_codec=str(label_codec))


def batch_request_from_proto(m: dpb.NextBatchRequest) -> codec.Codec:
    """The codec the caller wants label maps in (empty: the default)."""
    return codec_from_proto(m.label_codec, codec.LABEL_CODEC)


def checkpoint_request_to_proto() -> dpb.CheckpointRequest:
    return dpb.CheckpointRequest()


def checkpoint_reply_to_proto(steps: int, file: str) -> dpb.CheckpointResponse:
    """``file`` is a file name only, never a path (nothing about the site's disk leaves it)."""
    return dpb.CheckpointResponse(steps=steps, file=file)


def checkpoint_reply_from_proto(m: dpb.CheckpointResponse) -> tuple[int, str]:
    return m.steps, m.file


# -- label batches -------------------------------------------------------------------------------------


def batch_to_proto(batch_id: int, labels: torch.Tensor, label_codec: codec.Codec) -> dpb.NextBatchResponse:
    return dpb.NextBatchResponse(batch_id=batch_id, labels=codec.encode(labels, label_codec))


def labels_from_tensor(
    msg: tensor_pb2.Tensor, height: int, width: int, num_classes: int, max_batch: int
) -> torch.Tensor:
    """Label maps (B, H, W) uint8 with values < ``num_classes`` and B <= ``max_batch``, or CodecError."""
    labels = codec.decode(msg, codec.Limits(max_elements=max(max_batch, 1) * height * width))
    if labels.dim() != 3 or tuple(labels.shape[1:]) != (height, width):
        raise codec.CodecError(f"labels must have shape (B, {height}, {width}), got {tuple(labels.shape)}")
    if labels.dtype != torch.uint8:
        raise codec.CodecError("labels must be uint8 class indices")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise codec.CodecError(f"label values must be < {num_classes}")
    return labels


def batch_from_proto(m: dpb.NextBatchResponse, site: SiteDescription) -> tuple[int, torch.Tensor]:
    """(batch id, label maps) checked against the site's geometry, classes and batch size."""
    return m.batch_id, labels_from_tensor(m.labels, site.height, site.width, site.num_classes, site.batch_size)


# -- Step ----------------------------------------------------------------------------------------------


def step_request_to_proto(w: StepWork, image_codec: codec.Codec) -> dpb.StepRequest:
    return dpb.StepRequest(
        batch_id=w.batch_id,
        fakes=codec.encode(w.fakes, image_codec),
        modalities=list(w.modalities),
        grad_codec=str(w.grad_codec),
        label_codec=str(w.label_codec),
        step=w.step,
    )


def step_request_from_proto(m: dpb.StepRequest, site: SiteDescription) -> StepWork:
    """Decode and validate a Step request for ``site`` (nothing larger than a batch of images is decoded)."""
    grad_codec = codec_from_proto(m.grad_codec, codec.IMAGE_CODEC)
    label_codec = codec_from_proto(m.label_codec, codec.LABEL_CODEC)
    if not m.HasField("fakes"):
        raise BadRequest("fakes missing")
    limits = codec.Limits(max_elements=site.batch_size * MAX_CHANNELS * site.height * site.width)
    fakes = codec.decode(m.fakes, limits)
    return StepWork(m.batch_id, fakes, tuple(m.modalities), m.step, grad_codec, label_codec)


def step_reply_to_proto(a: StepAnswer, grad_codec: codec.Codec, label_codec: codec.Codec) -> dpb.StepResponse:
    return dpb.StepResponse(
        batch_id=a.batch_id,
        grad=codec.encode(a.grad, grad_codec),
        losses=losses_to_proto(a.losses),
        next=batch_to_proto(a.next_batch_id, a.next_labels, label_codec),
        epsilon_spent=a.epsilon_spent,
    )


def step_reply_from_proto(m: dpb.StepResponse, fakes: torch.Tensor, site: SiteDescription) -> StepAnswer:
    """Decode a site's answer to ``fakes``: the gradient may not be larger than them (its shape is checked by
    the generator, which leaves a mis-shaped gradient out of the step)."""
    grad = codec.decode(m.grad, codec.Limits(max_elements=max(fakes.numel(), 1)))
    next_id, next_labels = batch_from_proto(m.next, site)
    return StepAnswer(m.batch_id, grad, losses_from_proto(m.losses), next_id, next_labels, m.epsilon_spent)


# -- generator: Status and Synthesize ------------------------------------------------------------------


def _site_state_to_proto(s: SiteState) -> gpb.SiteState:
    return gpb.SiteState(
        site_id=s.site_id,
        address=s.address,
        active=s.active,
        num_samples=s.num_samples,
        steps_contributed=s.steps_contributed,
        steps_dropped=s.steps_dropped,
        last_error=s.last_error,
        privacy=s.privacy,
        epsilon_spent=s.epsilon_spent,
        finished=s.finished,
    )


def training_status_to_proto(t: TrainingState) -> gpb.GeneratorServiceStatusResponse:
    return gpb.GeneratorServiceStatusResponse(
        step=t.step,
        target_steps=t.target_steps,
        training=t.training,
        sites=[_site_state_to_proto(s) for s in t.sites],
        modalities=list(t.modalities),
        height=t.height,
        width=t.width,
        num_classes=t.num_classes,
        generator_loss=t.generator_loss,
        wire_bytes_sent=t.wire_bytes_sent,
        wire_bytes_received=t.wire_bytes_received,
        styles=list(t.styles),
    )


def training_status_from_proto(m: gpb.GeneratorServiceStatusResponse) -> TrainingState:
    sites = [
        SiteState(
            s.site_id,
            s.address,
            s.active,
            s.num_samples,
            s.steps_contributed,
            s.steps_dropped,
            s.last_error,
            s.privacy,
            s.epsilon_spent,
            s.finished,
        )
        for s in m.sites
    ]
    return TrainingState(
        m.step,
        m.target_steps,
        m.training,
        sites,
        tuple(m.modalities),
        m.height,
        m.width,
        m.num_classes,
        m.generator_loss,
        m.wire_bytes_sent,
        m.wire_bytes_received,
        tuple(m.styles),
    )


def synthesize_request_to_proto(
    labels: torch.Tensor, image_codec: str | codec.Codec, style: str = ""
) -> gpb.SynthesizeRequest:
    labels_pb = codec.encode(labels, codec.LABEL_CODEC)
    return gpb.SynthesizeRequest(labels=labels_pb, image_codec=str(image_codec), style=style)


def synthesize_request_from_proto(
    m: gpb.SynthesizeRequest, height: int, width: int, num_classes: int
) -> tuple[torch.Tensor, codec.Codec, str]:
    """(label maps, codec for the reply, style: "" = every site's in turn); at most MAX_SYNTH_BATCH maps of the
    generator's geometry."""
    out_codec = codec_from_proto(m.image_codec, codec.LOSSLESS)
    if not m.HasField("labels"):
        raise BadRequest("labels missing")
    return labels_from_tensor(m.labels, height, width, num_classes, MAX_SYNTH_BATCH), out_codec, m.style


def synthetic_batch_to_proto(
    images: torch.Tensor, modalities: Sequence[str], image_codec: codec.Codec
) -> gpb.SynthesizeResponse:
    return gpb.SynthesizeResponse(images=codec.encode(images, image_codec), modalities=list(modalities))


def synthetic_batch_from_proto(m: gpb.SynthesizeResponse) -> tuple[torch.Tensor, list[str]]:
    return codec.decode(m.images), list(m.modalities)


# -- the Join stream of dial-out sites (federation.proto) ---------------------------------------------

# Discriminator RPC -> the oneof field that carries it in Work and SiteMessage.
WORK_METHODS = {"Describe": "describe", "NextBatch": "next_batch", "Step": "step", "Checkpoint": "checkpoint"}
_METHOD_OF_FIELD = {f: m for m, f in WORK_METHODS.items()}


def hello_to_proto(site_id: str, version: str) -> fpb.JoinRequest:
    return fpb.JoinRequest(hello=fpb.Hello(site_id=site_id, version=version))


def hello_from_proto(m: fpb.JoinRequest) -> tuple[str, str]:
    """(site id, version) of a site's first message."""
    if m.WhichOneof("body") != "hello" or not m.hello.site_id:
        raise BadRequest("the first message on a Join stream must be a hello naming the site")
    return m.hello.site_id, m.hello.version


def work_to_proto(call_id: int, method: str, request: Message) -> fpb.JoinResponse:
    work = fpb.JoinResponse(call_id=call_id)
    getattr(work, WORK_METHODS[method]).CopyFrom(request)
    return work


def work_from_proto(m: fpb.JoinResponse) -> tuple[int, str, Message]:
    """(call id, Discriminator method name, its request)."""
    field = m.WhichOneof("body")
    if field is None:
        raise BadRequest(f"work item {m.call_id} carries no request")
    return m.call_id, _METHOD_OF_FIELD[field], getattr(m, field)


def site_message_to_proto(
    call_id: int, method: str, reply: Message | None, code: int = 0, error: str = ""
) -> fpb.JoinRequest:
    """A site's answer to work item ``call_id``: ``reply``, or (``code``, ``error``) when it failed."""
    if reply is None:
        return fpb.JoinRequest(call_id=call_id, error=fpb.WorkError(code=code, message=error[:500]))
    msg = fpb.JoinRequest(call_id=call_id)
    getattr(msg, WORK_METHODS[method]).CopyFrom(reply)
    return msg


def site_message_from_proto(m: fpb.JoinRequest) -> tuple[int, Message | fpb.WorkError]:
    """(call id, the reply or the site's error); a message that answers nothing is a BadRequest."""
    field = m.WhichOneof("body")
    if field is None or field == "hello":
        raise BadRequest("a site message after the hello must answer a work item")
    return m.call_id, getattr(m, field)
