"""``asyndgan audit``: red-team your own running discriminator the way a malicious generator would.

Three attacks (see docs/privacy.md, "Auditing a site"):

* ``active``  -- chosen fakes + gradient signs (:func:`asyndgan.clients.attacks.run_active`);
* ``passive`` -- an honest-but-curious generator that only keeps what a normal training run hands it
  (:func:`asyndgan.clients.attacks.run_passive`);
* ``membership`` -- on a released generator: does G(label) reconstruct training slices better than held-out
  ones? (ROC AUC of the reconstruction error, :func:`membership_attack`).

The attacks see only what the protocol gives a generator. The site's data (``--data``) is read only to score
what they recovered: per real slice, PSNR of the reconstruction (data range 2, images in [-1, 1]) against a
public-knowledge baseline (the mean intensity of each label class painted on the label map).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyndgan.clients.attacks import AttackRun, AuditError, SiteClient, SliceBook, run_active, run_passive
from asyndgan.data import DataError, SiteData, load_site
from asyndgan.io import write_json_atomic
from asyndgan.messages import SiteDescription
from asyndgan.rpc import TlsConfig, explain_rpc_error

__all__ = [
    "AuditError",
    "Match",
    "Score",
    "add_arguments",
    "augmented_views",
    "class_mean_baseline",
    "match_slices",
    "membership_attack",
    "psnr",
    "reconstruction_errors",
    "reconstructions",
    "roc_auc",
    "run",
    "score_generator",
    "score_run",
    "score_slices",
]

log = logging.getLogger(__name__)

GOOD_DB = 30.0  # a slice reconstructed at >= 30 dB is a recognisable copy of the real image
LEAK_MARGIN_DB = 1.0  # an attack leaks when its median beats the public-knowledge baseline by more than this
LEAK_AUC = 0.60
PSNR_CAP_DB = 150.0  # float32 round-off; keeps the JSON finite
MAX_STEPS = 100_000


# -- scores ----------------------------------------------------------------------------------------------


def psnr(estimate: np.ndarray, real: np.ndarray) -> float:
    """PSNR in dB for images in [-1, 1] (data range 2), capped at PSNR_CAP_DB."""
    mse = float(np.mean((np.asarray(estimate, np.float64) - np.asarray(real, np.float64)) ** 2))
    return PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, 10.0 * math.log10(4.0 / mse))


@dataclass(frozen=True)
class Score:
    """Per real slice PSNR (None: the attack never saw the slice) and its summary."""

    per_slice: list[float | None]

    @property
    def seen(self) -> int:
        return sum(v is not None for v in self.per_slice)

    @property
    def median_db(self) -> float:
        vals = [v for v in self.per_slice if v is not None]
        return float(np.median(vals)) if vals else math.nan

    @property
    def share_good(self) -> float:
        """Share of all the site's slices (unseen ones count as not recovered) at >= GOOD_DB."""
        return sum(v is not None and v >= GOOD_DB for v in self.per_slice) / max(len(self.per_slice), 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_psnr_db": _finite(self.median_db),
            "share_ge_30db": round(self.share_good, 4),
            "slices": len(self.per_slice),
            "slices_seen": self.seen,
            "per_slice_psnr_db": [None if v is None else round(v, 2) for v in self.per_slice],
        }


def _finite(x: float) -> float | None:
    return round(x, 2) if math.isfinite(x) else None


def score_slices(estimates: dict[int, np.ndarray], data: SiteData) -> Score:
    """Score ``estimates`` (slice index -> (M, H, W) in the data's channel order) against the real slices."""
    return Score([psnr(estimates[i], data.images[i]) if i in estimates else None for i in range(len(data))])


def class_mean_baseline(data: SiteData) -> np.ndarray:
    """The public-knowledge guess (N, M, H, W): per modality, the mean real intensity of each label class
    over the site's data, painted on each slice's label map."""
    k = data.num_classes
    counts = np.bincount(data.labels.ravel(), minlength=k).astype(np.float64)
    out = np.empty_like(data.images)
    for m in range(data.images.shape[1]):
        sums = np.bincount(data.labels.ravel(), weights=data.images[:, m].ravel(), minlength=k)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), -1.0).astype(np.float32)
        out[:, m] = means[data.labels]
    return out


@dataclass(frozen=True)
class Match:
    """A key's first view is ``fliplr?(slice)[y + dy, x + dx]`` with ``mismatches`` differing labels."""

    slice: int
    flip: bool
    dy: int
    dx: int
    mismatches: int = 0


