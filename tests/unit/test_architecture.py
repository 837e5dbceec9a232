"""Boundaries the layout promises (README "Layout"): a core free of gRPC, services and experiments; small
modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The runtime core: plain Python over torch/numpy/protobuf messages. Everything gRPC lives in asyndgan.rpc,
# asyndgan.metrics, the services and the clients; the experiments sit on top of all of them.
CORE = [
    "asyndgan/__init__.py",
    "asyndgan/algorithm.py",
    "asyndgan/certs.py",
    "asyndgan/codec.py",
    "asyndgan/errors.py",
    "asyndgan/generator.py",
    "asyndgan/guard.py",
    "asyndgan/io.py",
    "asyndgan/local.py",
    "asyndgan/messages.py",
    "asyndgan/nets.py",
    "asyndgan/observer.py",
    "asyndgan/report.py",
    "asyndgan/wire.py",
    "asyndgan/data",
    "asyndgan/privacy",
]
FORBIDDEN = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "asyndgan.rpc",
    "asyndgan.metrics",
    "asyndgan.services",
    "asyndgan.clients",
    "asyndgan.experiments",
    "asyndgan.cli",
    "asyndgan.demo",
)


def _files(entries: list[str]) -> list[Path]:
    out: list[Path] = []
    for e in entries:
        p = ROOT / e
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN) or name.endswith("_pb2_grpc")


@pytest.mark.parametrize("path", _files(CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_neither_grpc_nor_services_nor_experiments(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _forbidden(n))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import torch\nfrom asyndgan.rpc import make_server\nfrom asyndgan.v1 import generator_pb2_grpc\n")
    assert sorted(n for n in _imports(f) if _forbidden(n)) == [
        "asyndgan.rpc",
        "asyndgan.rpc.make_server",
        "asyndgan.v1.generator_pb2_grpc",
    ]


def _sources() -> list[Path]:
    out = []
    for root in ("asyndgan", "services", "clients"):
        out += [p for p in (ROOT / root).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts]
    return sorted(out)


def test_no_module_over_500_lines() -> None:
    big = {str(p.relative_to(ROOT)): n for p in _sources() if (n := p.read_text().count("\n")) > 500}
    assert not big, f"modules over 500 lines: {big}"


def test_no_function_over_60_lines_outside_argument_parsers() -> None:
    long = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or "parser" in node.name:
                continue
            if (n := node.end_lineno - node.lineno + 1) > 60:  # type: ignore[operator]
                long.append(f"{p.relative_to(ROOT)}:{node.name} ({n})")
    assert not long, f"functions over 60 lines: {long}"
