"""`promptset budget`: what a run stores (prompts, seeds, soft labels, class list) against real images at IPC k.

The generator's and teacher's weights are named but not counted, as in the paper. Real images are counted raw
(uint8) and PNG/JPEG-compressed, so both views are honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..accounting import class_list_bytes, compressed_real_sizes, fmt_bytes, real_bytes
from ..artifacts import load_tensors
from ..atomic import write_json
from ..config import make_config, opt
from ..errors import UserError
from ..runfolder import artifact_metadata, require_classes, select_info


@dataclass
class BudgetConfig:
    run: str = opt("", "run folder")
    data: str = opt("", "real ImageFolder for the compressed-size comparison (default: the one select used)")
    image_size: int = opt(0, "side of one real training image in pixels (default: from select.json)")
    ipcs: str = opt("1,10,50", "comma-separated IPC values to compare against")


def stored_components(run: Path) -> dict[str, int]:
    """Stored bytes per component of a run, read from the artifacts themselves (their tensors as stored)."""
    classes = require_classes(run)
    parts = {"class_list": class_list_bytes([c.folder for c in classes])}
    prompts = run / "prompts.safetensors"
    if prompts.is_file():
        tensors, _ = load_tensors(prompts, "prompts file")
        parts["prompts"] = sum(t.numel() * t.element_size() for t in tensors.values())
    labels = run / "labels.safetensors"
    if labels.is_file():
        tensors, _ = load_tensors(labels, "labels file")
        parts["seeds"] = tensors["seeds"].numel() * tensors["seeds"].element_size()
        if "soft_labels" in tensors:
            parts["soft_labels"] = tensors["soft_labels"].numel() * tensors["soft_labels"].element_size()
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
    size = cfg.image_size or selected.get("image_size")
    if not size:
        raise UserError(f"--image-size is required: {run} has no select.json to read the dataset image size from")
    try:
        ipcs = [int(x) for x in cfg.ipcs.split(",") if x.strip()]
    except ValueError as err:
        raise UserError(f"--ipcs {cfg.ipcs!r}: expected comma-separated integers") from err
    data = Path(cfg.data) if cfg.data else (Path(selected["data"]) if selected.get("data") else None)
    parts = stored_components(run)
    stored = sum(parts.values())
    per_image_all = real_bytes(1, num_classes, size)
    meta = artifact_metadata(run, "prompts.safetensors")
    real = []
    for ipc in ipcs:
        row = {"ipc": ipc, "raw_bytes": real_bytes(ipc, num_classes, size)}
        if data is not None and data.is_dir():
            sizes = compressed_real_sizes(data, ipc, size)
            row["png_bytes"], row["jpeg_q75_bytes"] = sizes["png_bytes"], sizes["jpeg_q75_bytes"]
            # classes with fewer than ipc images make the compressed sizes cover fewer images than the raw bytes
            row["images_counted"], row["classes_short"] = sizes["images"], sizes["classes_short"]
        row["stored_over_raw"] = stored / row["raw_bytes"]
        real.append(row)
    result = {
        "run": str(run),
        "num_classes": num_classes,
        "image_size": size,
        "stored_bytes": stored,
        "components": parts,
        "ipc_equivalent_raw": stored / per_image_all,
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


def _print_table(result: dict) -> None:
    print(f"stored bytes of {result['run']} ({result['num_classes']} classes, {result['image_size']} px images)")
    for name, n in result["components"].items():
        print(f"  {name:<12} {fmt_bytes(n):>12}")
    total = fmt_bytes(result["stored_bytes"])
    print(f"  {'total':<12} {total:>12}   = {result['ipc_equivalent_raw']:.3f} raw images/class")
    header = f"  {'IPC':>4} {'raw uint8':>12} {'PNG':>12} {'JPEG q75':>12} {'stored/raw':>11}"
    print("real images at the same resolution:")
    print(header)
    for row in result["real"]:
        png = fmt_bytes(row["png_bytes"]) if "png_bytes" in row else "-"
        jpg = fmt_bytes(row["jpeg_q75_bytes"]) if "jpeg_q75_bytes" in row else "-"
        short = ""
        if row.get("classes_short"):
            short = f"  (only {row['images_counted']} real images: {row['classes_short']} classes have fewer)"
        ratio = row["stored_over_raw"]
        print(f"  {row['ipc']:>4} {fmt_bytes(row['raw_bytes']):>12} {png:>12} {jpg:>12} {ratio:>11.4f}{short}")
    nc = result["not_counted"]
    print(f"not counted: generator {nc['generator']['backend']} {nc['generator']['model']}, teacher {nc['teacher']}")
