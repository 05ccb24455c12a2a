"""The engine's command-line options: one flag per ``EngineConfig`` field, one argument group shared by every
command that builds an engine (``memattn generate``, ``memattn bench-serve``, the coming ``serve``).

    add_engine_args(parser, num_kv_blocks=256)   # this command's defaults, where they differ from EngineConfig's
    ...
    config = engine_config_from_args(parser.parse_args())

A flag is ``--field-name`` (or the field's ``metadata["flag"]``), its help the field's ``metadata["help"]``.
Each value is checked by ``EngineConfig``'s own validation as it is parsed, so a bad one is an argparse error.
"""
from __future__ import annotations

import argparse
import dataclasses
import re

from .config import DTYPES, EngineConfig

FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
# Two spellings of one thing, the KV pool's size: give one. When a command sets a default for one of them,
# giving the other drops that default.
POOL = ("kv_cache_memory", "num_kv_blocks")


def parse_bytes(text: str) -> int:
    """A byte count: a plain int (bytes) or an int with a binary unit, "256MiB", "1GiB", "512KiB"
    (KiB, MiB, GiB, TiB; no decimal units, so "MB" is refused rather than guessed)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2) not in UNITS:
        raise argparse.ArgumentTypeError(f"expected bytes: an int, or an int with a unit in "
                                         f"{', '.join(u for u in UNITS if u)}, e.g. 256MiB; got {text!r}")
    return int(m.group(1)) * UNITS[m.group(2)]


def format_bytes(num: int) -> str:
    """The largest binary unit that divides `num` exactly: 268435456 -> "256MiB"."""
    unit = max((u for u, size in UNITS.items() if num % size == 0), key=UNITS.get)
    return f"{num // UNITS[unit]}{unit}"


def _mib(text: str) -> int:
    return int(text) << 20


# Old flags of single commands, now on every command: flag -> (field, text -> value, what to use instead).
DEPRECATED = {
    "--kv-mib": ("kv_cache_memory", _mib, "--kv-cache-memory NMiB"),
    "--kv-blocks": ("num_kv_blocks", int, "--num-kv-blocks N"),
}


def _flag(name: str) -> str:
    return FIELDS[name].metadata.get("flag", "--" + name.replace("_", "-"))


def _show(name: str, value) -> str:
    """A field's value as a user would type it on the command line."""
    if FIELDS[name].metadata.get("unit") == "bytes":
        return format_bytes(value)
    if name == "dtype":
        return next(k for k, v in DTYPES.items() if v == value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _checked(name: str, convert):
    """argparse `type` for the field: convert the text, then let EngineConfig validate the value alone."""
    def parse(text: str):
        value = convert(text)
        try:
            EngineConfig(**{name: value})
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    parse.__name__ = convert.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def _default_help(name: str, defaults: dict) -> str:
    if name in POOL and name not in defaults and defaults.keys() & POOL:
        other = next(n for n in POOL if n in defaults)
        return f" (this command's pool: {_flag(other)} {_show(other, defaults[other])}, unless this is given)"
    value = defaults.get(name, FIELDS[name].default)
    return "" if value is None else f" (default: {_show(name, value)})"


def add_engine_args(parser: argparse.ArgumentParser, **defaults) -> argparse._ArgumentGroup:
    """Add the engine group to `parser`: a flag per EngineConfig field, plus the deprecated aliases.

    defaults: field -> this command's default where it differs from EngineConfig's (shown in --help).
    Every flag parses to None when not given, so ``engine_config_from_args`` knows what the user set.
    """
    unknown = sorted(set(defaults) - set(FIELDS))
    if unknown:
        raise ValueError(f"no EngineConfig field(s) {', '.join(unknown)}")
    group = parser.add_argument_group(
        "engine options", "EngineConfig's fields, the same for every command that runs the engine. Byte sizes: "
        "an int of bytes, or with a binary unit (KiB, MiB, GiB, TiB), e.g. 256MiB.")
    pool = group.add_mutually_exclusive_group()
    for name, f in FIELDS.items():
        kw = dict(dest=name, default=None, help=f.metadata["help"] + _default_help(name, defaults))
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        elif f.metadata.get("unit") == "bytes":
            kw.update(type=_checked(name, parse_bytes), metavar="BYTES")
        else:
            kw["type"] = _checked(name, int if isinstance(f.default, int) or f.default is None else str)
        (pool if name in POOL else group).add_argument(_flag(name), **kw)
    for flag, (name, convert, instead) in DEPRECATED.items():
        (pool if name in POOL else group).add_argument(
            flag, dest=name, default=None, type=_checked(name, convert), metavar="N",
            help=f"deprecated alias: use {instead}")
    parser.set_defaults(engine_defaults=dict(defaults))
    return group


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed arguments: the flags given, else the command's defaults, else EngineConfig's."""
    given = {name: v for name in FIELDS if (v := getattr(args, name, None)) is not None}
    defaults = dict(args.engine_defaults)
    if given.keys() & POOL:  # the pool's size given one way: the command's default for the other way goes
        for name in POOL:
            defaults.pop(name, None)
    return EngineConfig(**{**defaults, **given})


__all__ = ["add_engine_args", "engine_config_from_args", "parse_bytes", "format_bytes"]
