"""Smoke tests for ``asyndgan.experiments.bench``: the structure of its results at tiny sizes, never its timings."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from asyndgan.experiments import bench
from asyndgan.experiments.bytes_bench import bench_bytes
from asyndgan.experiments.figures import bytes_png
from asyndgan.experiments.synthesize_bench import REFERENCE, _paired, bench_synthesize_with_policy


def test_scaling_section_structure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        code = bench.main(
            [
                "--out",
                str(out),
                "--sections",
                "scaling",
                "--scaling-sites",
                "1,2",
                "--scaling-delay",
                "0.05",
                "--scaling-steps",
                "2",
                "--scaling-total-batch",
                "4",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    res = json.loads(out.read_text())
    rows, per_site = res["scaling"]["rows"], res["scaling"]["rows_fixed_batch_per_site"]
    assert [r["sites"] for r in rows] == [r["sites"] for r in per_site] == [1, 2]
    assert [r["batch_per_site"] for r in rows] == [4, 2] and [r["batch_per_site"] for r in per_site] == [2, 2]
    for r in rows + per_site:
        assert r["seconds_per_step"] >= 0.05  # every step waited for the emulated sites' delay
        assert {"p90_seconds", "generator_compute_s", "overhead_s", "ratio_to_n1"} <= r.keys()
    assert rows[0]["ratio_to_n1"] == per_site[0]["ratio_to_n1"] == 1.0
    assert [t["target"] for t in res["targets"]] == ["step time N=2 / N=1 (same G batch)"]
    md = out.with_suffix(".md").read_text()
    assert "Orchestration" in md and "| sites |" in md


def test_bytes_section_and_plot(tmp_path: Path) -> None:
    res = bench_bytes(size=32, batch=2, sites=2, steps=1, threads=torch.get_num_threads())
    schemes = [r["scheme"] for r in res["rows"]]
    assert len(schemes) == 3 and schemes[0].startswith("raw") and schemes[2].startswith("FedAvg")
    raw = res["per_step"]["raw"]
    # raw float32 = fakes + gradients (float32) + label maps (uint8), 2 sites x batch 2 x 32 x 32
    assert raw == 2 * 2 * 32 * 32 * (4 + 4 + 1)
    assert 0 < res["wire_to_raw"] < 1
    assert res["generator_params"] > 0 and res["discriminator_params_per_site"] > 0
    fed = res["rows"][2]
    fed_bytes = 2 * 2 * (res["generator_params"] + res["discriminator_params_per_site"]) * 4  # down+up, 2 sites
    assert fed["MB_per_epoch"] * 1e6 == pytest.approx(fed_bytes)
    png = tmp_path / "bytes.png"
    bytes_png(png, [res])
    assert Image.open(png).size[0] > 0


def test_synthesize_section_times_a_client_process_and_an_in_process_client(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    threads, policy = torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY")
    argv = ["--out", str(out), "--sections", "synthesize", "--synth-size", "32", "--synth-batch", "2"]
    try:
        code = bench.main(
            [*argv, "--synth-requests", "2", "--synth-repeat", "1", "--synth-codecs", "f32", "--synth-omp", "PASSIVE"]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    res = json.loads(out.read_text())
    (synth,) = res["synthesize"]
    assert synth["omp_wait_policy"] == "PASSIVE"  # as the process it ran in saw it
    assert os.environ.get("OMP_WAIT_POLICY") == policy  # this process's is left as it was
    paths = [r["path"] for r in synth["rows"]]
    assert paths[2:] == [
        "Synthesize stream (f32 images, client process)",
        "Synthesize stream (f32 images, client in the server's process)",
    ]
    assert all(r["images_per_s"] > 0 for r in synth["rows"])
    assert paths[:2] == ["G forward (worker thread) in-process", "G forward (main thread) in-process"]
    assert all(r["vs_forward_min"] <= r["vs_forward"] <= r["vs_forward_max"] for r in synth["rows"])
    (goal,) = res["targets"]
    slower = min(r["vs_forward"] for r in synth["rows"][2:])
    assert goal["target"] == "Synthesize / forward pass (f32, slower client, OMP_WAIT_POLICY PASSIVE)"
    assert goal["value"] == slower


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--synth-omp", "PASSIVE,sleepy"], "--synth-omp takes PASSIVE, ACTIVE or default"),
        (["--link-repeat", "0"], "argument --link-repeat: must be a whole number >= 1, got '0'"),
        (["--synth-requests", "many"], "argument --synth-requests: must be a whole number >= 1, got 'many'"),
    ],
)
def test_bad_flags_exit_2_with_one_error_line(flags: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(["--sections", "synthesize", *flags])
    assert e.value.code == 2
    assert error in capsys.readouterr().err.splitlines()[-1]


def test_paired_timing_puts_every_variant_between_two_reference_runs() -> None:
    calls: list[str] = []

    def run(name: str, seconds: float) -> Callable[[], None]:
        def call() -> None:
            calls.append(name)
            time.sleep(seconds)

        return call

    variants = {"slow": run("slow", 0.06), "same": run("same", 0.02)}
    seconds, ratios = _paired(run(REFERENCE, 0.02), variants, repeat=2)
    assert calls == [REFERENCE, "slow", "same"] + 2 * [REFERENCE, "slow", REFERENCE, "same", REFERENCE]
    assert [len(seconds[n]) for n in (REFERENCE, "slow", "same")] == [6, 2, 2]
    assert all(0.15 < r < 0.7 for r in ratios["slow"])  # 0.02 s / 0.06 s, sleeps only ever run long
    assert all(0.5 < r < 2 for r in ratios["same"])


def test_a_synthesize_process_that_fails_is_one_error() -> None:
    with pytest.raises(RuntimeError, match="ended with exit code 1"):
        bench_synthesize_with_policy("default", 1, 32, 2, 2, 1, ["no-such-codec"])
