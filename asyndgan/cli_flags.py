"""Flags shared by the ``asyndgan`` sub-commands and the configs built from them (env vars as defaults)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from asyndgan.algorithm import TrainConfig
from asyndgan.guard import PrivacyConfig
from asyndgan.nets import DISCRIMINATORS, GENERATORS, NetConfig
from asyndgan.rpc import TlsConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from asyndgan.metrics import MetricsHttpServer

EMBEDDED = "embedded:icbm152"


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def env(name: str, default: str | None = None) -> str | None:
    """Default for a flag from ``ASYNDGAN_<NAME>``."""
    return os.environ.get(f"ASYNDGAN_{name.upper().replace('-', '_')}", default)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--generator-net", default=env("generator_net", "auto"), choices=["auto", *sorted(GENERATORS)])
    g.add_argument(
        "--discriminator-net", default=env("discriminator_net", "patchgan_3"), choices=sorted(DISCRIMINATORS)
    )
    g.add_argument("--ngf", type=int, default=int(env("ngf", "32") or 32))
    g.add_argument("--ndf", type=int, default=int(env("ndf", "32") or 32))
    g.add_argument("--gan-mode", default=env("gan_mode", "vanilla"), choices=["vanilla", "lsgan"])
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


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=int(env("threads", "0") or 0), help="torch threads (0 = auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mutual TLS (all three or none)")
    g.add_argument("--tls-cert", default=env("tls_cert"), help="PEM certificate of this service")
    g.add_argument("--tls-key", default=env("tls_key"), help="PEM private key")
    g.add_argument("--tls-ca", default=env("tls_ca"), help="PEM CA that signs the peers")


def add_allow_flag(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument(
        "--allow-client",
        action="append",
        default=[n for n in (env("allow_client") or "").split(",") if n],
        metavar="NAME",
        help=f"with mutual TLS: only clients whose certificate names NAME may call the {who} service (repeat; "
        "default: any certificate from the CA). Health and reflection stay open to the CA's certificates.",
    )


def add_privacy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("privacy guard (docs/privacy.md)")
    g.add_argument(
        "--privacy",
        default=env("privacy", "dp"),
        choices=["dp", "none"],
        help="dp (default): differentially private discriminator, GAN-only gradients, budget enforced here; "
        "none: the paper's exchange, whose gradients let the generator rebuild this site's images",
    )
    g.add_argument("--privacy-epsilon", type=float, default=float(env("privacy_epsilon", "8") or 8))
    g.add_argument("--privacy-delta", type=float, default=float(env("privacy_delta", "1e-5") or 1e-5))
    g.add_argument("--privacy-noise", type=float, default=0.0, help="noise multiplier sigma (0 = fit --privacy-steps)")
    g.add_argument("--privacy-steps", type=int, default=1000, help="steps the budget is planned for")
    g.add_argument("--privacy-clip", type=float, default=1.0, help="per-subject gradient clip C of D")
    g.add_argument("--privacy-sample", type=int, default=0, help="expected subjects per D step (0 = batch size)")
    g.add_argument("--privacy-ledger", default=env("privacy_ledger"), help="budget ledger file")
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
    port = env("metrics_port")
    g.add_argument(
        "--metrics-port",
        type=int,
        default=int(port) if port else None,
        help="serve /metrics on this port (0 = any free port; default: no metrics)",
    )
    g.add_argument(
        "--metrics-host", default=env("metrics_host", "127.0.0.1"), help="address for /metrics (0.0.0.0 in a pod)"
    )
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
