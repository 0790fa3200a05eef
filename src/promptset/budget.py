"""Byte accounting: what a run stores (prompts, seeds, soft labels, class list) against real images at IPC k.

The generator's and teacher's weights are named but not counted, as in the paper. Real images are counted raw
(uint8) and PNG/JPEG-compressed, so both views are honest.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from .artifacts import load_tensors
from .atomic import write_json
from .config import opt
from .errors import UserError
from .runfolder import require_classes

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass
class BudgetConfig:
    run: str = opt("", "run folder")
    data: str = opt("", "real ImageFolder for the compressed-size comparison (default: the one select used)")
    image_size: int = opt(0, "side of one real training image in pixels (default: from select.json)")
    ipcs: str = opt("1,10,50", "comma-separated IPC values to compare against")


def prompt_bytes(num_classes: int, num_vectors: int, dim: int, dtype: str) -> int:
    """Bytes of the stored prompt tensor (int8 adds one fp16 scale per vector)."""
    n = num_classes * num_vectors
    return n * dim * DTYPE_BYTES[dtype] + (n * 2 if dtype == "int8" else 0)


def real_bytes(ipc: int, num_classes: int, size: int, channels: int = 3) -> int:
    return ipc * num_classes * size * size * channels


def class_list_bytes(folders: list[str]) -> int:
    return len("\n".join(folders).encode("utf-8"))


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


_CODECS = (("png_bytes", "PNG", {"optimize": True}), ("jpeg_q75_bytes", "JPEG", {"quality": 75}))


def compressed_real_sizes(data: Path, ipc: int, size: int) -> dict[str, int]:
    """PNG (lossless) and JPEG q75 bytes of the first `ipc` images per class, resized to `size`.

    A class with fewer than `ipc` images contributes all it has, so `images` (how many were counted) can be below
    `ipc * classes`; the compressed sizes are then those of the images that exist, not of `ipc` per class.
    """
    from .data import load_image, resize_center_crop, scan_image_folder

    index = scan_image_folder(data, flag="--data", check_headers=False)
    sizes = {"png_bytes": 0, "jpeg_q75_bytes": 0, "images": 0, "classes_short": 0}
    for files in index.files:
        sizes["classes_short"] += len(files) < ipc
        for path in files[:ipc]:
            img = resize_center_crop(load_image(path), size)
            for key, fmt, options in _CODECS:
                buf = io.BytesIO()
                img.save(buf, format=fmt, **options)
                sizes[key] += buf.tell()
            sizes["images"] += 1
    return sizes


def compressed_real_bytes(data: Path, ipc: int, size: int, fmt: str = "PNG") -> int:
    """Bytes of the first `ipc` images per class, resized to `size`, encoded as PNG (lossless) or JPEG q75."""
    return compressed_real_sizes(data, ipc, size)["png_bytes" if fmt == "PNG" else "jpeg_q75_bytes"]


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def print_budget(run: Path, stored: int, *, num_classes: int, image_size: int | None, title: str) -> None:
    """Print stored bytes against raw real images at IPC 1/10/50, before compute is spent."""
    size = image_size or _select_image_size(run)
    lines = [title, f"  stored (prompts + class list): {_fmt(stored)}"]
    if size:
        per_ipc = real_bytes(1, num_classes, size)
        lines.append(f"  IPC-equivalent at {size}x{size}x3 uint8: {stored / per_ipc:.3f} images per class")
        for ipc in (1, 10, 50):
            lines.append(f"  real images, IPC {ipc:>2}: {_fmt(real_bytes(ipc, num_classes, size))} raw")
    print("\n".join(lines), flush=True)


def _select_image_size(run: Path) -> int | None:
    path = Path(run) / "select.json"
    if path.is_file():
        return int(json.loads(path.read_text())["image_size"])
    return None


def budget(cfg: BudgetConfig | None = None, **overrides) -> dict:
    """Write `<run>/budget.json` and print the comparison table; returns the JSON dict."""
    cfg = cfg or BudgetConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if not cfg.run:
        raise UserError("--run is required")
    run = Path(cfg.run)
    classes = require_classes(run)
    num_classes = len(classes)
    select_info = json.loads((run / "select.json").read_text()) if (run / "select.json").is_file() else {}
    size = cfg.image_size or select_info.get("image_size")
    if not size:
        raise UserError(f"--image-size is required: {run} has no select.json to read the dataset image size from")
    try:
        ipcs = [int(x) for x in cfg.ipcs.split(",") if x.strip()]
    except ValueError as err:
        raise UserError(f"--ipcs {cfg.ipcs!r}: expected comma-separated integers") from err
    data = Path(cfg.data) if cfg.data else (Path(select_info["data"]) if select_info.get("data") else None)
    parts = stored_components(run)
    stored = sum(parts.values())
    per_image_all = real_bytes(1, num_classes, size)
    meta = _prompt_meta(run)
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
            "teacher": _teacher_name(run),
        },
    }
    write_json(run / "budget.json", result)
    _print_table(result)
    return result


def _prompt_meta(run: Path) -> dict:
    path = run / "prompts.safetensors"
    if not path.is_file():
        return {}
    _, meta = load_tensors(path, "prompts file")
    return meta


def _teacher_name(run: Path) -> str | None:
    labels = run / "labels.safetensors"
    if labels.is_file():
        _, meta = load_tensors(labels, "labels file")
        return meta.get("teacher")
    return None


def _print_table(result: dict) -> None:
    print(f"stored bytes of {result['run']} ({result['num_classes']} classes, {result['image_size']} px images)")
    for name, n in result["components"].items():
        print(f"  {name:<12} {_fmt(n):>12}")
    total = _fmt(result["stored_bytes"])
    print(f"  {'total':<12} {total:>12}   = {result['ipc_equivalent_raw']:.3f} raw images/class")
    header = f"  {'IPC':>4} {'raw uint8':>12} {'PNG':>12} {'JPEG q75':>12} {'stored/raw':>11}"
    print("real images at the same resolution:")
    print(header)
    for row in result["real"]:
        png = _fmt(row["png_bytes"]) if "png_bytes" in row else "-"
        jpg = _fmt(row["jpeg_q75_bytes"]) if "jpeg_q75_bytes" in row else "-"
        short = ""
        if row.get("classes_short"):
            short = f"  (only {row['images_counted']} real images: {row['classes_short']} classes have fewer)"
        ratio = row["stored_over_raw"]
        print(f"  {row['ipc']:>4} {_fmt(row['raw_bytes']):>12} {png:>12} {jpg:>12} {ratio:>11.4f}{short}")
    nc = result["not_counted"]
    print(f"not counted: generator {nc['generator']['backend']} {nc['generator']['model']}, teacher {nc['teacher']}")
