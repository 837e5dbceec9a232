"""The committed stubs are exactly what `make protos` builds from protos/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True, env=env, capture_output=True
    )
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "asyndgan/v1").glob("*_pb2*"))
    assert built == committed, "stub file set differs: run `make protos`"
    for rel in built:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} drifted: run `make protos`"


def test_services_are_declared() -> None:
    from asyndgan.v1 import discriminator_pb2, generator_pb2

    d = discriminator_pb2.DESCRIPTOR.services_by_name["DiscriminatorService"]
    assert {m.name for m in d.methods} == {"Describe", "NextBatch", "Step", "Checkpoint", "Status"}
    g = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"]
    assert g.methods_by_name["Synthesize"].server_streaming and g.methods_by_name["Synthesize"].client_streaming
