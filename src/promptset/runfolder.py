"""The run folder: `classes.json` (the only source of class order), `config.yaml`, and the checks every stage runs.

A stage that finds a class list disagreeing with its inputs refuses with a message saying what to pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .atomic import write_json, write_text
from .errors import UserError


@dataclass(frozen=True)
class ClassInfo:
    index: int
    folder: str
    name: str


def write_classes(run: Path, folders: list[str], names: list[str]) -> list[ClassInfo]:
    classes = [ClassInfo(i, f, n) for i, (f, n) in enumerate(zip(folders, names))]
    write_json(run / "classes.json", [c.__dict__ for c in classes])
    return classes


def read_classes(run: Path) -> list[ClassInfo] | None:
    path = Path(run) / "classes.json"
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [ClassInfo(int(r["index"]), str(r["folder"]), str(r["name"])) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not a valid class list ({err}); delete it or pass a fresh --out") from err


def require_classes(run: Path) -> list[ClassInfo]:
    classes = read_classes(run)
    if classes is None:
        raise UserError(f"{Path(run) / 'classes.json'} not found: --run must be a folder made by select or invert")
    return classes


def check_same_classes(expected: list[str], got: list[str], what: str, fix: str) -> None:
    """Refuse `got` (class folders of some input) unless it equals `expected` (classes.json), naming the difference."""
    if list(expected) == list(got):
        return
    missing = [c for c in expected if c not in got]
    extra = [c for c in got if c not in expected]
    detail = []
    if missing:
        detail.append(f"missing {missing[:10]}")
    if extra:
        detail.append(f"not in classes.json {extra[:10]}")
    if not missing and not extra:
        detail.append("same classes in a different order")
    raise UserError(f"{what} does not match classes.json ({'; '.join(detail)}); {fix}")


def resolve_class_names(folders: list[str], class_names: str | None) -> list[str]:
    """Display names: from `--class-names FILE` (JSON {folder: name} or one name per line), else from folders."""
    from .data import display_name

    if not class_names:
        return [display_name(f) for f in folders]
    path = Path(class_names)
    if not path.is_file():
        raise UserError(f"--class-names {path}: file not found (JSON {{folder: name}} or one name per line)")
    text = path.read_text(encoding="utf-8")
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if len(lines) != len(folders):
            raise UserError(f"--class-names {path}: {len(lines)} names for {len(folders)} classes") from None
        return lines
    if not isinstance(mapping, dict) or any(f not in mapping for f in folders):
        missing = [f for f in folders if not isinstance(mapping, dict) or f not in mapping]
        raise UserError(f"--class-names {path}: no name for classes {missing[:10]}")
    return [str(mapping[f]) for f in folders]


def prepare_run(run: Path, stage: str, config: dict, *, overwrite: bool = False) -> None:
    """Create the run folder and write the resolved config; refuse a folder that holds a different run.

    A folder holds "a different run" when its `config.yaml` has a different section for this stage's inputs.
    Re-running the same command is allowed (it resumes).
    """
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} exists and is not a folder")
    cfg_path = run / "config.yaml"
    existing = {}
    if cfg_path.is_file():
        existing = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    previous = existing.get(stage)
    if previous is not None and _identity(previous) != _identity(config) and not overwrite:
        changed = sorted(k for k in set(previous) | set(config) if k in _IDENTITY_KEYS and previous.get(k) != config.get(k))
        raise UserError(
            f"--out {run} already holds a different {stage} run (changed: {', '.join(changed)}); "
            "pass a new --out folder, or --overwrite to replace it"
        )
    existing[stage] = config
    run.mkdir(parents=True, exist_ok=True)
    write_text(cfg_path, yaml.safe_dump(existing, sort_keys=False))


# Flags that change a stage's result; others (device, progress, checkpoint interval) may differ on resume.
_IDENTITY_KEYS = {
    "backend", "model", "data", "steps", "batch_size", "classes_per_batch", "lr", "resolution", "num_vectors",
    "seed", "template", "initializer", "initializers", "factor", "num_crops", "teacher", "ipc", "guidance",
    "num_inference_steps", "sampler", "weight_decay", "warmup_steps", "prompt_dtype", "flip", "dtype",
    "num_collages", "max_images_per_class", "image_size", "soft_labels",
}


def _identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in _IDENTITY_KEYS}
