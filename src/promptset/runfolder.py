"""The run folder and the one reader of its shared files: `classes.json` (the only source of class order),
`config.yaml` (each stage's resolved config), `select.json`, and the checks every stage runs on them.

A stage that finds a class list disagreeing with its inputs refuses with a message saying what to pass.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .atomic import TMP_PREFIX, write_json, write_text
from .config import read_yaml
from .data import validate_class_name
from .errors import UserError

if TYPE_CHECKING:
    from .artifacts import PromptSet


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
        classes = [ClassInfo(int(r["index"]), str(r["folder"]), str(r["name"])) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not a valid class list ({err}); delete it or pass a fresh --out") from err
    if [c.index for c in classes] != list(range(len(classes))):
        raise UserError(f"{path}: class indices are not 0..{len(classes) - 1} in order; pass a fresh --out")
    for c in classes:  # folder names become paths under the run folder: an edited list must not escape it
        validate_class_name(c.folder, flag=str(path))
    return classes


def require_classes(run: Path) -> list[ClassInfo]:
    classes = read_classes(run)
    if classes is None:
        raise UserError(f"{Path(run) / 'classes.json'} not found: --run must be a folder made by select or invert")
    return classes


def require_prompts(run: Path, classes: list[ClassInfo]) -> PromptSet:
    """`<run>/prompts.safetensors`, checked against classes.json."""
    from .artifacts import PromptSet

    path = Path(run) / "prompts.safetensors"
    if not path.is_file():
        raise UserError(f"{path} not found: run invert in this run folder first")
    prompts = PromptSet.load(path)
    check_same_classes([c.folder for c in classes], prompts.class_folders, f"prompts file {path}",
                       "regenerate the prompts with invert in this run folder")
    return prompts


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


def check_run_folder(run: Path, stage: str, config: dict, *, overwrite: bool = False) -> bool:
    """Refuse an `--out` folder that holds a different run of this stage, or something that is not a run at all.

    A folder holds "a different run" when its `config.yaml` has a different section for this stage's inputs;
    re-running the same command is allowed (it resumes). Reads only, so every rank can run it before anything is
    written.

    Returns:
        True when `--overwrite` replaces a different earlier run: the caller removes that run's outputs.
    """
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} exists and is not a folder; pass a folder path")
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        is_run = (run / "classes.json").is_file()
        if run.is_dir() and not is_run and any(run.iterdir()) and not overwrite:
            raise UserError(
                f"--out {run} is not empty and holds no promptset run (no config.yaml or classes.json); pass a new "
                "or empty folder, or --overwrite to write into it anyway"
            )
        return False
    previous = _read_config(cfg_path).get(stage)
    if previous is None or _identity(previous) == _identity(config):
        return False
    if not overwrite:
        keys = (set(previous) | set(config)) & _IDENTITY_KEYS
        changed = sorted(k for k in keys if _identity(previous).get(k) != _identity(config).get(k))
        raise UserError(
            f"--out {run} already holds a different {stage} run (changed: {', '.join(changed)}); "
            "pass a new --out folder, or --overwrite to replace it"
        )
    return True


_PATH_KEYS = ("data", "out", "run", "test", "train", "class_names")  # always paths
_MAYBE_PATH_KEYS = ("model", "vae", "model_config")  # a path when one exists (else a Hub id or a keyword)


def absolute_spec(spec: str) -> str:
    """A teacher spec with its PATH made absolute (`none` unchanged), so a rerun from another folder finds it."""
    if not spec or spec.strip().lower() == "none":
        return spec
    name, sep, raw = spec.partition(":")
    if not sep or Path(spec).expanduser().exists():
        return os.path.abspath(Path(spec).expanduser())
    return f"{name}:{os.path.abspath(Path(raw.strip()).expanduser())}"


def absolute_paths(config: dict) -> dict:
    """`config` with its relative paths made absolute, as `config.yaml` records them: the file then means the same
    whichever folder a later stage or rerun starts from."""
    out = dict(config)
    for key, value in config.items():
        if not isinstance(value, str) or not value:
            continue
        if key in _PATH_KEYS or (key in _MAYBE_PATH_KEYS and Path(value).expanduser().exists()):
            out[key] = os.path.abspath(Path(value).expanduser())
        elif key == "teacher":
            out[key] = absolute_spec(value)
    return out


def write_config(run: Path, stage: str, config: dict) -> None:
    """Create the run folder and record this stage's resolved config in `config.yaml` (other stages kept), with
    relative paths made absolute."""
    run = Path(run)
    cfg_path = run / "config.yaml"
    existing = _read_config(cfg_path) if cfg_path.is_file() else {}
    existing[stage] = absolute_paths(config)
    from .threads import describe

    # the CPU thread count can change the last bits of a CPU stage's outputs (threads.py): recorded per stage
    existing.setdefault("cpu_threads", {})[stage] = describe()
    run.mkdir(parents=True, exist_ok=True)
    write_text(cfg_path, yaml.safe_dump(existing, sort_keys=False))


def remove_outputs(run: Path, names: list[str]) -> None:
    """Delete files or folders of an earlier run that `--overwrite` replaces."""
    for name in names:
        path = Path(run) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def remove_stale_tmp(folder: Path, *, recursive: bool = True) -> int:
    """Delete `.tmp-*` files and folders a killed process left in `folder` (and below); returns how many.

    Only call it while no other process writes there (rank 0, before the first barrier).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(TMP_PREFIX + "*") if recursive else folder.glob(TMP_PREFIX + "*")
    stale = [p for p in found if p.name.startswith(TMP_PREFIX)]
    removed = 0
    for path in sorted(stale, key=lambda p: len(p.parts)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue  # inside a folder removed just before
        removed += 1
    return removed


def _read_config(path: Path) -> dict:
    return read_yaml(path, "run config", "delete it or pass a fresh --out (one section per stage)")


def stage_config(run: Path, stage: str) -> dict:
    """The resolved config a stage recorded in `<run>/config.yaml` ({} when it has not run here)."""
    path = Path(run) / "config.yaml"
    return (_read_config(path).get(stage) or {}) if path.is_file() else {}


def select_info(run: Path) -> dict:
    """`<run>/select.json` (data, split hash, teacher, resolution, factor, image size), or {} without select."""
    path = Path(run) / "select.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); run select again in this run folder") from err
    if not isinstance(info, dict):
        raise UserError(f"{path} is not a select summary; run select again in this run folder")
    return info


