"""Every flag of every sub-command reads ASYNDGAN_<FLAG> and the config file; precedence and one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asyndgan import __version__
from asyndgan.cli import _leaves, build_parser
from asyndgan.cli_config import ConfigError, apply_sources, env_name, flags_of
from asyndgan.cli_flags import parse_site


def sample(action: argparse.Action) -> tuple[str, Any]:
    """(environment string, the value it must parse to) for one flag."""
    if isinstance(action, argparse._StoreTrueAction):
        return "yes", True
    if isinstance(action, argparse._StoreFalseAction):
        return "yes", False
    if action.choices is not None:
        pick = [c for c in action.choices if c != action.default][-1]
        one: tuple[str, Any] = (str(pick), pick)
    elif action.type is int:
        one = ("7", 7)
    elif action.type is float:
        one = ("0.25", 0.25)
    elif action.type is parse_site:
        one = ("h9=127.0.0.1:9", ("h9", "127.0.0.1:9"))
    elif action.type is None:
        one = ("some-value", "some-value")
    else:
        raise AssertionError(f"--{action.dest}: no sample for type {action.type}")
    if isinstance(action, argparse._AppendAction):
        return f"{one[0]},{one[0]}", [one[1], one[1]]
    return one


def commands() -> list[list[str]]:
    parser = build_parser()
    out = []

    def walk(p: argparse.ArgumentParser, names: list[str]) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append(names)
        for name, child in subs[0].choices.items() if subs else []:
            walk(child, [*names, name])

    walk(parser, [])
    return out


def leaf(parser: argparse.ArgumentParser, names: list[str]) -> argparse.ArgumentParser:
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


@pytest.mark.parametrize("names", commands(), ids=" ".join)
def test_every_flag_reads_its_environment_variable(names: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    flags = flags_of(leaf(parser, names))
    assert len(flags) >= 3
    expected = {}
    for flag, action in flags.items():
        raw, value = sample(action)
        monkeypatch.setenv(env_name(flag), raw)
        expected[action.dest] = value
    positional = ["a"] if names == ["certs", "issue"] else []
    sources = apply_sources(parser, [*names, *positional])
    ns = parser.parse_args([*names, *positional])
    for dest, value in expected.items():
        assert getattr(ns, dest) == value, f"{' '.join(names)} --{dest}"
        assert sources[dest].startswith("ASYNDGAN_")


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('threads = 3\n[discriminator]\nsite-id = "h0"\ndata = "npz:/x.npz"\nngf = 16\nprivacy = "none"\n')
    base = ["discriminator", "--config", str(cfg)]

    def parsed(*extra: str) -> argparse.Namespace:
        parser = build_parser()
        apply_sources(parser, [*base, *extra])
        return parser.parse_args([*base, *extra])

    assert parsed().ngf == 16 and parsed().site_id == "h0" and parsed().threads == 3 and parsed().ndf == 32
    monkeypatch.setenv("ASYNDGAN_NGF", "24")
    assert parsed().ngf == 24
    assert parsed("--ngf", "40").ngf == 40
    monkeypatch.setenv("ASYNDGAN_CONFIG", str(cfg))  # the file can come from the environment too
    parser = build_parser()
    apply_sources(parser, ["discriminator"])
    assert parser.parse_args(["discriminator"]).privacy == "none"


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[discriminator]\nngf = 'abc'\n", {}, "[discriminator] ngf: invalid value for --ngf"),
        ("[discriminator]\nngff = 3\n", {}, "[discriminator] ngff: `asyndgan discriminator` has no --ngff"),
        ("[discriminator\n", {}, "config file"),
        ("", {"ASYNDGAN_NGF": "abc"}, "ASYNDGAN_NGF='abc': invalid value for --ngf"),
        ("", {"ASYNDGAN_PRIVACY": "maybe"}, "ASYNDGAN_PRIVACY='maybe': invalid value for --privacy: choose from"),
        ("", {"ASYNDGAN_NO_RESUME": "perhaps"}, "expected true or false"),
    ],
)
def test_bad_values_name_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], needle: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as err:
        apply_sources(build_parser(), ["discriminator", "--config", str(cfg)])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "asyndgan.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli_prints_one_line_for_a_bad_environment_value_and_its_version() -> None:
    res = cli("discriminator", env={"ASYNDGAN_NGF": "abc", "ASYNDGAN_SITE_ID": "x", "ASYNDGAN_DATA": "npz:/x"})
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "ASYNDGAN_NGF='abc'" in res.stderr
    assert cli("--version").stdout.strip() == f"asyndgan {__version__}"


def test_log_format_json(tmp_path: Path) -> None:
    res = cli("certs", "init", "--dir", str(tmp_path / "ca"), "--log-format", "json")
    assert res.returncode == 0
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)


def test_every_leaf_has_config_and_log_format() -> None:
    for p in _leaves(build_parser()):
        assert {"config", "log-format"} <= {o.lstrip("-") for a in p._actions for o in a.option_strings}
