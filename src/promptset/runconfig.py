"""The `promptset run` config file (a recipe): stage sections, a `paths:` block of variables, `--set` overrides.

A recipe names its inputs once, under `paths:`, and refers to them from any string in a stage section as `${name}`
(`teacher: resnet18@224:${teacher}`); a user edits `paths:` or overrides any value on the command line with
`--set paths.NAME=VALUE` or `--set SECTION.OPTION=VALUE` (a YAML scalar: `--set invert.steps=10`). A section may be
a list of mappings (one stage run per item, in order: `evaluate:` once per protocol); `--set` then sets the option
in every item. `dataset:` describes the data (class and image counts) for `promptset run --plan` when the data
folders are not on this machine; the stages never read it. Everything is checked here, before any stage runs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from .config import load_yaml
from .errors import UserError

RESERVED = ("run", "paths", "dataset")  # top-level keys that are not stage sections
DATASET_KEYS = ("name", "classes", "train_images_per_class", "test_images")
_VAR = re.compile(r"\$\{([^}]*)\}")


def parse_sets(items: list[str] | None) -> list[tuple[list[str], object]]:
    """`--set KEY=VALUE` flags as (dotted key split, YAML-parsed value); refuses a malformed one."""
    out = []
    for item in items or []:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not key.strip() or any(not p for p in parts) or len(parts) > 2:
            raise UserError(f"--set {item!r}: expected SECTION.OPTION=VALUE, paths.NAME=VALUE or run=VALUE "
                            "(e.g. --set invert.steps=10, --set paths.model=/models/sd15)")
        if len(parts) == 1 and parts[0] != "run":
            raise UserError(f"--set {item!r}: name a section and an option, SECTION.OPTION=VALUE (only 'run' stands "
                            "alone)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise UserError(f"--set {item!r}: the value is not a YAML scalar ({err}); quote it") from None
        if isinstance(value, (dict, list)):
            raise UserError(f"--set {item!r}: the value must be a single value, not a {type(value).__name__}")
        out.append((parts, "" if value is None else value))
    return out


def load_recipe(path: str, sets: list[str] | None, stage_names: list[str]) -> dict:
    """The config file with `--set` applied and `${name}` replaced by `paths:` values.

    Returns {"run": str | None, "paths": {...}, "dataset": {...}, "stages": {name: [section dict, ...]}} with the
    stages in `stage_names` order. Raises UserError naming the file, the section or the `--set` flag at fault.
    """
    data = copy.deepcopy(load_yaml(path))
    where = f"--config {path}"
    unknown = [k for k in data if k not in stage_names and k not in RESERVED]
    if unknown:
        raise UserError(f"{where}: unknown sections {unknown}; known: {[*RESERVED, *stage_names]}")
    paths = data.get("paths") or {}
    if not isinstance(paths, dict) or any(isinstance(v, (dict, list)) for v in paths.values()):
        raise UserError(f"{where}: 'paths:' must map names to single values (NAME: PATH)")
    dataset = data.get("dataset") or {}
    if not isinstance(dataset, dict) or set(dataset) - set(DATASET_KEYS):
        raise UserError(f"{where}: 'dataset:' takes {', '.join(DATASET_KEYS)} (used by --plan only)")
    stages: dict[str, list[dict]] = {}
    for name in stage_names:
        if name not in data:
            continue
        section = data[name]
        items = section if isinstance(section, list) else [section or {}]
        if not items or not all(isinstance(i, dict) for i in items):
            raise UserError(f"{where}: section '{name}:' must be a mapping of options, or a list of mappings")
        stages[name] = [dict(i) for i in items]
    for parts, value in parse_sets(sets):
        flag = f"--set {'.'.join(parts)}"
        if parts == ["run"]:
            data["run"] = value
        elif parts[0] == "paths":
            if parts[1] not in paths:
                raise UserError(f"{flag}: {path} has no paths.{parts[1]}; its paths are: {', '.join(paths) or 'none'}")
            paths[parts[1]] = value
        elif parts[0] in stages:
            for item in stages[parts[0]]:
                item[parts[1]] = value
        elif parts[0] in stage_names:
            raise UserError(f"{flag}: {path} has no '{parts[0]}:' section (a recipe's sections: "
                            f"{', '.join(stages)}); add the section to the file to run that stage")
        else:
            raise UserError(f"{flag}: unknown section {parts[0]!r}; known: paths, {', '.join(stages)}")
    paths = {k: "" if v is None else str(v) for k, v in paths.items()}
    for name, items in stages.items():
        for i, item in enumerate(items):
            label = f"[{name}]" if len(items) == 1 else f"[{name}][{i}]"
            for key, value in item.items():
                item[key] = _substitute(value, paths, f"{where} {label} {key}")
    run = data.get("run")
    run = _substitute(str(run), paths, f"{where} run") if run not in (None, "") else None
    return {"run": run, "paths": paths, "dataset": dataset, "stages": stages}


def _substitute(value, paths: dict[str, str], where: str):
    """`${name}` in a string replaced by paths[name]; refuses an unknown name and an empty path."""
    if not isinstance(value, str) or "${" not in value:
        return value

    def one(match: re.Match) -> str:
        name = match.group(1).strip()
        if name not in paths:
            raise UserError(f"{where}: ${{{name}}} is not defined under 'paths:' (defined: "
                            f"{', '.join(paths) or 'none'})")
        if not paths[name]:
            raise UserError(f"{where}: paths.{name} is empty; set it in the file or pass --set paths.{name}=PATH")
        return paths[name]

    return _VAR.sub(one, value)


def check_inputs(stages: dict[str, list[dict]]) -> None:
    """Before any stage runs: every input folder a section names exists, and a model given as a local path (not a
    Hub id `org/name`) exists: a typo found after hours of inversion is a typo found too late."""
    for name, items in stages.items():
        for item in items:
            for key in ("data", "test", "train"):
                value = item.get(key)
                if value and not Path(str(value)).expanduser().is_dir():
                    raise UserError(f"[{name}] {key}: {value} is not a folder; fix the path under the recipe's "
                                    "'paths:' or pass --set paths.NAME=PATH")
            model = str(item.get("model") or "")
            if model and not Path(model).expanduser().exists() and not _HUB_ID.fullmatch(model):
                raise UserError(f"[{name}] model: {model} does not exist; fix paths.model in the recipe or pass "
                                "--set paths.model=PATH (a diffusers folder of the model)")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