def dataset_image_size(run: Path) -> int | None:
    """Side of one training image of the data the prompts were learned from: select's patch size, else the side
    invert found every one of its (square, equal-size) images to have; None when neither is known.

    The stored set keeps this resolution by default (issue 17: 64 px samples of prompts learned from raw 32 px CIFAR-10
    folders were stored and labelled at 64 px, and a 32 px teacher named their class for 26% of them)."""
    size = select_info(run).get("image_size") or stage_config(run, "invert").get("data_image_size")
    return int(size) if size else None


def artifact_metadata(run: Path, name: str) -> dict:
    """The metadata of `<run>/<name>` (prompts.safetensors, labels.safetensors), or {} when it does not exist."""
    from .artifacts import load_tensors

    path = Path(run) / name
    return load_tensors(path, name.split(".")[0] + " file")[1] if path.is_file() else {}


# Flags that change a stage's result; others (device, progress, checkpoint interval) may differ on resume.
_IDENTITY_KEYS = {
    "backend", "model", "data", "steps", "batch_size", "classes_per_batch", "lr", "resolution", "num_vectors",
    "seed", "template", "initializer", "initializers", "factor", "num_crops", "teacher", "ipc", "guidance",
    "sampler", "weight_decay", "warmup_steps", "prompt_dtype", "flip", "dtype",
    "num_collages", "max_images_per_class", "image_size", "soft_labels", "model_config", "prediction_type",
    "modes", "mode_features",
}
# options added later, at the value that gives what runs made before them gave (recorded runs lack them)
_LATER_DEFAULTS = {"modes": 1, "mode_features": "latent"}


def _identity(config: dict) -> dict:
    """The result-changing part of a stage config; an empty option equals one a stage did not have yet, and so does
    an option added later at its old behaviour's value (`--modes 1` resumes a run recorded before `--modes`)."""
    return {k: v for k, v in absolute_paths(config).items()
            if k in _IDENTITY_KEYS and v != "" and not (k in _LATER_DEFAULTS and _LATER_DEFAULTS[k] == v)}
