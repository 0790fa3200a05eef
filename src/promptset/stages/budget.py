"""`promptset budget`: what a run stores (prompts, seeds, soft labels, class list) against real images at IPC k.

The generator's and teacher's weights are named but not counted, as in the paper. Every component is shown as its
canonical array bytes and after one standard compressor (`accounting.COMPRESSOR`, the same for everything); soft
labels per tensor of their codec (values, indices, fill values, scales, codebook). Real images are counted raw
(uint8), as PNG and JPEG q75 files, and each of those after the same compressor, so every view is honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..accounting import (
    COMPRESSOR,
    compressed_real_sizes,
    compressed_size,
    fmt_bytes,
    real_bytes,
    tensor_data,
)
from ..artifacts import PromptSet, load_tensors
from ..atomic import write_json
from ..config import make_config, opt
from ..errors import UserError
from ..labelcodec import decode_soft_labels, label_parts
from ..runfolder import artifact_metadata, dataset_image_size, require_classes, select_info, stage_config


@dataclass
class BudgetConfig:
    run: str = opt("", "run folder")
    data: str = opt("", "real ImageFolder for the compressed-size comparison (default: the one select used)")
    image_size: int = opt(0, "side of one real training image in pixels (default: the resolution of the data the "
                          "prompts were learned from, else the stored images')")
    ipcs: str = opt("1,10,50", "comma-separated IPC values to compare against")


def stored_components(run: Path) -> dict[str, int]:
    """Stored bytes per component of a run, read from the artifacts themselves (their tensors as stored)."""
    return {name: len(b"".join(chunks)) for name, chunks in _component_data(run).items()}


def _component_data(run: Path) -> dict[str, list[bytes]]:
    """The canonical bytes of every stored component: class list, prompt tensors, seeds, each soft-label tensor."""
    classes = require_classes(run)
    parts = {"class_list": ["\n".join(c.folder for c in classes).encode("utf-8")]}
    prompts = run / "prompts.safetensors"
    if prompts.is_file():
        tensors, _ = load_tensors(prompts, "prompts file")
        parts["prompts"] = [tensor_data(tensors[k]) for k in sorted(tensors)]
    labels = run / "labels.safetensors"
    if labels.is_file():
        tensors, meta = load_tensors(labels, "labels file")
        parts["seeds"] = [tensor_data(tensors["seeds"])]
        decode_soft_labels(tensors, meta)  # a file the one decoder cannot read is refused here, not later
        for name, t in sorted(label_parts(tensors).items()):
            parts[name] = [tensor_data(t)]
    return parts


def budget(cfg: BudgetConfig | None = None, **overrides) -> dict:
    """Write `<run>/budget.json` and print the comparison table; returns the JSON dict."""
    cfg = make_config(BudgetConfig, cfg, overrides, "budget")
    if not cfg.run:
        raise UserError("--run is required")
    run = Path(cfg.run)
    classes = require_classes(run)
    num_classes = len(classes)
    selected = select_info(run)
    size = cfg.image_size or dataset_image_size(run) or int(artifact_metadata(run, "labels.safetensors")
                                                            .get("image_size") or 0)
    if not size:
        raise UserError(f"--image-size is required: {run} has no select.json, invert record or generated images to "
                        "read the dataset image size from")
    try:
        ipcs = [int(x) for x in cfg.ipcs.split(",") if x.strip()]
    except ValueError as err:
        raise UserError(f"--ipcs {cfg.ipcs!r}: expected comma-separated integers") from err
    default_data = selected.get("data") or (stage_config(run, "invert").get("data") if not selected else None)
    data = Path(cfg.data) if cfg.data else (Path(default_data) if default_data else None)
    data_parts = _component_data(run)
    parts = {name: len(b"".join(chunks)) for name, chunks in data_parts.items()}
    packed = {name: compressed_size(chunks) for name, chunks in data_parts.items()}
    stored = sum(parts.values())
    stored_packed = sum(packed.values())
    per_image_all = real_bytes(1, num_classes, size)
    meta = artifact_metadata(run, "prompts.safetensors")
    real = []
    for ipc in ipcs:
        row = {"ipc": ipc, "raw_bytes": real_bytes(ipc, num_classes, size)}
        if data is not None and data.is_dir():
            sizes = compressed_real_sizes(data, ipc, size)
            for key in ("png_bytes", "jpeg_q75_bytes", "raw_zlib_bytes", "png_zlib_bytes", "jpeg_q75_zlib_bytes"):
                row[key] = sizes[key]
            # classes with fewer than ipc images make the compressed sizes cover fewer images than the raw bytes
            row["images_counted"], row["classes_short"] = sizes["images"], sizes["classes_short"]
        row["stored_over_raw"] = stored / row["raw_bytes"]
        if "raw_zlib_bytes" in row:  # both sides after the same compressor
            row["stored_compressed_over_raw_compressed"] = stored_packed / row["raw_zlib_bytes"]
        real.append(row)
    result = {
        "run": str(run),
        "num_classes": num_classes,
        "image_size": size,
        "stored_bytes": stored,
        "components": parts,
        "compressor": COMPRESSOR,
        "stored_bytes_compressed": stored_packed,
        "components_compressed": packed,
        "label_codec": artifact_metadata(run, "labels.safetensors").get("label_codec"),
        "ipc_equivalent_raw": stored / per_image_all,
        "prompts": _prompt_counts(run),
        "real": real,
        "real_data": str(data) if data else None,
        "not_counted": {
            "generator": {"backend": meta.get("backend"), "model": meta.get("model_id"),
                          "fingerprint": meta.get("model_hash")},
            "teacher": artifact_metadata(run, "labels.safetensors").get("teacher"),
        },
    }
    write_json(run / "budget.json", result)
    _print_table(result)
    return result


def _prompt_counts(run: Path) -> dict | None:
    """How many prompts the run stores, and with modes how many per class (every one is counted in `prompts`)."""
    if not (run / "prompts.safetensors").is_file():
        return None
    prompts = PromptSet.load(run / "prompts.safetensors")
    out = {"prompts": prompts.num_prompts, "vectors_per_prompt": prompts.num_vectors}
    return out | ({"modes_per_class": prompts.modes_per_class()} if prompts.has_modes else {})


def _print_table(result: dict) -> None:
    codec = f", soft labels {result['label_codec']}" if result.get("label_codec") else ""
    counts = result.get("prompts") or {}
    if "modes_per_class" in counts:
        low, high = min(counts["modes_per_class"]), max(counts["modes_per_class"])
        codec += f", {counts['prompts']} prompts: {high if low == high else f'{low}-{high}'} modes per class"
    print(f"stored bytes of {result['run']} ({result['num_classes']} classes, {result['image_size']} px images"
          f"{codec})")
    packed = result["components_compressed"]
    print(f"  {'component':<24} {'array bytes':>12} {result['compressor']:>14}")
    for name, n in result["components"].items():
        print(f"  {name:<24} {fmt_bytes(n):>12} {fmt_bytes(packed[name]):>14}")
    total = fmt_bytes(result["stored_bytes"])
    print(f"  {'total':<24} {total:>12} {fmt_bytes(result['stored_bytes_compressed']):>14}   = "
          f"{result['ipc_equivalent_raw']:.3f} raw images/class")
    z = result["compressor"]
    header = (f"  {'IPC':>4} {'raw uint8':>11} {'raw+' + z[:4]:>11} {'PNG':>11} {'PNG+' + z[:4]:>11} {'JPEG q75':>11} "
              f"{'JPEG+' + z[:4]:>11} {'stored/raw':>11}")
    print(f"real images at the same resolution (+{z[:4]}: after {z}, as the stored set):")
    print(header)
    for row in result["real"]:
        keys = ("raw_bytes", "raw_zlib_bytes", "png_bytes", "png_zlib_bytes", "jpeg_q75_bytes", "jpeg_q75_zlib_bytes")
        cells = [fmt_bytes(row[k]) if k in row else "-" for k in keys]
        short = ""
        if row.get("classes_short"):
            short = f"  (only {row['images_counted']} real images: {row['classes_short']} classes have fewer)"
        ratio = row["stored_over_raw"]
        print(f"  {row['ipc']:>4} " + " ".join(f"{c:>11}" for c in cells) + f" {ratio:>11.4f}{short}")
    nc = result["not_counted"]
    print(f"not counted: generator {nc['generator']['backend']} {nc['generator']['model']}, teacher {nc['teacher']}")
