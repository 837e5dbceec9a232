"""Flags shared by the ``asyndgan`` sub-commands and the configs built from them (:mod:`asyndgan.cli_config`
sets their defaults from the environment and the config file)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from asyndgan.algorithm import TrainConfig
from asyndgan.guard import PrivacyConfig
from asyndgan.nets import DISCRIMINATORS, GENERATORS, NetConfig
from asyndgan.rpc import TlsConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from asyndgan.metrics import MetricsHttpServer
    from asyndgan.services.generator.service import GeneratorConfig

EMBEDDED = "embedded:icbm152"


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--generator-net", default="auto", choices=["auto", *sorted(GENERATORS)])
    g.add_argument("--discriminator-net", default="patchgan_3", choices=sorted(DISCRIMINATORS))
    g.add_argument("--ngf", type=int, default=32)
    g.add_argument("--ndf", type=int, default=32)
    g.add_argument("--gan-mode", default="vanilla", choices=["vanilla", "lsgan"])
    g.add_argument("--lambda-l1", type=float, default=100.0)
    g.add_argument("--lr", type=float, default=2e-4)


def net_config(a: argparse.Namespace) -> NetConfig:
    return NetConfig(
        generator=a.generator_net,
        discriminator=a.discriminator_net,
        ngf=a.ngf,
        ndf=a.ndf,
        gan_mode=a.gan_mode,
    )


def train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(lr_g=a.lr, lr_d=a.lr, lambda_l1=a.lambda_l1)


def add_generator_step_flags(p: argparse.ArgumentParser) -> None:
    """How the generator runs a step: codecs, deadline, gradient check, step variant, weight average."""
    p.add_argument("--codec", default="", help="codec for images and gradients, e.g. bf16+zstd (default), f32")
    p.add_argument(
        "--grad-codec",
        default="",
        help="codec for the sites' gradients instead of --codec, e.g. q8+zstd (8 bits, error feedback at the site)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=60.0,
        help="most seconds a site has per step (adapts below this to each site's latency, floor 5 s)",
    )
    p.add_argument("--max-grad-norm", type=float, default=1e3, help="drop a site gradient above this L2 norm")
    step = p.add_mutually_exclusive_group()
    step.add_argument(
        "--pipeline",
        action="store_true",
        help="forward/send and backward per site, overlapping the sites' round trips (same step; costs G's "
        "batch efficiency; README, Results)",
    )
    step.add_argument(
        "--stale",
        action="store_true",
        help="apply each batch's gradients one step late, so that G's backward pass overlaps the sites' work and "
        "round trips (changes the algorithm: the asynchronous variant; README, Results)",
    )
    p.add_argument(
        "--site-styles",
        action="store_true",
        help="G also takes the site whose scanner it renders (one input plane per --site, in their order); "
        "Synthesize then renders a named site's style or every site's in turn (README, Site styles)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=TrainConfig.ema,
        metavar="DECAY",
        help="Synthesize, samples and the held-out L1 use a moving average of G's weights with this decay "
        "(0 = G itself; checkpoints keep both)",
    )


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mutual TLS (all three or none)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate of this service")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signs the peers")


def add_allow_flag(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument(
        "--allow-client",
        action="append",
        default=[],
        metavar="NAME",
        help=f"with mutual TLS: only clients whose certificate names NAME may call the {who} service (repeat; "
        "default: any certificate from the CA). Health and reflection stay open to the CA's certificates.",
    )


def add_privacy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("privacy guard (docs/privacy.md)")
    g.add_argument(
        "--privacy",
        default="dp",
        choices=["dp", "none"],
        help="dp (default): differentially private discriminator, GAN-only gradients, budget enforced here; "
        "none: the paper's exchange, whose gradients let the generator rebuild this site's images",
    )
    g.add_argument("--privacy-epsilon", type=float, default=8.0)
    g.add_argument("--privacy-delta", type=float, default=1e-5)
    g.add_argument("--privacy-noise", type=float, default=0.0, help="noise multiplier sigma (0 = fit --privacy-steps)")
    g.add_argument("--privacy-steps", type=int, default=1000, help="steps the budget is planned for")
    g.add_argument("--privacy-clip", type=float, default=1.0, help="per-subject gradient clip C of D")
    g.add_argument("--privacy-sample", type=int, default=0, help="expected subjects per D step (0 = batch size)")
    g.add_argument("--privacy-ledger", default=None, help="budget ledger file")
    g.add_argument("--privacy-insecure-seed", type=int, default=None, help=argparse.SUPPRESS)  # tests only


def privacy_config(a: argparse.Namespace) -> PrivacyConfig:
    return PrivacyConfig(
        mode=a.privacy,
        epsilon=a.privacy_epsilon,
        delta=a.privacy_delta,
        noise_multiplier=a.privacy_noise,
        planned_steps=a.privacy_steps,
        clip=a.privacy_clip,
        sample_size=a.privacy_sample,
        ledger=Path(a.privacy_ledger) if a.privacy_ledger else None,
        insecure_seed=a.privacy_insecure_seed,
    )


def tls_config(a: argparse.Namespace) -> TlsConfig | None:
    given = [a.tls_cert, a.tls_key, a.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("--tls-cert, --tls-key and --tls-ca go together")
    for f in given:
        if not Path(f).is_file():
            raise UsageError(f"TLS file not found: {f}")
    return TlsConfig(Path(a.tls_cert), Path(a.tls_key), Path(a.tls_ca))


def parse_site(value: str) -> tuple[str, str | None]:
    """NAME=HOST:PORT (the generator dials the site) or NAME (the site dials out to the generator)."""
    name, sep, address = value.partition("=")
    if not sep and name and ":" not in name:
        return name, None
    host, colon, port = address.rpartition(":")
    if not sep or not name or not colon or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT or NAME (a dial-out site), got {value!r}")
    return name, address


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Prometheus metrics (see docs/observability.md)")
    g.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics on this port (0 = any free port; default: no metrics)",
    )
    g.add_argument("--metrics-host", default="127.0.0.1", help="address for /metrics (0.0.0.0 in a pod)")
    g.add_argument("--metrics-port-file", default=None, help="write the bound metrics port here (for port 0)")


def start_metrics(a: argparse.Namespace, service: str) -> tuple[CollectorRegistry | None, MetricsHttpServer | None]:
    """A fresh registry served on ``--metrics-port``, or (None, None) when metrics are off."""
    from asyndgan.io import write_bytes_atomic
    from asyndgan.metrics import make_registry, start_metrics_http

    if a.metrics_port is None:
        return None, None
    registry = make_registry(service)
    http = start_metrics_http(a.metrics_port, registry, a.metrics_host)
    if a.metrics_port_file:
        write_bytes_atomic(Path(a.metrics_port_file), str(http.port).encode())
    return registry, http


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """--config and --log-format, on every sub-command (their defaults come from :mod:`asyndgan.cli_config`)."""
    p.add_argument("--config", metavar="FILE", help="TOML file with flag values (flags > ASYNDGAN_* > file)")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(verbose: bool, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # force: a library (opacus) may have put a handler on the root logger at import
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


def generator_config(a: argparse.Namespace) -> GeneratorConfig:
    from asyndgan.services.generator.orchestrator import OrchestratorConfig
    from asyndgan.services.generator.service import GeneratorConfig

    codec_name = a.codec or None
    train = dataclasses.replace(train_config(a), ema=a.ema)
    train.validate()  # now, not once the sites are in
    return GeneratorConfig(
        sites=tuple(a.site),
        iterations=a.iterations,
        checkpoint_dir=Path(a.checkpoint_dir),
        listen=a.listen,
        resume=a.resume,
        checkpoint_every=a.checkpoint_every,
        seed=a.seed,
        net=net_config(a),
        train=train,
        orchestrator=OrchestratorConfig(
            step_deadline_s=a.deadline,
            image_codec=codec_name or OrchestratorConfig.image_codec,
            grad_codec=a.grad_codec or codec_name or OrchestratorConfig.grad_codec,
        ),
        out=Path(a.out) if a.out else None,
        heldout=a.heldout,
        port_file=Path(a.port_file) if a.port_file else None,
        tls=tls_config(a),
        allowed_clients=tuple(a.allow_client),
        max_grad_norm=a.max_grad_norm,
        pipeline=a.pipeline,
        stale=a.stale,
        site_styles=a.site_styles,
        device=a.device,
        min_sites=a.min_sites,
    )