def augmented_views(labels: np.ndarray, max_shift: int) -> dict[bytes, tuple[int, bool, int, int]]:
    """Every label map the site's sampler can emit -> (slice, flip, dy, dx), as ``BatchSampler.next`` builds
    them: ``view[y, x] = fliplr?(slice)[y + dy, x + dx]``, label 0 outside."""
    s = max_shift
    h, w = labels.shape[1:]
    table: dict[bytes, tuple[int, bool, int, int]] = {}
    for i, lab in enumerate(labels):
        for flip in (False, True):
            padded = np.pad(lab[:, ::-1] if flip else lab, s, constant_values=0)
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    view = np.ascontiguousarray(padded[s + dy : s + dy + h, s + dx : s + dx + w])
                    table.setdefault(view.tobytes(), (i, flip, dy, dx))
    return table


def _nearest_view(view: np.ndarray, labels: np.ndarray, max_shift: int) -> Match:
    """The augmentation of a real slice with the fewest label mismatches against ``view``."""
    s = max_shift
    h, w = view.shape
    best = Match(-1, False, 0, 0, view.size + 1)
    for i, lab in enumerate(labels):
        for flip in (False, True):
            padded = np.pad(lab[:, ::-1] if flip else lab, s, constant_values=0)
            mis = (np.lib.stride_tricks.sliding_window_view(padded, (h, w)) != view).sum(axis=(2, 3))
            y, x = np.unravel_index(int(np.argmin(mis)), mis.shape)
            if int(mis[y, x]) < best.mismatches:
                best = Match(i, flip, int(y) - s, int(x) - s, int(mis[y, x]))
    return best


def match_slices(book: SliceBook, data: SiteData, max_shift: int = 2) -> dict[int, Match]:
    """Key -> the real slice and augmentation of the key's first view, by exact label match (else fewest
    mismatches). Scoring only: this is the one place the site's data meets what the attack collected."""
    if data.labels.shape[1:] != (book.height, book.width):
        raise AuditError(f"--data has {data.labels.shape[1:]} slices but the site sends {book.height, book.width}")
    table = augmented_views(data.labels, max_shift)
    out = {}
    for k, canvas in enumerate(book.slices):
        hit = table.get(np.ascontiguousarray(canvas.first_view).tobytes())
        out[k] = Match(*hit, 0) if hit is not None else _nearest_view(canvas.first_view, data.labels, max_shift)
    return out


def _channel_order(have: Sequence[str], want: Sequence[str], what: str) -> list[int]:
    missing = [m for m in want if m not in have]
    if missing:
        raise AuditError(f"{what} has no channel for modalities {missing} (it has {list(have)})")
    return [list(have).index(m) for m in want]


