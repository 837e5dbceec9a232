"""``make bench``: measured numbers for the codec, the training step, bytes on the wire, the distributed overhead,
the orchestration's scaling with the number of sites, and Synthesize throughput.

Every figure printed here is measured on this machine when the command runs; nothing is hard-coded.
Sizes are flags, so a quick run (``--quick``) and the full run share one code path. The printed tables are
also written to ``--out`` (JSON), to the same path with ``.md`` (Markdown) and a bar chart ``bytes.png``
beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from asyndgan import codec
from asyndgan.algorithm import Batch, GeneratorTrainer, LossTerm, SiteTrainer, TrainConfig
from asyndgan.data import SiteData, load_site
from asyndgan.io import write_bytes_atomic, write_json_atomic
from asyndgan.local import LocalRun, build_trainers, train_local, union_modalities
from asyndgan.nets import NetConfig, build_discriminator, build_generator, resolve_generator
from asyndgan.rpc import Server, make_server
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc

log = logging.getLogger("asyndgan.bench")

CODECS = ["f32", "f32+zstd", "f32+lz4", "bf16", "bf16+zstd", "bf16+lz4", "f16", "f16+zstd"]
LABEL_CODECS = ["u8", "u8+zstd", "u8+lz4"]
DISCRIMINATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Discriminator"].full_name
SECTIONS = ("codec", "step", "bytes", "distributed", "scaling", "synthesize")


def _best_of(fn: Callable[[], object], repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cores() -> int:
    """CPUs this process may run on (the affinity mask, e.g. under ``taskset``), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _embedded(size: int, sites: int) -> list[SiteData]:
    return [load_site(f"embedded:icbm152?site={j}&of={sites}&size={size}") for j in range(sites)]


# ------------------------------------------------------------------------------------------------------- codec


def real_payloads(size: int, batch: int) -> dict[str, torch.Tensor]:
    """An image batch, a real discriminator gradient w.r.t. a generator output, and a label batch."""
    data = load_site(f"embedded:icbm152?site=0&of=3&size={size}")
    trainer = SiteTrainer(data, NetConfig(), TrainConfig(), batch_size=batch, seed=1)
    b = trainer.next_batch()
    fake = (b.real + 0.3 * torch.randn_like(b.real)).clamp(-1, 1)  # an imperfect generator output
    grad = trainer.step(b, fake, ["t1"])
    return {"image": b.real, "gradient": grad, "labels": b.labels}


