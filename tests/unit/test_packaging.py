"""The wheel a user installs: licence, typing marker, the .proto contract, and dependency floors the code needs."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("asyndgan-*.whl")
    return zipfile.ZipFile(path)


def metadata(wheel: zipfile.ZipFile) -> tuple[dict[str, Requirement], list[str]]:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(wheel.read(name).decode())
    reqs = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
    return {r.name: r for r in reqs if r.marker is None}, msg.get_all("Classifier") or []


def floor(req: Requirement) -> Version:
    return min(Version(s.version) for s in req.specifier if s.operator in (">=", "=="))


def test_wheel_ships_licence_typing_marker_protos_and_code(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    assert "Apache License" in wheel.read(licence).decode() and "Version 2.0" in wheel.read(licence).decode()
    assert (ROOT / "LICENSE").read_bytes() == wheel.read(licence)
    assert "asyndgan/py.typed" in names
    protos = {p.name for p in (ROOT / "protos/asyndgan/v1").glob("*.proto")}
    assert {f"asyndgan/protos/asyndgan/v1/{p}" for p in protos} <= names, "every .proto is in the wheel"
    for module in ("asyndgan/cli.py", "asyndgan/services/generator/service.py", "asyndgan/clients/audit.py",
                   "asyndgan/v1/federation_pb2_grpc.py", "asyndgan/v1/federation_pb2.pyi"):  # fmt: skip
        assert module in names, module
    assert any(n.startswith("asyndgan/data/") and n.endswith(".npz") for n in names), "the embedded data"


def test_dependency_floors_match_what_the_stubs_need(wheel: zipfile.ZipFile) -> None:
    reqs, classifiers = metadata(wheel)
    stub = (ROOT / "asyndgan/v1/generator_pb2_grpc.py").read_text()
    grpc_needed = Version(re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", stub).group(1))  # type: ignore[union-attr]
    pb = (ROOT / "asyndgan/v1/generator_pb2.py").read_text()
    pb_needed = Version(re.search(r"Protobuf Python Version: ([\d.]+)", pb).group(1))  # type: ignore[union-attr]
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert floor(reqs[name]) >= grpc_needed, f"{name} floor below the stubs' grpcio {grpc_needed}"
    assert floor(reqs["protobuf"]) >= pb_needed
    assert floor(reqs["torch"]) >= Version("2.6"), "opacus 1.6 needs torch 2.6"
    assert "Typing :: Typed" in classifiers and any(
        c.startswith("Programming Language :: Python :: 3.11") for c in classifiers
    )