def reconstructions(run: AttackRun, data: SiteData, how: str = "midpoint") -> dict[int, np.ndarray]:
    """Real slice index -> the attack's estimate of it (M, H, W), in the data's channel order. Where several
    keys map to one slice, the most visited one counts."""
    book, m = run.book, run.book.margin
    order = _channel_order(run.site.modalities, data.modalities, "the site")
    best: dict[int, tuple[int, np.ndarray]] = {}
    for k, mt in match_slices(book, data, m // 2).items():
        visits = book.slices[k].visits
        if mt.slice in best and best[mt.slice][0] >= visits:
            continue
        est = book.estimate(k, how)[:, m - mt.dy : m - mt.dy + book.height, m - mt.dx : m - mt.dx + book.width]
        est = est[:, :, ::-1] if mt.flip else est
        best[mt.slice] = (visits, np.ascontiguousarray(est[order]))
    return {i: e for i, (_, e) in best.items()}


def score_run(run: AttackRun, data: SiteData, how: str = "midpoint") -> Score:
    """PSNR of an attack's reconstructions against the site's real slices."""
    return score_slices(reconstructions(run, data, how), data)


@torch.no_grad()
def score_generator(run: AttackRun, data: SiteData, batch_size: int = 32) -> Score:
    """The passive attack's G, run on the site's own (unaugmented) label maps, scored like a reconstruction."""
    if run.generator is None:
        raise ValueError("this run trained no generator")
    gen = run.generator
    order = _channel_order(gen.modalities, data.modalities, "the generator")
    outs = [gen.synthesize(torch.from_numpy(data.labels[i : i + batch_size])) for i in range(0, len(data), batch_size)]
    images = torch.cat(outs).numpy()[:, order]
    return score_slices(dict(enumerate(images)), data)


# -- membership ------------------------------------------------------------------------------------------


def roc_auc(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties count 1/2 (Mann-Whitney U)."""
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over runs of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # 1-based mean rank of positions a..b-1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def reconstruction_errors(synthetic: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Per slice mean squared error between G(label) and the real image (N,)."""
    diff = np.asarray(synthetic, np.float64) - np.asarray(real, np.float64)
    return (diff**2).reshape(len(diff), -1).mean(axis=1)


def membership_attack(
    generator: str,
    members: SiteData,
    nonmembers: SiteData,
    *,
    tls: TlsConfig | None = None,
    server_name: str | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Score training (member) vs held-out slices by G's reconstruction error; lower error => member."""
    import grpc

    from asyndgan.clients.generator_client import GeneratorClient

    errors = []
    try:
        with GeneratorClient(generator, tls=tls, server_name=server_name, timeout=timeout) as client:
            for data in (members, nonmembers):
                images, names = client.synthesize(data.labels)
                order = _channel_order(names, data.modalities, "the generator")
                errors.append(reconstruction_errors(images[:, order], data.images))
    except grpc.RpcError as e:
        raise AuditError(f"generator: Synthesize failed: {explain_rpc_error(e, generator, server_name)}") from None
    auc = roc_auc(-errors[0], -errors[1])
    return {
        "auc": round(auc, 4),
        "members": len(members),
        "nonmembers": len(nonmembers),
        "member_mse_median": float(np.median(errors[0])),
        "nonmember_mse_median": float(np.median(errors[1])),
        "leaks": auc > LEAK_AUC,
    }


# -- the command -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``asyndgan audit`` (the CLI adds --threads, --seed and -v)."""
    parser.add_argument("--target", help="HOST:PORT of the discriminator to audit (active and passive attacks)")
    parser.add_argument("--data", help="the site's data spec, read only to score (the training data for membership)")
    parser.add_argument("--size", type=int, default=None, help="resize --data/--heldout slices to SIZE x SIZE")
    parser.add_argument("--attack", choices=["active", "passive", "membership", "all"], default="all")
    parser.add_argument("--steps", type=int, default=200, help="Steps per reconstruction attack (bounded)")
    parser.add_argument("--generator", help="HOST:PORT of a released generator (membership inference)")
    parser.add_argument("--heldout", help="data spec of slices the generator never trained on (membership)")
    parser.add_argument("--max-shift", type=int, default=2, help="the site's augmentation shift (pixels)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per RPC")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--fail-on-leak", action="store_true", help="exit 1 if any attack beats the baseline")
    parser.add_argument("--server-name", default=None, help="expected TLS name of the discriminator/generator")
    g = parser.add_argument_group("mutual TLS (all three or none)")
    g.add_argument("--tls-cert", help="PEM certificate of the auditing client")
    g.add_argument("--tls-key", help="PEM private key")
    g.add_argument("--tls-ca", help="PEM CA that signs the services")


def _tls(a: argparse.Namespace) -> TlsConfig | None:
    given = [a.tls_cert, a.tls_key, a.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise AuditError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    for p in given:
        if not Path(p).is_file():
            raise AuditError(f"TLS file not found: {p}")
    return TlsConfig(Path(a.tls_cert), Path(a.tls_key), Path(a.tls_ca))


def _attacks(a: argparse.Namespace) -> list[str]:
    wanted = ["active", "passive", "membership"] if a.attack == "all" else [a.attack]
    if a.attack == "all" and not a.generator:
        log.info("no --generator given: skipping the membership attack")
        wanted.remove("membership")
    if {"active", "passive"} & set(wanted) and not a.target:
        raise AuditError("--target HOST:PORT (the discriminator) is required for the reconstruction attacks")
    if "membership" in wanted and not (a.generator and a.heldout):
        raise AuditError("the membership attack needs --generator HOST:PORT and --heldout SPEC")
    if not a.data:
        raise AuditError("--data SPEC (the site's data, used only to score) is required")
    if not 1 <= a.steps <= MAX_STEPS:
        raise AuditError(f"--steps must be in [1, {MAX_STEPS}]")
    return wanted


def _load(spec: str, size: int | None, what: str) -> SiteData:
    try:
        return load_site(spec, size=size)
    except DataError as e:
        raise AuditError(f"{what}: {e}") from None


def _reconstruction_report(run: AttackRun, data: SiteData, baseline: Score, how: str) -> dict[str, Any]:
    score = score_run(run, data, how)
    inexact = sum(m.mismatches > 0 for m in match_slices(run.book, data, run.book.margin // 2).values())
    if inexact > len(run.book.slices) // 10:
        log.warning("%d of %d slices the site sent match no slice of --data exactly: is it this site's data?",
                    inexact, len(run.book.slices))  # fmt: skip
    out = score.as_dict() | {
        "steps": run.steps,
        "seconds": round(run.seconds, 2),
        "keys": len(run.book.slices),
        "keys_without_exact_match": inexact,
        "estimator": how,
        "leaks": score.median_db > baseline.median_db + LEAK_MARGIN_DB,
    }
    if run.stopped:
        out["stopped"] = run.stopped
    return out


def _site_dict(info: SiteDescription) -> dict[str, Any]:
    return {
        "site_id": info.site_id,
        "num_samples": info.num_samples,
        "modalities": list(info.modalities),
        "height": info.height,
        "width": info.width,
        "privacy": info.privacy.mode,
    }


def _reconstruct(a: argparse.Namespace, wanted: list[str], data: SiteData, tls: TlsConfig | None) -> dict[str, Any]:
    seed = int(vars(a).get("seed") or 0)  # --seed comes with the CLI's common flags
    attacks: dict[str, Any] = {}
    baseline = score_slices(dict(enumerate(class_mean_baseline(data))), data)
    with SiteClient(a.target, tls=tls, server_name=a.server_name, timeout=a.timeout) as client:
        info = client.describe()
        if (info.height, info.width) != data.labels.shape[1:]:
            raise AuditError(f"the site sends {info.height}x{info.width} slices; --data gives {data.labels.shape[1:]}")
        report: dict[str, Any] = {"site": _site_dict(info)}
        # Passive first: it is a normal training run, so it should meet the site's D as a real run would.
        if "passive" in wanted:
            log.info("passive attack: training a G for up to %d Steps against %s", a.steps, a.target)
            result = run_passive(client, a.steps, seed=seed, max_shift=a.max_shift)
            attacks["passive"] = _reconstruction_report(result, data, baseline, "projection")
            attacks["passive"]["midpoint_median_psnr_db"] = _finite(score_run(result, data, "midpoint").median_db)
            attacks["passive"]["generator_output"] = score_generator(result, data).as_dict()
        if "active" in wanted:
            log.info("active attack: up to %d Steps against %s", a.steps, a.target)
            result = run_active(client, a.steps, max_shift=a.max_shift)
            attacks["active"] = _reconstruction_report(result, data, baseline, "midpoint")
    report["baseline"] = baseline.as_dict()
    report["attacks"] = attacks
    return report


def _summary(report: dict[str, Any]) -> None:
    base = report.get("baseline", {})
    for name, r in report["attacks"].items():
        if name == "membership":
            flag = "  LEAKS" if r["leaks"] else ""
            log.info(
                "membership: ROC AUC %.3f (%d training vs %d held-out slices)%s",
                r["auc"],
                r["members"],
                r["nonmembers"],
                flag,
            )
            continue
        flag = "  LEAKS" if r["leaks"] else ""
        log.info(
            "%s: median PSNR %s dB, %.0f %% of slices >= 30 dB after %d Steps (%.1f s); baseline %s dB%s",
            name,
            r["median_psnr_db"],
            100 * r["share_ge_30db"],
            r["steps"],
            r["seconds"],
            base.get("median_psnr_db"),
            flag,
        )


def run(args: argparse.Namespace) -> int:
    """``asyndgan audit``; raises AuditError (one line) on bad input or an unreachable service."""
    wanted = _attacks(args)
    tls = _tls(args)
    data = _load(args.data, args.size, "--data")
    report: dict[str, Any] = {"target": args.target, "attacks": {}}
    if {"active", "passive"} & set(wanted):
        report |= _reconstruct(args, wanted, data, tls)
    if "membership" in wanted:
        heldout = _load(args.heldout, args.size, "--heldout")
        report["generator"] = args.generator
        report["attacks"]["membership"] = membership_attack(
            args.generator, data, heldout, tls=tls, server_name=args.server_name, timeout=max(args.timeout, 300.0)
        )
    report["leaks"] = any(r["leaks"] for r in report["attacks"].values())
    _summary(report)
    if args.out:
        write_json_atomic(Path(args.out), report)
        log.info("report written to %s", args.out)
    return 1 if args.fail_on_leak and report["leaks"] else 0
