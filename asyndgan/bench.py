"""``make bench``: measured numbers for the codec, the training step, and the distributed overhead.

Every figure printed here is measured on this machine when the command runs; nothing is hard-coded.
Sizes are flags, so a quick run (``--quick``) and the full run share one code path.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyndgan import codec
from asyndgan.algorithm import SiteTrainer, TrainConfig
from asyndgan.data import load_site
from asyndgan.io import write_json_atomic
from asyndgan.local import LocalRun, train_local
from asyndgan.nets import NetConfig

log = logging.getLogger("asyndgan.bench")

CODECS = ["f32", "f32+zstd", "f32+lz4", "bf16", "bf16+zstd", "bf16+lz4", "f16", "f16+zstd"]
LABEL_CODECS = ["u8", "u8+zstd", "u8+lz4"]


def _best_of(fn: Callable[[], object], repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


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


def bench_local_step(size: int, batch: int, sites: int, steps: int, threads: int) -> dict[str, Any]:
    """Seconds per in-process AsynDGAN step (all sites' D steps + one G step), after warm-up."""
    torch.set_num_threads(threads)
    data = [load_site(f"embedded:icbm152?site={j}&of={sites}&size={size}") for j in range(sites)]
    result = train_local(data, None, NetConfig(), TrainConfig(), LocalRun(iterations=steps, batch_size=batch), None)
    return {
        "size": size,
        "batch": batch,
        "sites": sites,
        "threads": threads,
        "steps": steps,
        "seconds_per_step": result.summary["seconds_per_step_steady"],
    }


def bench_distributed(
    size: int, batch: int, sites: int, steps: int, gen_threads: int, site_threads: int
) -> dict[str, Any]:
    """The demo's processes (N sites + generator) on loopback; steady seconds per step and bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "asyndgan.cli",
            "demo",
            "--sites",
            str(sites),
            "--iterations",
            str(steps),
            "--size",
            str(size),
            "--batch-size",
            str(batch),
            "--out",
            tmp,
            "--generator-threads",
            str(gen_threads),
            "--site-threads",
            str(site_threads),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
        s = json.loads((Path(tmp) / "summary.json").read_text())
    wire = s["wire_bytes_sent"] + s["wire_bytes_received"]
    return {
        "size": size,
        "batch": batch,
        "sites": sites,
        "steps": steps,
        "generator_threads": gen_threads,
        "site_threads": site_threads,
        "seconds_per_step": s["seconds_per_step_steady"],
        "wire_bytes_per_step": wire / s["iterations"],
        "raw_f32_bytes_per_step": s["payload_bytes"] / s["iterations"],
        "wire_to_raw": wire / s["payload_bytes"],
    }


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="asyndgan.bench", description=__doc__)
    p.add_argument("--out", default="results/bench.json")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sections", default="codec,step,distributed")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    steps = 6 if a.quick else a.steps
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "machine": {"cpus": cores, "python": platform.python_version(), "torch": torch.__version__}
    }
    sections = set(a.sections.split(","))
    if "codec" in sections:
        torch.set_num_threads(1)
        rows = bench_codecs(32 if a.quick else 64, 8, 3 if a.quick else 20)
        results["codec"] = rows
        print("\n## Codec (batch 8, 64 px; GB/s of raw float32/uint8 bytes; 1 thread)\n")
        print(_table(rows, ["tensor", "codec", "ratio", "encode_GBps", "decode_GBps", "rel_l2_error"]))
    if "step" in sections:
        rows = [bench_local_step(s, 8, 3, steps, cores) for s in ((32,) if a.quick else (64, 128))]
        results["local_step"] = rows
        print("\n## In-process step (3 sites, batch 8, default nets)\n")
        print(_table(rows, ["size", "batch", "sites", "threads", "steps", "seconds_per_step"]))
    if "distributed" in sections:
        size = 32 if a.quick else 64
        local = bench_local_step(size, 8, 3, steps, cores)
        dist = bench_distributed(size, 8, 3, steps, gen_threads=cores, site_threads=1)
        dist["throughput_vs_in_process"] = local["seconds_per_step"] / dist["seconds_per_step"]
        results["distributed"] = {"in_process": local, "distributed": dist}
        print(f"\n## Distributed vs in-process ({size} px, 3 sites, batch 8, {cores} cores in both)\n")
        print(
            _table(
                [{"mode": "in-process", **local}, {"mode": "distributed", **dist}],
                ["mode", "seconds_per_step", "generator_threads", "site_threads", "threads"],
            )
        )
        print(f"\nthroughput distributed / in-process: {dist['throughput_vs_in_process']:.3f} (target >= 0.95)")
        print(
            f"bytes on the wire per step: {dist['wire_bytes_per_step'] / 1e3:.1f} kB = "
            f"{dist['wire_to_raw']:.3f} x raw float32 (target <= 0.4)"
        )
    write_json_atomic(Path(a.out), results)
    log.info("wrote %s", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
