"""The ``asyndgan`` command line. Each sub-command parses flags (flags > ``ASYNDGAN_<FLAG>`` > ``--config FILE`` >
defaults, :mod:`asyndgan.cli_config`), validates, runs.

Errors a user can fix end as one readable line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from asyndgan import __version__
from asyndgan.cli_flags import (
    EMBEDDED,
    UsageError,
    add_allow_flag,
    add_common,
    add_config_flags,
    add_generator_step_flags,
    add_metrics_flags,
    add_model_flags,
    add_privacy_flags,
    add_tls_flags,
    generator_config,
    net_config,
    parse_site,
    privacy_config,
    setup_logging,
    start_metrics,
    tls_config,
    train_config,
)

if TYPE_CHECKING:
    import numpy as np

    from asyndgan.data.loaders import NiftiLayout

log = logging.getLogger("asyndgan")


def cmd_train_local(a: argparse.Namespace) -> int:
    from asyndgan.data import load_site
    from asyndgan.local import LocalRun, train_local

    specs = a.data or [f"{EMBEDDED}?site={j}&of={a.sites}" for j in range(a.sites)]
    heldout_spec = a.heldout if a.heldout else (f"{EMBEDDED}?split=heldout&of={len(specs)}" if not a.data else None)
    mods = f"&modalities={a.modalities}" if a.modalities and not a.data else ""
    sites = [load_site(s + mods, size=a.size) for s in specs]
    heldout = load_site(heldout_spec + mods, size=a.size) if heldout_spec else None
    log.info(
        "in-process training: %d sites (%s), %d iterations, batch %d, %d px",
        len(sites),
        ", ".join(f"{s.name}={len(s)}" for s in sites),
        a.iterations,
        a.batch_size,
        a.size,
    )
    result = train_local(
        sites,
        heldout,
        net_config(a),
        train_config(a),
        LocalRun(iterations=a.iterations, batch_size=a.batch_size, seed=a.seed, site_styles=a.site_styles),
        Path(a.out),
    )
    s = result.summary
    log.info(
        "done in %.1f s (%.3f s/step); held-out L1 %.4f -> %.4f",
        s["seconds"],
        s["seconds_per_step"],
        s["l1_heldout_start"],
        s["l1_heldout"],
    )
    return 0


def cmd_discriminator(a: argparse.Namespace) -> int:
    from asyndgan.rpc import stop_event_on_signals, wait_for
    from asyndgan.services.discriminator.service import DiscriminatorConfig, start_dial_out, start_discriminator

    if a.connect and a.listen:
        if a.sources.get("listen") is None:  # on the command line
            raise UsageError("--connect (dial-out) opens no gRPC port: drop --listen")
        a.listen = None  # ASYNDGAN_LISTEN (the image sets it) is only the dial-in default
    cfg = DiscriminatorConfig(
        site_id=a.site_id,
        data=a.data,
        listen=a.listen or "127.0.0.1:50061",
        connect=a.connect,
        server_name=a.server_name,
        checkpoint_dir=Path(a.checkpoint_dir) if a.checkpoint_dir else None,
        size=a.size,
        batch_size=a.batch_size,
        seed=a.seed,
        resume=not a.no_resume,
        net=net_config(a),
        train=train_config(a),
        port_file=Path(a.port_file) if a.port_file else None,
        tls=tls_config(a),
        allowed_clients=tuple(a.allow_client),
        device=a.device,
        privacy=privacy_config(a),
    )
    stop = stop_event_on_signals()
    registry, metrics_http = start_metrics(a, "discriminator")
    if cfg.connect:
        site, link = start_dial_out(cfg, registry)
        wait_for(stop)
        link.stop(timeout=a.grace)
    else:
        site, server = start_discriminator(cfg, registry=registry)
        wait_for(stop)
        server.stop(grace=a.grace)
    site.checkpoint()
    site.close()
    if metrics_http is not None:
        metrics_http.close()
    log.info("stopped cleanly after %d steps", site.steps)
    return 0


def cmd_generator(a: argparse.Namespace) -> int:
    from asyndgan.rpc import stop_event_on_signals, wait_for
    from asyndgan.services.generator.service import GeneratorService

    cfg = generator_config(a)
    stop = stop_event_on_signals()
    registry, metrics_http = start_metrics(a, "generator")
    service = GeneratorService.start(cfg, registry=registry, stop=stop)
    try:
        if not service.ready:
            log.info("stopped while waiting for the sites")
            return 0
        summary = service.train(stop)
        if registry is not None and a.out:
            from prometheus_client import generate_latest

            from asyndgan.io import write_bytes_atomic

            # The final values, next to summary.json (a scrape may miss the last steps of a short run).
            write_bytes_atomic(Path(a.out) / "metrics.prom", generate_latest(registry))
        log.info(
            "trained to step %d in %.1f s; wire %.2f MB sent / %.2f MB received; held-out L1 %.4f",
            summary["iterations"],
            summary["seconds"],
            summary["wire_bytes_sent"] / 1e6,
            summary["wire_bytes_received"] / 1e6,
            summary["l1_heldout"],
        )
        if a.serve and not stop.is_set():
            log.info("training done; serving Synthesize until SIGTERM")
            wait_for(stop)
    finally:
        service.stop(grace=a.grace)
        if metrics_http is not None:
            metrics_http.close()
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from asyndgan.demo import DemoConfig, run_demo

    summary = run_demo(
        DemoConfig(
            sites=a.sites,
            iterations=a.iterations,
            size=a.size,
            batch_size=a.batch_size,
            out=Path(a.out),
            seed=a.seed,
            modalities=a.modalities,
            missing=a.missing,
            codec=a.codec,
            grad_codec=a.grad_codec,
            generator_threads=a.generator_threads,
            site_threads=a.site_threads,
            metrics=a.metrics,
            tls=a.tls,
            omp_wait_policy=a.omp_wait_policy,
            subjects=a.subjects,
            privacy=a.privacy,
        )
    )
    wire = summary["wire_bytes_sent"] + summary["wire_bytes_received"]
    log.info(
        "demo done: %d steps, %d sites, %.1f s; %.2f MB on the wire (%.2f of raw float32); "
        "held-out L1 %.4f -> %.4f; see %s",
        summary["iterations"],
        len(summary["sites"]),
        summary["seconds"],
        wire / 1e6,
        wire / max(summary["payload_bytes"], 1),
        summary["l1_heldout_start"],
        summary["l1_heldout"],
        Path(a.out) / "samples.png",
    )
    for site in summary["sites"]:
        log.info("  %s: privacy %s, epsilon spent %.3g", site["name"], site["privacy"], site["epsilon_spent"])
    return 0


def cmd_synthesize(a: argparse.Namespace) -> int:
    import io

    import numpy as np
    from PIL import Image

    from asyndgan.clients.generator_client import GeneratorClient
    from asyndgan.data import load_site
    from asyndgan.data.loaders import nifti_layout
    from asyndgan.io import write_bytes_atomic
    from asyndgan.report import label_rgb

    site = load_site(a.labels, size=a.size)
    out = Path(a.out)
    with GeneratorClient(a.generator, tls=tls_config(a), server_name=a.server_name) as client:
        images, modalities = client.synthesize(site.labels, batch_size=a.batch_size, style=a.style)
    (out / "png").mkdir(parents=True, exist_ok=True)
    for i, (lab, img) in enumerate(zip(site.labels, images, strict=True)):
        Image.fromarray(label_rgb(lab)).save(out / "png" / f"{i:05d}_label.png")
        for k, m in enumerate(modalities):
            g = ((np.clip(img[k], -1, 1) + 1) * 127.5).round().astype(np.uint8)
            Image.fromarray(g).save(out / "png" / f"{i:05d}_{m}.png")
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=site.labels, images=images, modalities=np.array(modalities))
    write_bytes_atomic(out / "synthetic.npz", buf.getvalue())
    layout = nifti_layout(a.labels)
    if layout is not None:
        write_nifti_volumes(out, layout, site.labels, images, modalities)
    log.info("wrote %d synthetic samples (%s) to %s", len(images), "/".join(modalities), out)
    return 0


def write_nifti_volumes(
    out: Path, layout: NiftiLayout, labels: np.ndarray, images: np.ndarray, modalities: Sequence[str]
) -> None:
    """``labels.nii.gz`` and ``synthetic_<modality>.nii.gz`` in the label volume's grid and affine (images in
    G's [-1, 1] scale, -1 in slices that had no foreground)."""
    import gzip

    import nibabel as nib

    from asyndgan.data.loaders import slices_to_volume
    from asyndgan.io import write_bytes_atomic

    volumes = {"labels": slices_to_volume(layout, labels, 0, labels=True)}
    for k, m in enumerate(modalities):
        volumes[f"synthetic_{m}"] = slices_to_volume(layout, images[:, k], -1.0)
    for name, vol in volumes.items():
        img = nib.Nifti1Image(vol, layout.affine)
        write_bytes_atomic(out / f"{name}.nii.gz", gzip.compress(img.to_bytes(), compresslevel=6))


