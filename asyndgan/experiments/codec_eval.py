"""Does a wire codec cost segmentation quality? ``make eval``'s easy setting, once per (fakes, gradients) codec
pair, AsynDGAN's fakes and gradients rounded as that codec carries them (gradients with the sites' error feedback).

``python -m asyndgan.experiments.codec_eval --out results`` writes ``OUT/codecs.{json,md}`` and each run's own
``eval.{json,md,png}`` under ``OUT/codecs/NAME/``. The target (issue 15): (c)/(a) within 0.01 of the bf16 default.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asyndgan.experiments.bytes_bench import bench_bytes
from asyndgan.experiments.evaluation import run_evaluation
from asyndgan.experiments.settings import EvalOptions, default_settings
from asyndgan.experiments.tables import Report, target
from asyndgan.io import write_bytes_atomic, write_json_atomic

__all__ = ["VARIANTS", "main", "run_codec_eval"]

log = logging.getLogger(__name__)

# name -> (fakes codec, gradients codec); the first is the reference.
VARIANTS: dict[str, tuple[str, str]] = {
    "bf16": ("bf16+zstd", "bf16+zstd"),
    "q8": ("q8+zstd", "q8+zstd"),
    "q8-q2": ("q8+zstd", "q2+zstd"),
    "q4-q8": ("q4+zstd", "q8+zstd"),  # 8-bit gradients leave the fakes ~3.4 bits for a wire of 0.15 of raw
}


def _row(name: str, fakes: str, grads: str, report: dict[str, Any], wire_to_raw: float) -> dict[str, Any]:
    s = report["settings"]["easy"]
    t = s["targets"]
    return {
        "variant": name,
        "fakes": fakes,
        "gradients": grads,
        "wire_to_raw_64px": wire_to_raw,
        "a": s["conditions"]["a"]["mean"],
        "c": t["c_gt_every_b"]["c"],
        "best_b": t["c_gt_every_b"]["best_b"],
        "c_over_a": t["c_over_a"]["value"],
        "c_over_a_per_seed": t["c_over_a"]["per_seed"],
    }


def run_codec_eval(
    out: Path, variants: Sequence[str], opts: EvalOptions, bytes_steps: int = 5, reuse: bool = False
) -> dict[str, Any]:
    """One easy-setting evaluation per codec variant, then the table against the first variant. ``reuse``: a
    variant whose ``OUT/codecs/NAME/eval.json`` exists (a finished run of its own) is read, not run again."""
    easy = default_settings(quick=opts.quick)["easy"]
    rows = []
    for name in variants:
        fakes, grads = VARIANTS[name]
        setting = dataclasses.replace(easy, codec=fakes, grad_codec=grads)
        log.info("codec variant %s: fakes %s, gradients %s", name, fakes, grads)
        done = out / "codecs" / name / "eval.json"
        if reuse and done.exists():
            log.info("reusing %s", done)
            report = json.loads(done.read_text())
        else:
            report = run_evaluation([setting], opts, done.parent, ["codec_eval", name])
        wire = bench_bytes(64, 8, 3, bytes_steps, opts.threads, fakes, grads)["wire_to_raw"]
        rows.append(_row(name, fakes, grads, report, wire))
    ref = rows[0]
    for r in rows:
        r["c_over_a_minus_reference"] = r["c_over_a"] - ref["c_over_a"]
    targets = [
        target(f"{r['variant']}: (c)/(a) - {ref['variant']}'s (c)/(a)", r["c_over_a_minus_reference"], -0.01, True)
        for r in rows[1:]
    ]
    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "seeds": list(opts.seeds),
        "rows": rows,
        "targets": targets,
    }


_COLUMNS = [
    *("variant", "fakes", "gradients", "wire_to_raw_64px"),
    *("a", "best_b", "c", "c_over_a", "c_over_a_minus_reference"),
]


def _markdown(result: dict[str, Any], argv: Sequence[str]) -> str:
    report = Report()
    report.section(
        "Easy setting per wire codec (3 sites, 64 px; mean Dice on held-out real slices, mean over segmenter seeds)",
        result["rows"],
        [
            "variant",
            "fakes",
            "gradients",
            "wire_to_raw_64px",
            "a",
            "best_b",
            "c",
            "c_over_a",
            "c_over_a_minus_reference",
        ],
        [
            "wire_to_raw_64px: bytes on the wire per step / the same tensors as raw float32, from "
            "`bench_bytes` (5 training steps from initialisation, the codec's own run).",
            "Each variant trains its own G (same seed); (a) and (b) use real data only and do not depend on it.",
        ],
    )
    report.section("Targets", result["targets"], ["target", "value", "goal", "status"])
    head = [
        "# Wire codecs vs segmentation quality",
        "",
        f"Generated {result['created']} by `{' '.join(argv)}`; per-variant reports in `codecs/NAME/eval.md`.",
        "",
    ]
    return "\n".join(head + report.md)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyndgan.experiments.codec_eval", description=__doc__)
    p.add_argument("--out", default="results")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed (smoke test)")
    p.add_argument("--reuse", action="store_true", help="read variants already evaluated under OUT/codecs/")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(a.threads)
    opts = EvalOptions(
        seeds=(0,) if a.quick else (0, 1, 2),
        jobs=a.jobs,
        threads=a.threads,
        augment="first",
        audit_limit=20,
        quick=a.quick,
    )
    out = Path(a.out)
    result = run_codec_eval(out, variants, opts, bytes_steps=2 if a.quick else 5, reuse=a.reuse)
    write_json_atomic(out / "codecs.json", result)
    write_bytes_atomic(
        out / "codecs.md", _markdown(result, ["python -m asyndgan.experiments.codec_eval", *args]).encode()
    )
    log.info("wrote %s and %s", out / "codecs.json", out / "codecs.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
