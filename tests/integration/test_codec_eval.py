"""``python -m asyndgan.experiments.codec_eval``: one evaluation per wire codec pair, judged against the first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyndgan.experiments import codec_eval


@pytest.mark.slow
def test_quick_codec_eval_compares_each_variant_with_the_first(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path), "--variants", "bf16,q4-q8", "--jobs", "1", "--threads", "1"]
    assert codec_eval.main(argv) == 0
    result = json.loads((tmp_path / "codecs.json").read_text())
    bf16, q4q8 = result["rows"]
    assert (q4q8["fakes"], q4q8["gradients"]) == ("q4+zstd", "q8+zstd")
    assert 0 < q4q8["wire_to_raw_64px"] < bf16["wire_to_raw_64px"] < 1  # fewer bits on the wire, measured
    assert q4q8["c_over_a_minus_reference"] == pytest.approx(q4q8["c_over_a"] - bf16["c_over_a"])
    assert [t["target"] for t in result["targets"]] == ["q4-q8: (c)/(a) - bf16's (c)/(a)"]
    assert (tmp_path / "codecs" / "q4-q8" / "eval.json").exists() and "q4-q8" in (tmp_path / "codecs.md").read_text()
    with pytest.raises(SystemExit):  # an unknown variant is a usage error
        codec_eval.main(["--out", str(tmp_path), "--variants", "q3"])