def cmd_certs(a: argparse.Namespace) -> int:
    from asyndgan.certs import init_ca, issue

    if a.certs_command == "init":
        log.info("created %s", init_ca(Path(a.dir)))
    else:
        for name in a.names:
            cert, key = issue(Path(a.dir), name, tuple(a.host or ()))
            log.info("issued %s and %s", cert, key)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from asyndgan.clients import audit

    parser = argparse.ArgumentParser(prog="asyndgan", description=__doc__)
    parser.add_argument("--version", action="version", version=f"asyndgan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-local", help="train in one process (reference trainer)")
    p.add_argument("--sites", type=int, default=3, help="simulated hospitals on the embedded data")
    p.add_argument("--data", action="append", help="site data spec (repeat per site); default: embedded")
    p.add_argument("--heldout", help="held-out data spec for evaluation")
    p.add_argument("--modalities", default="", help="embedded data modalities, e.g. t1,t2")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", default="runs/local")
    p.add_argument("--site-styles", action="store_true", help="G also takes the site whose scanner it renders")
    add_model_flags(p)
    add_common(p)
    p.set_defaults(func=cmd_train_local)

    p = sub.add_parser("discriminator", help="serve one hospital's discriminator")
    p.add_argument("--site-id", required=True)
    p.add_argument("--data", required=True, help="site data spec (see docs/data.md)")
    p.add_argument(
        "--listen",
        help="HOST:PORT to serve on (port 0 = any; default 127.0.0.1:50061)",
    )
    p.add_argument(
        "--connect",
        default=None,
        metavar="HOST:PORT",
        help="dial out to the generator's port instead of listening (no inbound port; docs/deploy.md)",
    )
    p.add_argument(
        "--server-name",
        default="generator",
        help="with --connect and TLS: the name the generator's certificate must carry",
    )
    p.add_argument("--checkpoint-dir")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--size", type=int, default=None, help="resize slices to SIZE x SIZE")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--port-file", help="write the bound port here (for port 0)")
    add_metrics_flags(p)
    p.add_argument("--grace", type=float, default=10.0, help="seconds for in-flight calls at shutdown")
    p.add_argument("--device", default="cpu")
    add_model_flags(p)
    add_tls_flags(p)
    add_allow_flag(p, "Discriminator")
    add_privacy_flags(p)
    add_common(p)
    p.set_defaults(func=cmd_discriminator)

    p = sub.add_parser("generator", help="train the central generator against the sites")
    p.add_argument(
        "--site",
        action="append",
        type=parse_site,
        required=True,
        help="NAME=HOST:PORT: the generator dials the site; NAME: the site dials in (--connect); repeat",
    )
    p.add_argument(
        "--min-sites",
        type=int,
        default=0,
        help="sites needed to start training (0 = all); later sites join at the next step",
    )
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.add_argument("--port-file")
    add_generator_step_flags(p)
    p.add_argument("--out", help="write summary.json and samples.png here")
    p.add_argument("--heldout", help="held-out data spec for evaluation (L1)")
    p.add_argument("--serve", action="store_true", help="keep serving Synthesize after training")
    add_metrics_flags(p)
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    add_model_flags(p)
    add_tls_flags(p)
    add_allow_flag(p, "Generator")
    add_common(p)
    p.set_defaults(func=cmd_generator)

    p = sub.add_parser("demo", help="distributed training on the embedded data, all on 127.0.0.1")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--modalities", default="t1", help="e.g. t1,t2 for the multi-modality variant")
    p.add_argument("--missing", default="", help="SITE:MODALITY a site lacks, e.g. hospital-0:t2")
    p.add_argument("--subjects", type=int, default=400, help="virtual subjects per site (0 = 75 template slices)")
    p.add_argument("--privacy", default="dp", choices=["dp", "none"], help="the sites' privacy guard")
    p.add_argument("--tls", action="store_true", help="mutual TLS with a development CA (in OUT/run/certs)")
    p.add_argument(
        "--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of the processes (PASSIVE, ACTIVE, default)"
    )
    p.add_argument("--codec", default="", help="the generator's --codec")
    p.add_argument("--grad-codec", default="", help="the generator's --grad-codec")
    p.add_argument("--generator-threads", type=int, default=0, help="torch threads of the generator (0 = all)")
    p.add_argument("--site-threads", type=int, default=1, help="torch threads of each discriminator process")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="give every process a /metrics port (listed in OUT/run/metrics.json; final values in OUT/metrics.prom)",
    )
    add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synthesize", help="stream label maps to a generator, write synthetic images")
    p.add_argument("--generator", required=True, help="HOST:PORT of the generator service")
    p.add_argument("--labels", required=True, help="data spec whose label maps to use (see docs/data.md)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--style",
        default="",
        help="for a generator trained with --site-styles: render this site's scanner style (default: each in turn)",
    )
    p.add_argument("--server-name", default=None, help="expected TLS name of the generator")
    add_tls_flags(p)
    add_common(p)
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("audit", help="red-team a running discriminator as a malicious generator would")
    audit.add_arguments(p)
    add_common(p)
    p.set_defaults(func=audit.run)

    p = sub.add_parser("certs", help="development CA and certificates for mutual TLS")
    certs = p.add_subparsers(dest="certs_command", required=True)
    c = certs.add_parser("init", help="create ca.pem / ca.key")
    c.add_argument("--dir", default="certs")
    add_common(c)
    c.set_defaults(func=cmd_certs)
    c = certs.add_parser("issue", help="issue NAME.pem / NAME.key (NAME = site id or 'generator')")
    c.add_argument("names", nargs="+")
    c.add_argument("--dir", default="certs")
    c.add_argument("--host", action="append", help="extra DNS name or IP for the certificate")
    add_common(c)
    c.set_defaults(func=cmd_certs)

    from asyndgan.experiments.evaluate import add_eval_flags, cmd_eval

    p = sub.add_parser("eval", help="segmentation from synthetic vs real data, memorisation audit (docs/evaluation.md)")
    add_eval_flags(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=lambda a: cmd_eval(a, ["asyndgan", *sys.argv[1:]]))
    for leaf in _leaves(parser):
        add_config_flags(leaf)
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for p in subs[0].choices.values() for leaf in _leaves(p)]


