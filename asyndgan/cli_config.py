"""Where a flag's value comes from: the command line, then ``ASYNDGAN_<FLAG>``, then ``--config FILE``, then the
parser's default.

Every flag of every sub-command reads its environment variable (``--privacy-epsilon`` -> ``ASYNDGAN_PRIVACY_EPSILON``;
a repeatable flag takes a comma-separated list, a switch ``1/true/yes/on`` or ``0/false/no/off``). The config file is
TOML (standard library): top-level keys apply to every sub-command that has that flag, a table named after the
sub-command (``[discriminator]``, ``[certs.issue]``) only to it; keys are flag names (``privacy-epsilon`` or
``privacy_epsilon``). A bad value from any source is one line that names the source.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "apply_sources", "env_name", "flags_of"]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_SKIP = {"help", "version", "config"}


class ConfigError(Exception):
    """A bad value in the environment or the config file (one line, naming the source)."""


def env_name(flag: str) -> str:
    return "ASYNDGAN_" + flag.lstrip("-").upper().replace("-", "_")


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name (without dashes) -> action, for the flags a user sets (not --help, --version, --config)."""
    out = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in _SKIP and not isinstance(action, argparse._SubParsersAction):
            out[longs[0][2:]] = action
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _chosen(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], argparse.ArgumentParser]:
    names, rest = [], list(argv)
    while choices := _subparsers(parser):
        i = next((i for i, tok in enumerate(rest) if tok in choices), None)
        if i is None:
            break
        names.append(rest[i])
        parser, rest = choices[rest[i]], rest[i + 1 :]
    return names, parser


def _config_path(argv: Sequence[str]) -> str | None:
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith("--config="):
            return tok.split("=", 1)[1]
    return os.environ.get("ASYNDGAN_CONFIG")


def _load(path: str, names: list[str], flags: dict[str, argparse.Action]) -> dict[str, tuple[Any, str]]:
    """flag -> (value, source) from the TOML file: top-level keys this command has, then its own table."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    found = {k.replace("_", "-"): (v, f"{path}: {k}") for k, v in data.items() if not isinstance(v, dict)}
    found = {k: v for k, v in found.items() if k in flags}
    table: Any = data
    for name in names:
        table = table.get(name, {}) if isinstance(table, dict) else {}
    section = "[" + ".".join(names) + "]"
    for key, value in (table or {}).items():
        if isinstance(value, dict):
            continue  # a nested sub-command's table
        flag = key.replace("_", "-")
        if flag not in flags:
            raise ConfigError(f"config file {path}: {section} {key}: `asyndgan {' '.join(names)}` has no --{flag}")
        found[flag] = (value, f"{path}: {section} {key}")
    return found


def _convert(action: argparse.Action, raw: Any, from_env: bool) -> Any:
    """The value ``raw`` (an environment string or a TOML value) means for ``action``; ValueError if none."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(raw, bool):
            on = raw
        elif str(raw).lower() in _TRUE | _FALSE:
            on = str(raw).lower() in _TRUE
        else:
            raise ValueError("expected true or false")
        return on if isinstance(action, argparse._StoreTrueAction) else not on
    if isinstance(action, argparse._AppendAction):
        items = [x for x in str(raw).split(",") if x] if from_env else (raw if isinstance(raw, list) else [raw])
        return [_one(action, x) for x in items]
    return _one(action, raw)


def _one(action: argparse.Action, raw: Any) -> Any:
    if isinstance(raw, dict | list | bool) and action.type is not None:
        raise ValueError(f"expected a {getattr(action.type, '__name__', 'value')}")
    value = action.type(str(raw)) if callable(action.type) else str(raw)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return value


def apply_sources(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, str]:
    """Set the defaults of the chosen sub-command's flags from the config file and the environment (the command
    line still wins when argparse parses ``argv``); returns {dest: source} for the values set here."""
    names, sub = _chosen(parser, argv)
    flags = flags_of(sub)
    values: dict[str, tuple[Any, str, bool]] = {}
    path = _config_path(argv)
    if path:
        values |= {f: (v, src, False) for f, (v, src) in _load(path, names, flags).items()}
    for flag in flags:
        if (raw := os.environ.get(env_name(flag))) is not None:
            values[flag] = (raw, f"{env_name(flag)}={raw!r}", True)
    sources = {}
    for flag, (raw, source, from_env) in values.items():
        action = flags[flag]
        try:
            action.default = _convert(action, raw, from_env)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{source}: invalid value for --{flag}: {e}") from e
        action.required = False
        sources[action.dest] = source
    return sources