def bench_codecs(size: int, batch: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    payloads = real_payloads(size, batch)
    for name, x in payloads.items():
        raw = x.numel() * (1 if x.dtype == torch.uint8 else 4)
        arr = x.numpy()
        memcpy = _best_of(functools.partial(np.copy, arr), repeat)
        rows.append(
            {
                "tensor": name,
                "codec": "memcpy",
                "ratio": 1.0,
                "encode_GBps": raw / memcpy / 1e9,
                "decode_GBps": raw / memcpy / 1e9,
                "rel_l2_error": 0.0,
            }
        )
        for spec in LABEL_CODECS if x.dtype == torch.uint8 else CODECS:
            msg = codec.encode(x, spec)
            enc = _best_of(functools.partial(codec.encode, x, spec), repeat)
            dec = _best_of(functools.partial(codec.decode, msg), repeat)
            y = codec.decode(msg)
            err = float(torch.linalg.vector_norm(y.float() - x.float()) / torch.linalg.vector_norm(x.float()))
            rows.append(
                {
                    "tensor": name,
                    "codec": spec,
                    "ratio": raw / codec.wire_nbytes(msg),
                    "encode_GBps": raw / enc / 1e9,
                    "decode_GBps": raw / dec / 1e9,
                    "rel_l2_error": err,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------- in-process step


def bench_local_step(size: int, batch: int, sites: int, steps: int, threads: int) -> dict[str, Any]:
    """Seconds per in-process AsynDGAN step (all sites' D steps + one G step), after warm-up."""
    torch.set_num_threads(threads)
    data = _embedded(size, sites)
    result = train_local(data, None, NetConfig(), TrainConfig(), LocalRun(iterations=steps, batch_size=batch), None)
    return {
        "size": size,
        "batch": batch,
        "sites": sites,
        "threads": threads,
        "steps": steps,
        "seconds_per_step": result.summary["seconds_per_step_steady"],
    }


# ------------------------------------------------------------------------------------------------------- bytes


def _site_reply(
    trainer: SiteTrainer, batch_id: int, grad: torch.Tensor, nxt: Batch, grad_codec: str, label_codec: str
) -> pb.StepReply:
    from asyndgan.services.discriminator.servicer import losses_to_proto

    return pb.StepReply(
        batch_id=batch_id,
        grad=codec.encode(grad, grad_codec),
        losses=losses_to_proto(trainer.last_losses),
        next=pb.ConditionBatch(batch_id=nxt.id, labels=codec.encode(nxt.labels, label_codec)),
    )


def bench_bytes(size: int, batch: int, sites: int, steps: int, threads: int) -> dict[str, Any]:
    """Bytes per step and per epoch on the wire for three ways of training the same models.

    * raw float32: the authors' exchange (fakes and gradients as float32, label maps as uint8);
    * this project's default codecs: the real ``StepRequest``/``StepReply`` messages of a short real training
      run (real sites, real generator), serialized exactly as the generator counts them on the wire;
    * FedAvg of G+D: every round each site downloads and uploads G and its D(s) as float32.

    One epoch = ceil(mean samples per site / batch) steps (every site sees each of its samples about once);
    one FedAvg round = one local epoch, so FedAvg's bytes per epoch are its bytes per round.
    """
    from asyndgan.services.generator.orchestrator import OrchestratorConfig

    torch.set_num_threads(threads)
    data = _embedded(size, sites)
    ocfg = OrchestratorConfig()
    net, train = NetConfig(), TrainConfig()
    modalities = union_modalities(data)
    num_classes = data[0].num_classes
    trainers, gen = build_trainers(data, net, train, LocalRun(batch_size=batch))
    counts = dict.fromkeys(
        ("wire", "raw", *(f"{t}_{w}" for t in ("fakes", "grad", "labels") for w in ("wire", "raw"))), 0
    )
    batches = [t.next_batch() for t in trainers]

    def exchange(parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[LossTerm]] | None]:
        nonlocal batches
        out: list[tuple[torch.Tensor, list[LossTerm]] | None] = []
        nxt = []
        for t, b, part in zip(trainers, batches, parts, strict=True):
            req = pb.StepRequest(
                batch_id=b.id,
                fakes=codec.encode(part, ocfg.image_codec),
                modalities=list(modalities),
                grad_codec=ocfg.grad_codec,
                label_codec=ocfg.label_codec,
                step=gen.steps,
            )
            grad = t.step(b, codec.decode(req.fakes), modalities)  # the site trains on what it received
            n = t.next_batch()
            reply = _site_reply(t, b.id, grad, n, ocfg.grad_codec, ocfg.label_codec)
            counts["wire"] += req.ByteSize() + reply.ByteSize()
            counts["fakes_wire"] += codec.wire_nbytes(req.fakes)
            counts["grad_wire"] += codec.wire_nbytes(reply.grad)
            counts["labels_wire"] += codec.wire_nbytes(reply.next.labels)
            counts["fakes_raw"] += part.numel() * 4
            counts["grad_raw"] += grad.numel() * 4
            counts["labels_raw"] += n.labels.numel()
            out.append((codec.decode(reply.grad), t.last_losses))
            nxt.append(n)
        batches = nxt
        return out

    for _ in range(steps):
        gen.step([b.labels for b in batches], [len(d) for d in data], exchange)
    counts["raw"] = counts["fakes_raw"] + counts["grad_raw"] + counts["labels_raw"]
    per_step = {k: v / steps for k, v in counts.items()}

    g_params = sum(p.numel() for p in gen.G.parameters())
    d_params = sum(sum(p.numel() for p in d.parameters()) for d in trainers[0].discriminators.values())
    mean_samples = sum(len(d) for d in data) / sites
    steps_per_epoch = math.ceil(mean_samples / batch)
    fedavg_round = 2 * sites * (g_params + d_params) * 4  # down + up, G + D(s), float32, every site
    # A check that the counted models are the project's defaults at this size (not whatever the trainer built).
    assert g_params == sum(p.numel() for p in build_generator(net, num_classes, len(modalities), 0, size).parameters())
    assert d_params == len(modalities) * sum(
        p.numel() for p in build_discriminator(net, num_classes, 1, 0).parameters()
    )
    schemes = [
        ("raw float32 (authors' exchange)", per_step["raw"], per_step["raw"] * steps_per_epoch),
        (
            f"this project ({ocfg.image_codec} fakes/grads, {ocfg.label_codec} labels)",
            per_step["wire"],
            per_step["wire"] * steps_per_epoch,
        ),
        ("FedAvg of G+D weights (float32)", fedavg_round / steps_per_epoch, fedavg_round),
    ]
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
        "codecs": {"image": ocfg.image_codec, "grad": ocfg.grad_codec, "label": ocfg.label_codec},
        "per_step": per_step,
        "wire_to_raw": per_step["wire"] / per_step["raw"],
        "rows": [
            {
                "size": size,
                "scheme": name,
                "MB_per_step": step_b / 1e6,
                "MB_per_epoch": epoch_b / 1e6,
                "vs_raw": step_b / per_step["raw"],
            }
            for name, step_b, epoch_b in schemes
        ],
        "breakdown": [
            {
                "size": size,
                "tensor": k,
                "raw_kB_per_step": per_step[f"{k}_raw"] / 1e3,
                "wire_kB_per_step": per_step[f"{k}_wire"] / 1e3,
                "ratio": per_step[f"{k}_raw"] / max(per_step[f"{k}_wire"], 1),
            }
            for k in ("fakes", "grad", "labels")
        ],
    }


def bytes_png(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """Grouped bars (log scale): MB per epoch for each scheme at each image size. PIL only."""
    colours = [(150, 150, 150), (70, 130, 180), (220, 120, 60)]
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    groups = [(r["size"], r["rows"]) for r in results]
    values = [row["MB_per_epoch"] for _, rows in groups for row in rows]
    lo = 10 ** math.floor(math.log10(max(min(values), 1e-6)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    w, h = max(120 + 220 * len(groups), 480), 460
    left, top, bottom = 80, 50, h - 120
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), "Bytes on the wire per epoch (all sites, log scale)", fill="black", font=font)

    def y_of(v: float) -> float:
        return bottom - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (bottom - top)

    decade = lo
    while decade <= hi * 1.0001:
        y = y_of(decade)
        draw.line([(left, y), (w - 20, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), f"{decade:g} MB", fill="black", font=small)
        decade *= 10
    draw.line([(left, top), (left, bottom), (w - 20, bottom)], fill="black")
    bar = 50
    for g, (size, rows) in enumerate(groups):
        x0 = left + 30 + g * 220
        for k, row in enumerate(rows):
            x = x0 + k * (bar + 8)
            y = y_of(row["MB_per_epoch"])
            draw.rectangle([x, y, x + bar, bottom], fill=colours[k % len(colours)])
            draw.text((x, y - 16), f"{row['MB_per_epoch']:.3g}", fill="black", font=small)
        draw.text((x0 + 40, bottom + 6), f"{size} px", fill="black", font=font)
    for k, (_, rows) in enumerate(groups[:1]):
        for i, row in enumerate(rows):
            y = bottom + 34 + i * 20 + k
            draw.rectangle([left, y, left + 14, y + 14], fill=colours[i % len(colours)])
            draw.text((left + 22, y), row["scheme"], fill="black", font=small)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class ThreadPlan:
    """Threads per process for one distributed run: generator, each site, and the OpenMP wait policy."""

    generator: int
    site: int
    passive: bool = False

    @classmethod
    def parse(cls, text: str, cores: int) -> ThreadPlan:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "passive"):
            raise ValueError(f"thread plan {text!r}: expected GEN:SITE or GEN:SITE:passive (GEN 0 = all cores)")
        return cls(int(parts[0]) or cores, int(parts[1]) or cores, len(parts) == 3)

    def __str__(self) -> str:
        return f"{self.generator}:{self.site}{':passive' if self.passive else ''}"


def _env(passive: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _run_summary(args: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "asyndgan.cli", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, timeout=3600, env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(args[:1])} failed ({proc.returncode}): {' | '.join(tail)}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def bench_in_process_subprocess(
    size: int, batch: int, sites: int, steps: int, threads: int, passive: bool
) -> dict[str, Any]:
    """``asyndgan train-local`` in a fresh process (same start-up and environment as the distributed run)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["train-local", "--sites", str(sites), "--iterations", str(steps), "--size", str(size)]
        args += ["--batch-size", str(batch), "--threads", str(threads)]
        s = _run_summary(args, Path(tmp), _env(passive))
    return {
        "mode": "in-process",
        "threads": f"{threads}{' passive' if passive else ''}",
        "seconds_per_step": s["seconds_per_step_steady"],
    }


def bench_distributed(size: int, batch: int, sites: int, steps: int, plan: ThreadPlan) -> dict[str, Any]:
    """The demo's processes (N sites + generator) on loopback; steady seconds per step and bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["demo", "--sites", str(sites), "--iterations", str(steps), "--size", str(size)]
        args += ["--batch-size", str(batch), "--generator-threads", str(plan.generator)]
        args += ["--site-threads", str(plan.site)]
        # The demo sets OMP_WAIT_POLICY for its processes itself; "default" leaves OpenMP's own default.
        args += ["--omp-wait-policy", "PASSIVE" if plan.passive else "default"]
        s = _run_summary(args, Path(tmp), _env(plan.passive))
    wire = s["wire_bytes_sent"] + s["wire_bytes_received"]
    return {
        "mode": "distributed",
        "threads": f"G {plan.generator} + {sites} x site {plan.site}{' passive' if plan.passive else ''}",
        "plan": str(plan),
        "size": size,
        "batch": batch,
        "sites": sites,
        "steps": steps,
        "generator_threads": plan.generator,
        "site_threads": plan.site,
        "omp_wait_policy": "PASSIVE" if plan.passive else "default",
        "seconds_per_step": s["seconds_per_step_steady"],
        "wire_bytes_per_step": wire / s["iterations"],
        "raw_f32_bytes_per_step": s["payload_bytes"] / s["iterations"],
        "wire_to_raw": wire / s["payload_bytes"],
    }


def _best_runs(variants: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant: its fastest run, with every run's seconds per step in ``runs_s_per_step``."""
    out = []
    for runs in variants:
        best = dict(min(runs, key=lambda r: r["seconds_per_step"]))
        best["runs_s_per_step"] = [r["seconds_per_step"] for r in runs]
        out.append(best)
    return out


# ------------------------------------------------------------------------------------------- emulated site


class EmulatedSite(pb_grpc.DiscriminatorServicer):
    """A site whose compute is a fixed sleep: Step returns a zero gradient of the right shape and the next
    batch of label maps (drawn from ``pool``). Measures the generator's orchestration, not D's compute.

    Its own Python work is kept minimal (label batches and zero gradients are encoded once and reused;
    fakes are checked by their header, not decoded): all emulated sites share one process and its GIL
    (:func:`emulated_sites`), whereas real sites each run their own."""

    def __init__(
        self, site_id: str, pool: np.ndarray, num_classes: int, batch: int, delay: float, seed: int = 0
    ) -> None:
        self.site_id = site_id
        self.pool = pool
        self.num_classes = num_classes
        self.batch = batch
        self.delay = delay
        self.batch_id = 0
        self.steps = 0
        self.lock = threading.Lock()
        rng = np.random.default_rng(seed)
        self.label_batches = [
            torch.from_numpy(np.ascontiguousarray(pool[rng.integers(0, len(pool), batch)])) for _ in range(8)
        ]
        self._encoded: dict[tuple[Any, ...], Any] = {}

    def _cached(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self._encoded:
            self._encoded[key] = make()
        return self._encoded[key]

    def _next(self, label_codec: str) -> pb.ConditionBatch:
        self.batch_id += 1
        spec = label_codec or str(codec.LABEL_CODEC)
        k = self.batch_id % len(self.label_batches)
        labels = self._cached(("labels", k, spec), lambda: codec.encode(self.label_batches[k], spec))
        return pb.ConditionBatch(batch_id=self.batch_id, labels=labels)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.SiteInfo:
        h, w = self.pool.shape[1:]
        return pb.SiteInfo(
            site_id=self.site_id,
            num_samples=len(self.pool),
            modalities=["t1"],
            height=h,
            width=w,
            num_classes=self.num_classes,
            batch_size=self.batch,
            version="emulated",
        )

    def NextBatch(self, request: pb.BatchRequest, context: grpc.ServicerContext) -> pb.ConditionBatch:
        with self.lock:
            return self._next(request.label_codec)

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        with self.lock:
            shape = tuple(request.fakes.shape)
            h, w = self.pool.shape[1:]
            if request.batch_id != self.batch_id or len(shape) != 4 or shape[0] != self.batch or shape[2:] != (h, w):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not the outstanding batch, or a wrong shape")
            time.sleep(self.delay)
            self.steps += 1
            spec = request.grad_codec or str(codec.IMAGE_CODEC)
            grad = self._cached(("grad", shape, spec), lambda: codec.encode(torch.zeros(shape), spec))
            return pb.StepReply(
                batch_id=request.batch_id,
                grad=grad,
                losses=[pb.Loss(network="G", modality="", term="total", value=0.0)],
                next=self._next(request.label_codec),
            )

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointReply:
        return pb.CheckpointReply(steps=self.steps, file="")

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.SiteStatus:
        return pb.SiteStatus(site_id=self.site_id, steps=self.steps, serving=True)


def serve_emulated(site: EmulatedSite) -> Server:
    server = make_server(
        "127.0.0.1:0", lambda s: pb_grpc.add_DiscriminatorServicer_to_server(site, s), [DISCRIMINATOR_SERVICE]
    )
    server.set_serving(True)
    return server


def _host_emulated(n: int, size: int, batch: int, delay: float, ports: Any, stop: Any) -> None:
    """Child process: serve ``n`` emulated sites on 127.0.0.1 until ``stop`` is set."""
    torch.set_num_threads(1)
    pool, num_classes = _label_pool(size)
    servers = [serve_emulated(EmulatedSite(f"site-{j}", pool, num_classes, batch, delay, seed=j)) for j in range(n)]
    ports.put([srv.port for srv in servers])
    stop.wait()
    for srv in servers:
        srv.stop(0)


@contextlib.contextmanager
def emulated_sites(n: int, size: int, batch: int, delay: float) -> Iterator[list[str]]:
    """``n`` emulated sites in one child process (off the generator's GIL, as real sites are); their addresses."""
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_host_emulated, args=(n, size, batch, delay, ports, stop), daemon=True)
    proc.start()
    try:
        yield [f"127.0.0.1:{port}" for port in ports.get(timeout=120)]
    finally:
        stop.set()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


@functools.lru_cache(maxsize=4)
def _label_pool(size: int) -> tuple[np.ndarray, int]:
    data = load_site(f"embedded:icbm152?site=0&of=1&size={size}")
    return data.labels, data.num_classes


def _zero_exchange(parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[LossTerm]] | None]:
    return [(torch.zeros_like(p), [LossTerm("G", "", "total", 0.0)]) for p in parts]


def bench_scaling(
    ns: Sequence[int],
    delay: float,
    steps: int,
    size: int,
    batch: int,
    ngf: int,
    total_batch: int | None = None,
    warmup: int = 3,
) -> list[dict[str, Any]]:
    """Generator step time over N emulated sites (real Orchestrator + GeneratorTrainer, real gRPC on loopback).

    ``batch`` per site, or with ``total_batch`` that many images split over the N sites (G's compute stays the
    same, so only the orchestration varies with N). Per N: median seconds per step, the generator's own compute
    for the same batch without the network (median of the same number of steps), overhead = step - delay -
    compute."""
    from asyndgan.services.generator.orchestrator import Orchestrator, OrchestratorConfig, SiteLink

    pool, _ = _label_pool(size)
    net = NetConfig(ngf=ngf)  # "auto": unet_<size>
    rows: list[dict[str, Any]] = []
    for n in ns:
        per_site = batch if total_batch is None else total_batch // n
        if per_site < 1:
            raise ValueError(f"total batch {total_batch} is smaller than {n} sites")
        with contextlib.ExitStack() as stack:
            addresses = stack.enter_context(emulated_sites(n, size, per_site, delay))
            links = [SiteLink.dial(f"site-{j}", addr) for j, addr in enumerate(addresses)]
            orch = Orchestrator(links, OrchestratorConfig(step_deadline_s=max(30.0, 100 * delay)))
            stack.callback(orch.close)
            _h, _w, k, mods = orch.connect()
            gen = GeneratorTrainer(net, TrainConfig(), num_classes=k, modalities=mods, seed=0, image_size=size)
            times = []
            for i in range(warmup + steps):
                t = time.perf_counter()
                outcome = orch.step(gen)
                if i >= warmup:
                    times.append(time.perf_counter() - t)
                if not all(outcome.answered):
                    raise RuntimeError(f"an emulated site missed step {i} with N={n}")
            labels = [torch.from_numpy(pool[:per_site]) for _ in range(n)]
            compute = []
            for i in range(warmup + steps):
                t = time.perf_counter()
                gen.step(labels, [len(pool)] * n, _zero_exchange)
                if i >= warmup:
                    compute.append(time.perf_counter() - t)
        step_s, compute_s = statistics.median(times), statistics.median(compute)
        rows.append(
            {
                "sites": n,
                "batch_per_site": per_site,
                "delay_s": delay,
                "seconds_per_step": step_s,
                "p90_seconds": sorted(times)[int(0.9 * (len(times) - 1))],
                "generator_compute_s": compute_s,
                "overhead_s": step_s - delay - compute_s,
            }
        )
    for r in rows:
        r["ratio_to_n1"] = r["seconds_per_step"] / rows[0]["seconds_per_step"]
    return rows


# ------------------------------------------------------------------------------------------------- synthesize


def bench_synthesize(size: int, batch: int, requests: int, repeat: int, codecs: Sequence[str]) -> dict[str, Any]:
    """Images/s through the generator service's Synthesize stream (client and server in this process, real
    gRPC on loopback) vs the same generator's forward pass called directly, same batch and threads."""
    from asyndgan.clients.generator_client import GeneratorClient
    from asyndgan.services.generator.service import GeneratorConfig, GeneratorService

    pool, num_classes = _label_pool(size)
    site = EmulatedSite("emulated", pool, num_classes, batch, 0.0)
    site_server = serve_emulated(site)
    rng = np.random.default_rng(0)
    batches = [np.ascontiguousarray(pool[rng.integers(0, len(pool), batch)]) for _ in range(requests)]
    with tempfile.TemporaryDirectory() as tmp:
        svc = GeneratorService(
            GeneratorConfig(
                sites=(("emulated", f"127.0.0.1:{site_server.port}"),),
                iterations=0,
                checkpoint_dir=Path(tmp),
                net=NetConfig(),
            )
        )
        clients = {c: GeneratorClient(f"127.0.0.1:{svc.server.port}", image_codec=c) for c in codecs}
        tensors = [torch.from_numpy(b) for b in batches]

        def forward() -> None:
            for t in tensors:
                svc.gen.synthesize(t)

        def stream(client: GeneratorClient) -> None:
            for images, _ in client.stream(batches):
                assert images.shape[0] == batch

        # The service runs G in a gRPC worker thread; the forward pass is timed both on this (main) thread and on
        # a worker thread, and the faster of the two is the reference (they differ by some percent here).
        worker = ThreadPoolExecutor(1, thread_name_prefix="bench-forward")
        variants: dict[str, Callable[[], object]] = {
            "forward (main thread)": forward,
            "forward (worker thread)": lambda: worker.submit(forward).result(),
            **{c: functools.partial(stream, client) for c, client in clients.items()},
        }
        try:
            for fn in variants.values():  # warm-up
                fn()
            best = dict.fromkeys(variants, math.inf)
            for _ in range(repeat):  # interleaved, so a load spike hits every variant alike
                for name, fn in variants.items():
                    best[name] = min(best[name], _best_of(fn, 1))
        finally:
            worker.shutdown()
            for c in clients.values():
                c.close()
            svc.stop(0)
            site_server.stop(0)
    images = batch * requests
    reference = min(best["forward (main thread)"], best["forward (worker thread)"])
    rows = [
        {
            "path": f"G {name} in-process" if name.startswith("forward") else f"Synthesize stream ({name} images)",
            "images_per_s": images / seconds,
            "vs_forward": reference / seconds,
        }
        for name, seconds in best.items()
    ]
    return {
        "size": size,
        "batch": batch,
        "requests": requests,
        "threads": torch.get_num_threads(),
        "generator": resolve_generator(NetConfig().generator, size),
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------------ output


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Collects sections: printed as text tables as they complete, and rendered to Markdown at the end."""

    def __init__(self) -> None:
        self.md: list[str] = []

    def section(self, title: str, rows: list[dict[str, Any]], cols: list[str], notes: Sequence[str] = ()) -> None:
        print(f"\n## {title}\n")
        print(_table(rows, cols))
        for n in notes:
            print(n)
        sys.stdout.flush()
        self.md += [f"## {title}", "", _md_table(rows, cols), ""]
        self.md += [f"{n}  " for n in notes] + ([""] if notes else [])


def _busy_and_own_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes on this machine have used, CPU seconds this process and its waited-for
    descendants have used), for telling how much other work shared the machine during a section."""
    own = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan, own
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system (idle iowait) irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), own


@contextlib.contextmanager
def _clock(log_rows: list[dict[str, Any]], name: str) -> Iterator[None]:
    """Records a section's wall time and the share of the machine's CPU that *other* processes used meanwhile."""
    busy0, own0, t0 = *_busy_and_own_cpu_s(), time.perf_counter()
    yield
    busy1, own1, wall = *_busy_and_own_cpu_s(), time.perf_counter() - t0
    cores = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * cores) if wall > 0 else math.nan
    log_rows.append({"section": name, "seconds": wall, "other_processes_cpu_share": others})


def _target(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="asyndgan.bench", description=__doc__)
    p.add_argument("--out", default="results/bench.json", help="JSON results; .md and bytes.png go beside it")
    p.add_argument("--quick", action="store_true", help="small sizes and few steps, for a smoke run (< 2 min)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--steps", type=int, default=20, help="steps of the in-process and distributed runs (3 warm-up)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--step-sizes", default="64,128", help="image sizes of the in-process step section")
    p.add_argument("--bytes-sizes", default="64,128", help="image sizes of the bytes section")
    p.add_argument("--bytes-steps", type=int, default=5, help="training steps whose messages are measured")
    p.add_argument("--dist-size", type=int, default=64, help="image size of the distributed run")
    p.add_argument("--dist-repeat", type=int, default=2, help="interleaved rounds of in-process and distributed runs")
    p.add_argument(
        "--thread-plans",
        default="0:1,0:1:passive",
        help="distributed thread plans GEN:SITE[:passive] (0 = all cores; passive = OMP_WAIT_POLICY=PASSIVE)",
    )
    p.add_argument("--scaling-sites", default="1,2,4,8,16")
    p.add_argument("--scaling-delay", type=float, default=0.2, help="emulated site compute per step (s)")
    p.add_argument("--scaling-steps", type=int, default=20)
    p.add_argument("--scaling-size", type=int, default=32)
    p.add_argument("--scaling-batch", type=int, default=2, help="batch per emulated site (fixed-per-site variant)")
    p.add_argument(
        "--scaling-total-batch", type=int, default=16, help="images per step split over the N sites (target variant)"
    )
    p.add_argument("--scaling-ngf", type=int, default=8)
    p.add_argument(
        "--scaling-threads", type=int, default=1, help="torch threads of the generator (tiny G: 1 is fastest)"
    )
    p.add_argument("--synth-size", type=int, default=64)
    p.add_argument("--synth-batch", type=int, default=16)
    p.add_argument("--synth-requests", type=int, default=16)
    p.add_argument("--synth-repeat", type=int, default=3)
    p.add_argument("--synth-codecs", default="f32,bf16+zstd", help="image codecs the Synthesize client asks for")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("asyndgan.services").setLevel(logging.WARNING)  # per-site connect lines of the runs
    if a.quick:
        a.steps, a.bytes_steps, a.scaling_steps, a.synth_requests, a.synth_repeat = 5, 3, 5, 4, 1
        a.step_sizes = a.bytes_sizes = "32"
        a.dist_size, a.synth_size = 32, 32
        a.scaling_sites, a.thread_plans, a.dist_repeat = "1,4,16", "0:1", 1
    sections = set(a.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    cores = _cores()
    out = Path(a.out)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {
            "cpus": cores,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        },
        "command": " ".join(["python -m asyndgan.bench", *(argv if argv is not None else sys.argv[1:])]),
    }
    report = Report()
    targets: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []

    if "codec" in sections:
        with _clock(timing, "codec"):
            torch.set_num_threads(1)
            size = 32 if a.quick else 64
            rows = bench_codecs(size, a.batch_size, 3 if a.quick else 20)
            results["codec"] = rows
            report.section(
                f"Codec (batch {a.batch_size}, {size} px; GB/s of raw float32/uint8 bytes; 1 thread)",
                rows,
                ["tensor", "codec", "ratio", "encode_GBps", "decode_GBps", "rel_l2_error"],
            )

    if "step" in sections:
        with _clock(timing, "step"):
            rows = [bench_local_step(s, a.batch_size, a.sites, a.steps, cores) for s in _ints(a.step_sizes)]
            results["local_step"] = rows
            report.section(
                f"In-process step ({a.sites} sites, batch {a.batch_size}, default nets)",
                rows,
                ["size", "batch", "sites", "threads", "steps", "seconds_per_step"],
            )

    if "bytes" in sections:
        with _clock(timing, "bytes"):
            per_size = [bench_bytes(s, a.batch_size, a.sites, a.bytes_steps, cores) for s in _ints(a.bytes_sizes)]
            results["bytes"] = per_size
            b0 = per_size[0]
            png = out.with_name("bytes.png")
            bytes_png(png, per_size)
            report.section(
                f"Bytes on the wire ({a.sites} sites, batch {a.batch_size}, all sites together)",
                [r for s in per_size for r in s["rows"]],
                ["size", "scheme", "MB_per_step", "MB_per_epoch", "vs_raw"],
                [
                    f"epoch = {b0['steps_per_epoch']} steps ({b0['epoch_definition']}); samples per site "
                    f"{b0['samples_per_site']}.",
                    *(
                        f"{s['size']} px: G {s['generator']} {s['generator_params'] / 1e6:.2f} M params, "
                        f"D {s['discriminator_params_per_site'] / 1e6:.2f} M params per site; FedAvg per step = "
                        "per round / steps per epoch."
                        for s in per_size
                    ),
                    f"Project bytes: serialized StepRequest + StepReply of {b0['steps_measured']} real training steps "
                    f"from initialisation; plot: {png}.",
                ],
            )
            report.section(
                "Bytes per step by tensor (this project's default codecs)",
                [r for s in per_size for r in s["breakdown"]],
                ["size", "tensor", "raw_kB_per_step", "wire_kB_per_step", "ratio"],
            )
            for s in per_size:
                targets.append(
                    {
                        "target": f"wire / raw float32 per step ({s['size']} px)",
                        "value": s["wire_to_raw"],
                        "goal": "<= 0.4",
                    }
                    | {"status": _target(s["wire_to_raw"], 0.4, False)}
                )

    if "distributed" in sections:
        with _clock(timing, "distributed"):
            size = a.dist_size
            plans = [ThreadPlan.parse(t, cores) for t in a.thread_plans.split(",") if t]
            policies = sorted({pl.passive for pl in plans})
            in_runs: list[list[dict[str, Any]]] = [[] for _ in policies]
            dist_runs: list[list[dict[str, Any]]] = [[] for _ in plans]
            for _ in range(a.dist_repeat):  # interleaved rounds, so a quiet or a busy spell hits every variant
                for runs, pv in zip(in_runs, policies, strict=True):
                    runs.append(bench_in_process_subprocess(size, a.batch_size, a.sites, a.steps, cores, pv))
                for runs, pl in zip(dist_runs, plans, strict=True):
                    runs.append(bench_distributed(size, a.batch_size, a.sites, a.steps, pl))
            in_proc, dist = _best_runs(in_runs), _best_runs(dist_runs)
            best_in = min(in_proc, key=lambda r: r["seconds_per_step"])
            for r in in_proc + dist:
                r["throughput_vs_best_in_process"] = best_in["seconds_per_step"] / r["seconds_per_step"]
            best = min(dist, key=lambda r: r["seconds_per_step"])
            results["distributed"] = {"in_process": in_proc, "distributed": dist, "best": best["plan"]}
            report.section(
                f"Distributed vs in-process ({size} px, {a.sites} sites, batch {a.batch_size}, {cores} cores, "
                f"{a.steps} steps each, best of {a.dist_repeat} interleaved runs)",
                in_proc + dist,
                ["mode", "threads", "seconds_per_step", "runs_s_per_step", "throughput_vs_best_in_process"],
                [
                    f"in-process: `asyndgan train-local --threads {cores}`; distributed: `asyndgan demo` "
                    f"(each site and the generator its own process), both fresh processes, steady s/step.",
                    f"best distributed plan {best['plan']}: throughput {best['throughput_vs_best_in_process']:.3f} "
                    "x best in-process (target >= 0.95).",
                    f"bytes on the wire per step (distributed run): {best['wire_bytes_per_step'] / 1e3:.1f} kB = "
                    f"{best['wire_to_raw']:.3f} x raw float32 (target <= 0.4).",
                    f"Threads on {cores} cores: GEN:SITE = torch threads of the generator and of each site. The "
                    "generator's forward and backward run while every site waits, and the sites' D steps run "
                    "together while the generator waits in the RPC, so the generator gets all cores and each site "
                    "one thread (single-thread sites share the cores with no OpenMP barrier inside a process). "
                    "passive = OMP_WAIT_POLICY=PASSIVE in every process (both modes): idle OpenMP threads sleep "
                    "instead of spinning after a parallel region, so a waiting process leaves its cycles to a "
                    "computing one.",
                ],
            )
            targets.append(
                {
                    "target": "distributed / in-process throughput",
                    "value": best["throughput_vs_best_in_process"],
                    "goal": ">= 0.95",
                    "status": _target(best["throughput_vs_best_in_process"], 0.95, True),
                }
            )

    if "scaling" in sections:
        with _clock(timing, "scaling"):
            torch.set_num_threads(a.scaling_threads or cores)
            ns = _ints(a.scaling_sites)
            common = (ns, a.scaling_delay, a.scaling_steps, a.scaling_size, a.scaling_batch, a.scaling_ngf)
            rows = bench_scaling(*common, total_batch=a.scaling_total_batch)
            per_site_rows = bench_scaling(*common)
            results["scaling"] = {
                "delay_s": a.scaling_delay,
                "size": a.scaling_size,
                "total_batch": a.scaling_total_batch,
                "batch_per_site": a.scaling_batch,
                "generator": f"unet_{a.scaling_size} ngf {a.scaling_ngf}",
                "threads": torch.get_num_threads(),
                "rows": rows,
                "rows_fixed_batch_per_site": per_site_rows,
            }
            cols = ["sites", "batch_per_site", "seconds_per_step", "p90_seconds", "generator_compute_s", "overhead_s"]
            head = (
                f"{a.scaling_delay} s fixed site delay, {a.scaling_size} px, unet ngf {a.scaling_ngf}, median of "
                f"{a.scaling_steps} steps, {torch.get_num_threads()} torch thread(s) in the generator; all emulated "
                "sites in one other process"
            )
            report.section(
                f"Orchestration: generator step with N emulated sites, {a.scaling_total_batch} images per step "
                f"split over the sites ({head})",
                rows,
                [*cols, "ratio_to_n1"],
                [
                    "G's batch is the same for every N, so the ratio measures the orchestration (fan-out, codecs, "
                    "aggregation); overhead = step - site delay - generator compute (same batch, no network)."
                ],
            )
            report.section(
                f"Same, {a.scaling_batch} images per site (G's batch grows with N)",
                per_site_rows,
                [*cols, "ratio_to_n1"],
                ["Here the step also pays for G's larger forward and backward pass: not orchestration."],
            )
            last = rows[-1]
            targets.append(
                {
                    "target": f"step time N={last['sites']} / N={rows[0]['sites']} (same G batch)",
                    "value": last["ratio_to_n1"],
                    "goal": "<= 1.2",
                    "status": _target(last["ratio_to_n1"], 1.2, False),
                }
            )

    if "synthesize" in sections:
        with _clock(timing, "synthesize"):
            torch.set_num_threads(cores)
            synth_codecs = [c for c in a.synth_codecs.split(",") if c]
            res = bench_synthesize(a.synth_size, a.synth_batch, a.synth_requests, a.synth_repeat, synth_codecs)
            results["synthesize"] = res
            report.section(
                f"Synthesize ({res['size']} px, batch {res['batch']}, {res['requests']} requests, {res['generator']}, "
                f"{res['threads']} threads, best of {a.synth_repeat})",
                res["rows"],
                ["path", "images_per_s", "vs_forward"],
                [
                    "client and generator service in this process; real gRPC stream on loopback; vs_forward = "
                    "images/s over the faster forward pass."
                ],
            )
            first = res["rows"][2]
            targets.append(
                {
                    "target": f"Synthesize / forward pass ({synth_codecs[0]})",
                    "value": first["vs_forward"],
                    "goal": ">= 0.9",
                    "status": _target(first["vs_forward"], 0.9, True),
                }
            )

    results["targets"] = targets
    results["sections"] = timing
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    if targets:
        report.section("Targets", targets, ["target", "value", "goal", "status"])
    report.section(
        "Run time per section",
        timing,
        ["section", "seconds", "other_processes_cpu_share"],
        [
            "other_processes_cpu_share: CPU time used by processes other than this benchmark and its children, "
            "as a share of all cores over the section (0 = the machine was otherwise idle)."
        ],
    )
    m = results["machine"]
    header = [
        "# asyndgan benchmark",
        "",
        f"`{results['command']}` on {m['cpus']} CPUs ({m['platform']}), Python {m['python']}, torch {m['torch']}; "
        f"{results['seconds']} s; load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end; OMP_WAIT_POLICY of this process: {m['omp_wait_policy']}. "
        f"Every number is measured by the command; see `{out.name}` and the run time table at the end.",
        "",
    ]
    write_json_atomic(out, results)
    write_bytes_atomic(out.with_suffix(".md"), "\n".join(header + report.md).encode())
    log.info("wrote %s and %s in %.0f s", out, out.with_suffix(".md"), results["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