def _target(a: argparse.Namespace) -> str:
    return str(getattr(a, "generator", None) or getattr(a, "target", None) or "the service")


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    from asyndgan.cli_config import ConfigError, apply_sources
    from asyndgan.codec import CodecError
    from asyndgan.data import DataError
    from asyndgan.errors import FailedPrecondition
    from asyndgan.rpc import explain_rpc_error

    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        sources = apply_sources(parser, args)
    except ConfigError as e:
        print(f"asyndgan: error: {e}", file=sys.stderr)
        return 2
    a = parser.parse_args(args)
    a.sources = sources
    setup_logging(a.verbose, a.log_format)
    if getattr(a, "threads", 0) > 0:
        torch.set_num_threads(a.threads)
    func: Callable[[argparse.Namespace], int] = a.func
    try:
        return func(a)
    except (UsageError, DataError, CodecError, ValueError, FailedPrecondition, OSError, RuntimeError) as e:
        if a.verbose:
            log.exception("failed")
        print(f"asyndgan {a.command}: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:  # the service answered with an error, or could not be reached
        if a.verbose:
            log.exception("failed")
        print(f"asyndgan {a.command}: error: {explain_rpc_error(e, _target(a))}", file=sys.stderr)
        sys.stderr.flush()
        # A failed stream can leave gRPC's request thread alive; exiting through interpreter shutdown then aborts
        # in C++ ("terminate called ..."). Nothing is left to clean up here: files are written atomically.
        os._exit(1)
    except KeyboardInterrupt:
        print(f"asyndgan {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
