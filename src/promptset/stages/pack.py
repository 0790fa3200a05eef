"""`promptset pack RUN --out NAME.safetensors`: the distilled set as one file a colleague can turn back into data.

It holds what a receiver needs and nothing more (`packfile` has the layout): the prompt tensors as stored, the class
list, the seeds of every round, the soft labels of every patch through their codec, the generation settings, the
generator's name and fingerprint, the teacher's name and sha256, and, when `evaluate` measured exactly this set, the
student recipe and its accuracy; a content hash covers all of it. By default the set is generate's (one round,
`generated/`); `--entry KEY` packs the rounds an evaluate entry trained on (P1 with fresh images: every round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..accounting import COMPRESSOR, compressed_size, fmt_bytes, tensor_data
from ..artifacts import load_tensors
from ..config import make_config, opt
from ..errors import UserError
from ..labelcodec import decode_soft_labels, label_parts, take_rows
from ..packfile import write_pack
from ..runfolder import ClassInfo, check_same_classes, require_classes, require_prompts

# the recipe fields a receiver needs to train the student as evaluate did (no local paths)
_RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "targets",
                "temperature", "augment", "regen_every", "loss", "steps_per_epoch")


@dataclass
class PackConfig:
    run: str = opt("", "run folder to pack (prompts.safetensors, and labels.safetensors from generate)",
                   positional=True)
    out: str = opt("", "the packed file to write, NAME.safetensors")
    entry: str = opt("", "pack the rounds an evaluate entry trained on, by its key in <run>/eval/results.json (e.g. "
                     "d3m/p1/convnet3/ipc10/regen30/mixed); default: generate's images and labels")
    overwrite: bool = opt(False, "replace an existing --out")


def pack(cfg: PackConfig | None = None, **overrides) -> Path:
    """Write the packed file; returns its path."""
    cfg = make_config(PackConfig, cfg, overrides, "pack")
    out, tensors, info, label_meta = _prepare(cfg)
    write_pack(out, tensors, info, label_meta)
    stored = info["stored"]
    lines = [f"pack: wrote {out} ({fmt_bytes(out.stat().st_size)} on disk; {info['generation']['rounds']} round(s) "
             f"of {info['generation']['ipc']} images per class, {len(info['classes'])} classes)"]
    if "mode_rule" in info["prompts"]:  # several prompts per class: their classes and weights travel with them
        lines.append(f"  modes: {len(json.loads(info['prompts']['token_names']))} prompts for {len(info['classes'])} "
                     f"classes, each class's images spread over its modes by rule {info['prompts']['mode_rule']!r}")
    for name, n in stored["bytes"].items():
        packed = fmt_bytes(stored["compressed"][name])
        lines.append(f"  {name:<22} {fmt_bytes(n):>10}   {stored['compressor']} {packed}")
    ev = info["evaluation"]
    lines.append("  accuracy: " + (f"{ev['final_top1']['mean']:.2f}% final top-1 ({ev['protocol']}, {ev['student']}, "
                                   f"{ev['epochs']} epochs, {len(ev['seeds'])} seeds; entry {ev['key']})"
                                   if ev else "not measured by evaluate on exactly this set"))
    lines.append(f"  receiver: promptset materialize {out} --model <{info['generator']['model_id']}> --out DIR")
    print("\n".join(lines), flush=True)
    return out


def _prepare(cfg: PackConfig) -> tuple[Path, dict, dict, dict]:
    """Read and check everything, build the tensors and metadata; writes nothing."""
    if not cfg.run:
        raise UserError("RUN is required: promptset pack RUN --out NAME.safetensors")
    if not cfg.out:
        raise UserError("--out is required: the packed file to write, e.g. --out cifar10-d3m.safetensors")
    run, out = Path(cfg.run), Path(cfg.out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors (the packed set is one safetensors file)")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--out {out} exists; pass another name or --overwrite")
    classes = require_classes(run)
    require_prompts(run, classes)
    prompt_tensors, prompt_meta = load_tensors(run / "prompts.safetensors", "prompts file")
    prompt_meta = {k: v for k, v in prompt_meta.items() if k not in ("content_sha256", "metadata_sha256")}
    source = _from_entry(run, classes, cfg.entry) if cfg.entry else _from_generate(run, classes)
    labels, label_meta = source["labels"], source["label_meta"]
    tensors = {**{f"prompts.{k}": v for k, v in prompt_tensors.items()}, "seeds": source["seeds"], **labels}
    components = {"class_list": ["\n".join(c.folder for c in classes).encode("utf-8")],
                  "prompts": [tensor_data(prompt_tensors[k]) for k in sorted(prompt_tensors)],
                  "seeds": [tensor_data(source["seeds"])], **{k: [tensor_data(v)] for k, v in sorted(labels.items())}}
    info = {
        "classes": [{"folder": c.folder, "name": c.name} for c in classes],
        "prompts": prompt_meta,
        "generator": {"backend": prompt_meta["backend"], "model_id": prompt_meta["model_id"],
                      "model_hash": prompt_meta["model_hash"]},
        "generation": source["generation"],
        "labels": {"kind": "logits" if labels else "none", "codec": label_meta.get("label_codec"),
                   "shape": json.loads(label_meta["label_shape"]) if labels else None,
                   "order": "per round: class by class (classes order), patch index within the class"},
        "teacher": source["teacher"],
        "evaluation": source["evaluation"],
        "image_sha256": source["image_sha256"],
        **{k: source[k] for k in ("image_digests", "made_with") if k in source},
        "source": source["source"],
        "stored": {"bytes": {k: len(b"".join(v)) for k, v in components.items()}, "compressor": COMPRESSOR,
                   "compressed": {k: compressed_size(v) for k, v in components.items()}},
    }
    return out, tensors, info, label_meta


def _teacher(meta: dict) -> dict | None:
    """The teacher's name (its spec without the local folder) and sha256, from a labels file's metadata."""
    spec = meta.get("teacher")
    if not spec or spec == "none" or meta.get("label_kind", "logits") == "none":
        return None
    name, sep, path = spec.partition(":")
    return {"name": f"{name}:{Path(path).name}" if sep else Path(spec).name, "sha256": meta.get("teacher_sha256")}


def _from_generate(run: Path, classes: list[ClassInfo]) -> dict:
    """generate's set: one round of seeds, the labels of the first ipc patches per class, in ImageFolder order."""
    path = run / "labels.safetensors"
    if not path.is_file():
        raise UserError(f"{path} not found: run `promptset generate --run {run}` first (pack stores its seeds)")
    tensors, meta = load_tensors(path, "labels file")
    check_same_classes([c.folder for c in classes], json.loads(meta.get("class_folders", "[]")), str(path),
                       "run generate again in this run folder")
    if "image_sha256" not in meta or "generation" not in meta:
        raise UserError(f"{path} was written by an older promptset (no image hash or generation settings); run "
                        "generate again")
    ipc, per_class, factor = int(meta["ipc"]), int(meta["images_per_class"]), int(meta["factor"])
    c, p = len(classes), factor**2
    labels, label_meta = {}, {}
    if decode_soft_labels(tensors, meta) is not None:
        rows = torch.tensor([(k * per_class + i // p) * p + i % p for k in range(c) for i in range(ipc)])
        labels, label_meta = take_rows(tensors, meta, rows)
        labels = {k: v if k.endswith(".codebook") else v.unsqueeze(0) for k, v in labels.items()}  # (1, C*ipc, ...)
        label_meta["label_shape"] = json.dumps([1, c * ipc, c])
    generation = {**json.loads(meta["generation"]), "ipc": ipc, "images_per_class": per_class, "rounds": 1,
                  "seed_stages": ["generate"]}
    seeds = tensors["seeds"].reshape(1, -1)  # (1, C*per_class)
    return {"seeds": seeds, "labels": labels, "label_meta": label_meta, "generation": generation,
            "teacher": _teacher(meta), "image_sha256": json.loads(meta["image_sha256"]),
            "evaluation": _measured(run, seeds, labels, json.loads(meta["image_sha256"])),
            "source": "generate", **_made(meta)}


def _from_entry(run: Path, classes: list[ClassInfo], key: str) -> dict:
    """The rounds one evaluate entry trained on, from its labels file, with its accuracy."""
    results_path = run / "eval" / "results.json"
    entries = json.loads(results_path.read_text()).get("entries", {}) if results_path.is_file() else {}
    entry = entries.get(key)
    if entry is None or entry.get("method") != "d3m":
        keys = [k for k, e in entries.items() if e.get("method") == "d3m"]
        raise UserError(f"--entry {key!r} is not a d3m entry of {results_path}; pack one of {keys[:8]} (or omit "
                        "--entry for generate's set)")
    path = run / entry["distilled"]["labels_file"]
    tensors, meta = load_tensors(path, "evaluate labels file")
    check_same_classes([c.folder for c in classes], json.loads(meta.get("class_folders", "[]")), str(path),
                       "evaluate again in this run folder")
    if "generation_settings" not in meta or "image_sha256" not in meta:
        raise UserError(f"{path} was written by an older promptset (no generation settings or image hashes); "
                        f"evaluate --entry {key} again")
    labels = label_parts(tensors)
    label_meta = {k: meta[k] for k in ("label_codec", "label_shape") if k in meta} if labels else {}
    rounds = int(meta["rounds"])
    generation = {**json.loads(meta["generation_settings"]), "ipc": int(meta["ipc"]),
                  "images_per_class": int(tensors["seeds"].shape[1]) // len(classes), "rounds": rounds,
                  "seed_stages": ["generate", *[f"eval-round{r}" for r in range(1, rounds)]]}
    return {"seeds": tensors["seeds"], "labels": labels, "label_meta": label_meta, "generation": generation,
            "teacher": _teacher(meta), "image_sha256": json.loads(meta["image_sha256"]),
            "evaluation": _evaluation(key, entry), "source": f"evaluate entry {key}", **_made(meta)}


def _made(meta: dict) -> dict:
    """Each image's short hash and where the images were made (files from before promptset recorded them: none)."""
    return {k: json.loads(meta[k]) for k in ("image_digests", "made_with") if k in meta}


def _evaluation(key: str, entry: dict) -> dict:
    recipe = entry.get("recipe") or {}
    return {"key": key, "protocol": entry["protocol"], "student": entry["student"], "epochs": entry["epochs"],
            "seeds": entry["seeds"], "image_size": entry["image_size"], "final_top1": entry["final_top1"],
            "best_top1": entry["best_top1"], "optimizer_steps": entry.get("optimizer_steps"),
            "recipe": {k: recipe[k] for k in _RECIPE_KEYS if k in recipe},
            "test_split_hash": (entry.get("split_hash") or {}).get("test")}


def _measured(run: Path, seeds: torch.Tensor, labels: dict, hashes: list[str]) -> dict | None:
    """The evaluate entry (d3m) that trained on exactly this set: the same seeds, labels and images, if any."""
    results_path = run / "eval" / "results.json"
    if not results_path.is_file():
        return None
    for key, entry in json.loads(results_path.read_text()).get("entries", {}).items():
        path = run / ((entry.get("distilled") or {}).get("labels_file") or "-")
        if entry.get("method") != "d3m" or not path.is_file():
            continue
        tensors, meta = load_tensors(path, "evaluate labels file")
        same = (json.loads(meta.get("image_sha256", "[]")) == hashes and torch.equal(tensors["seeds"], seeds)
                and label_parts(tensors).keys() == labels.keys()
                and all(torch.equal(tensors[k], v) for k, v in labels.items()))
        if same:
            return _evaluation(key, entry)
    return None
