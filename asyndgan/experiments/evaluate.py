"""Command line of the evaluation: ``asyndgan eval`` (flags added by :func:`add_eval_flags`, run by
:func:`cmd_eval`) and ``python -m asyndgan.experiments.evaluate`` (the same flags plus --threads and -v).

Segmentation from synthetic vs real data and the memorisation audit (:mod:`.evaluation`;
``docs/evaluation.md``): writes ``OUT/eval.json``, ``OUT/eval.md`` and ``OUT/eval.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asyndgan.data import DataError
from asyndgan.experiments.eval_report import pm
from asyndgan.experiments.evaluation import run_evaluation
from asyndgan.experiments.settings import EvalOptions, Setting, default_settings

__all__ = ["DESCRIPTION", "add_eval_flags", "cmd_eval", "main", "settings_from_args"]

log = logging.getLogger(__name__)

DESCRIPTION = "segmentation from synthetic vs real data, memorisation audit (docs/evaluation.md)"


def _add_generator_flags(p: argparse.ArgumentParser) -> None:
    """Overrides of how the evaluation's generators train."""
    p.add_argument("--generator-seed", type=int, default=0)
    p.add_argument("--gen-steps", type=int, help="override: generator steps (the cap; G stops earlier once converged)")
    p.add_argument("--budget-minutes", type=float, help="G's training time budget per generator (default: none)")
    p.add_argument(
        "--g-patience",
        type=int,
        help="G stops after this many 50-step windows without a 1 %% gain (default: easy 3, hard 6)",
    )
    p.add_argument("--gen-batch", type=int, help="override: generator batch per site")
    p.add_argument(
        "--g-ema", type=float, metavar="DECAY", help="both generators' images from a moving average of their weights"
    )
    p.add_argument(
        "--stale", action="store_true", help="AsynDGAN G applies each batch's gradients one step late (opt-in variant)"
    )
    p.add_argument(
        "--site-styles",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="AsynDGAN G also takes the site whose scanner it renders (default: per setting)",
    )
    p.add_argument("--ngf", type=int, help="override: generator width")
    p.add_argument("--ndf", type=int, help="override: discriminator width")
    p.add_argument("--curve-points", type=int, help="override: G snapshots on the (c)/(a) curve")
    p.add_argument(
        "--codec", help="override: AsynDGAN's fakes and gradients rounded as this wire codec carries them (default f32)"
    )
    p.add_argument("--grad-codec", help="override: the gradients' wire codec instead of --codec (e.g. q4+zstd)")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``asyndgan eval`` (the caller adds --threads/--seed/-v or not)."""
    p.add_argument("--setting", action="append", choices=["easy", "hard"], help="embedded settings (default: both)")
    p.add_argument("--sites", type=int, default=3, help="simulated hospitals in the embedded settings")
    p.add_argument(
        "--site", action="append", help="site data spec, repeat per site (custom setting instead of easy/hard)"
    )
    p.add_argument(
        "--heldout",
        action="append",
        help="held-out data spec for --site, repeat to pool several (default: cut a contiguous block from every site)",
    )
    p.add_argument(
        "--shifted",
        action="append",
        help="with --site: a second test set from a domain no site has (e.g. another scanner); Dice only",
    )
    p.add_argument("--holdout-fraction", type=float, default=0.15, help="without --heldout: held-out share per site")
    p.add_argument("--holdout-gap", type=int, default=4, help="without --heldout: slices dropped on each side")
    p.add_argument("--size", type=int, default=None, help="slice size for --site data (embedded settings fix theirs)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (32 px, few steps, one seed)")
    p.add_argument("--seeds", type=int, default=None, help="segmenter seeds 0..N-1 (default 3; quick 1)")
    _add_generator_flags(p)
    p.add_argument("--seg-steps", type=int, help="override: segmenter steps")
    p.add_argument("--seg-batch", type=int, help="override: segmenter batch")
    p.add_argument("--seg-base", type=int, help="override: segmenter width")
    p.add_argument(
        "--seg-contrast",
        action="store_true",
        help="segmenters train with random contrast on every channel (nnU-Net's gamma/brightness ranges)",
    )
    p.add_argument(
        "--augment",
        choices=["all", "first"],
        default=None,
        help="(e) for every site or the first (default all; quick first)",
    )
    p.add_argument("--audit-limit", type=int, default=0, help="at most this many synthetic images per audit group")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1 = everything in this process)")
    p.add_argument("--out", default="results", help="directory for eval.json, eval.md, eval.png")


def _custom_setting(a: argparse.Namespace) -> Setting:
    """The setting of ``--site`` specs (quick sizes with ``--quick``)."""
    base = Setting(
        "custom",
        f"{len(a.site)} sites from --site specs",
        tuple(a.site),
        tuple(a.heldout or ()),
        size=a.size,
        shifted_specs=tuple(a.shifted or ()),
        holdout_fraction=a.holdout_fraction,
        holdout_gap=a.holdout_gap,
        seg_from_task=True,
    )
    if not a.quick:
        return base
    q = default_settings(quick=True)["easy"]
    return dataclasses.replace(
        base,
        gen_steps=q.gen_steps,
        gen_batch=q.gen_batch,
        ngf=q.ngf,
        ndf=q.ndf,
        curve_points=q.curve_points,
        seg=q.seg,
        seg_from_task=False,
    )


def _with_overrides(s: Setting, a: argparse.Namespace) -> Setting:
    """``s`` with the override flags that were given."""
    given = {"gen_steps": a.gen_steps, "gen_batch": a.gen_batch, "ngf": a.ngf, "ndf": a.ndf}
    given["gen_budget_minutes"] = a.budget_minutes
    given["gen_patience"] = a.g_patience
    given["curve_points"] = a.curve_points
    given["codec"] = a.codec
    given["grad_codec"] = a.grad_codec
    given["gen_ema"] = a.g_ema
    given["gen_stale"] = a.stale or None
    given["site_styles"] = a.site_styles
    over: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    seg_given = {"steps": a.seg_steps, "batch_size": a.seg_batch, "base": a.seg_base}
    seg_over = {k: v for k, v in seg_given.items() if v is not None}
    if seg_over:  # the user's segmenter, not one sized from the task
        over["seg"] = dataclasses.replace(s.seg, **seg_over)
        over["seg_from_task"] = False
    if a.seg_contrast:  # a training recipe, not a size: kept when the task sizes the segmenter
        over["seg"] = dataclasses.replace(over.get("seg", s.seg), contrast=True)
    s = dataclasses.replace(s, **over)
    s.validate()
    return s


def settings_from_args(a: argparse.Namespace) -> list[Setting]:
    if a.site:
        chosen = [_custom_setting(a)]
    else:
        if a.heldout or a.shifted:
            raise ValueError("--heldout and --shifted go with --site")
        defaults = default_settings(quick=a.quick, sites=a.sites)
        chosen = [defaults[n] for n in (a.setting or ["easy", "hard"])]
    return [_with_overrides(s, a) for s in chosen]


def cmd_eval(a: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    threads = getattr(a, "threads", 0) or 2
    torch.set_num_threads(threads)
    n_seeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    if n_seeds < 1:
        raise ValueError("--seeds must be >= 1")
    opts = EvalOptions(
        seeds=tuple(range(n_seeds)),
        gen_seed=a.generator_seed,
        jobs=a.jobs,
        threads=threads,
        augment=a.augment or ("first" if a.quick else "all"),
        audit_limit=a.audit_limit,
        quick=a.quick,
    )
    report = run_evaluation(settings_from_args(a), opts, Path(a.out), argv)
    for name, s in report["settings"].items():
        t = s["targets"]
        log.info(
            "%s: (a) %s  (c) %s  (d) %s  (c)/(a) %.4f  targets: c>=0.98a %s, c>every b %s, e>=a %s",
            name,
            pm(s["conditions"]["a"]),
            pm(s["conditions"]["c"]),
            pm(s["conditions"]["d"]),
            t["c_over_a"]["value"],
            t["c_over_a"]["met"],
            t["c_gt_every_b"]["met"],
            t.get("e_ge_a", {}).get("met"),
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyndgan.experiments.evaluate", description=DESCRIPTION)
    add_eval_flags(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (split across --jobs workers)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    try:
        return cmd_eval(a, ["python", "-m", "asyndgan.experiments.evaluate", *args])
    except (DataError, ValueError, OSError) as e:
        print(f"asyndgan eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
