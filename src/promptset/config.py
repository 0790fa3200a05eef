"""Stage configs as dataclasses, with one rule for every command: defaults < `--config file.yaml` < flags.

Each field carries its help text, so the CLI is generated from the dataclass and never drifts from the API.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .threads import ensure as ensure_threads


def opt(default: Any, help: str, *, choices: list | None = None, aliases: tuple[str, ...] = (),
        positional: bool = False) -> Any:
    """A config field with its help text (and optional choices and extra flag spellings) for the generated CLI;
    `positional` also accepts it as the command's first bare argument (`promptset pack RUN`)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases,
                                                        "positional": positional})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(cfg: Any, **why: str) -> None:
    """Options a command cannot run without: the first of `why`'s names whose value in `cfg` is empty raises
    `UserError("--name is required: <its why>")`, in the order given."""
    for name, reason in why.items():
        if not getattr(cfg, name):
            raise UserError(f"{flag_name(name)} is required: {reason}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per dataclass field; flags not given stay unset so YAML values are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        meta = f.metadata
        # argparse %-formats help strings: a literal '%' in a help text or default must be doubled
        help_text = f"{meta.get('help', '')} (default: {f.default!r})".replace("%", "%%")
        flags = [flag_name(f.name), *meta.get("aliases", ())]
        if kind is bool:
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        base = _base_type(kind)
        if meta.get("positional"):  # `promptset pack RUN` as well as `promptset pack --run RUN`
            parser.add_argument(f"{f.name}_arg", nargs="?", type=base, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=f"same as {flag_name(f.name)}")
        parser.add_argument(
            *flags, dest=f.name, type=base, default=argparse.SUPPRESS, choices=meta.get("choices"),
            help=help_text, metavar=f.name.upper() if not meta.get("choices") else None,
        )


def _base_type(kind) -> type:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args:
        kind = args[0]
    return kind if kind in (int, float, str) else str


def read_yaml(path: str | Path, what: str, fix: str) -> dict:
    """The one YAML reader: a mapping from `path`, or a UserError naming `what` and saying `fix`."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{what} {p} is not valid YAML ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise UserError(f"{what} {p}: expected a mapping of names to values; {fix}")
    return data


def load_yaml(path: str | None, section: str | None = None) -> dict:
    """A `--config` file: its section for `section` when it has one, else its top level."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {p}: file not found")
    data = read_yaml(p, "--config", "fix the file (a mapping of option names to values)")
    if section and isinstance(data.get(section), dict):
        return data[section]
    return data


def unknown_option(key: str, names, where: str) -> UserError:
    """The error for an option `key` that is not one of `names`, naming the nearest valid one."""
    near = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(sorted(names))}"
    return UserError(f"{where}: unknown option {key!r}; {hint}")


def _aliases(cls: type) -> dict[str, str]:
    """Other spellings of fields (their extra flags, e.g. `--label-dtype` for `label_codec`) -> field names."""
    out = {}
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get("aliases", ()):
            out[alias.lstrip("-").replace("-", "_")] = f.name
    return out


def resolve(cls: type, yaml_values: dict, flags: dict, *, source: str = "--config") -> Any:
    """Build `cls` from defaults, then YAML values, then explicitly given flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = _aliases(cls)
    values = {}
    for key, value in (yaml_values or {}).items():
        key = key.replace("-", "_")
        key = key if key in names else aliases.get(key, key)
        if key not in names:
            raise unknown_option(key, names, source)
        values[key] = value
    values.update({k: v for k, v in flags.items() if k in names})
    return cls(**values)


def make_config(cls: type, cfg: Any, overrides: dict, verb: str) -> Any:
    """What every verb does first: `cfg` (or the defaults) with keyword `overrides` applied, unknown names refused.

    Also fixes torch's CPU threads for the process, as the CLI does (`threads.ensure`). The caller's `cfg` is not
    modified: `promptset.invert(cfg, steps=5)` leaves `cfg.steps` as it was.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = _aliases(cls)
    overrides = {(k if k in names else aliases.get(k, k)): v for k, v in overrides.items()}
    for key in overrides:
        if key not in names:
            raise unknown_option(key, names, f"promptset.{verb}()")
    cfg = cls() if cfg is None else cfg
    ensure_threads()  # the CLI's CPU thread count, fixed once per process, for every verb (threads.py)
    if not isinstance(cfg, cls):
        raise UserError(f"promptset.{verb}(): the first argument must be a {cls.__name__}, not {type(cfg).__name__}")
    return dataclasses.replace(cfg, **overrides)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
