"""Bytes: what a distilled set stores (prompts, seeds, soft labels, class list), what real images cost, and how
both are printed. The generator's and teacher's weights are named but never counted, as in the paper.

Every component is counted twice: its canonical array bytes (what dtype arithmetic gives), and its size after one
standard compressor, `COMPRESSOR`, the same for every method and for real images (their raw pixels, and their PNG
and JPEG files): dtype arithmetic alone overstates codec ratios.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
SEED_BYTES = 4  # one int32 per generated image


COMPRESSOR = "zlib level 9"  # deflate, in every Python; the one compressor of every "compressed" number
_LEVEL = 9


def compressed_size(chunks: Iterable[bytes]) -> int:
    """Bytes of the chunks, concatenated, after `COMPRESSOR` (streamed: nothing is held whole)."""
    z = zlib.compressobj(_LEVEL)
    n = 0
    for chunk in chunks:
        n += len(z.compress(chunk))
    return n + len(z.flush())


def tensor_data(t: torch.Tensor) -> bytes:
    """A tensor's canonical bytes: its elements, row-major, little-endian (as safetensors stores them)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensors_compressed(tensors: Iterable[torch.Tensor]) -> int:
    """`compressed_size` of tensors' canonical bytes, one after the other."""
    return compressed_size(tensor_data(t) for t in tensors)


MODE_BYTES = 8  # per prompt of a set with modes: its class and its weight, one int32 each


def prompt_bytes(num_prompts: int, num_vectors: int, dim: int, dtype: str, modes: bool = False) -> int:
    """Bytes of the stored prompt tensors: one prompt per class, or with modes one per (class, mode) plus each
    mode's class and weight (int8 adds one fp16 scale per vector)."""
    n = num_prompts * num_vectors
    scales = n * 2 if dtype == "int8" else 0
    return n * dim * DTYPE_BYTES[dtype] + scales + (num_prompts * MODE_BYTES if modes else 0)


def real_bytes(ipc: int, num_classes: int, size: int, channels: int = 3) -> int:
    """Raw uint8 bytes of `ipc` real images per class at `size` x `size`."""
    return ipc * num_classes * size * size * channels


def class_list_bytes(folders: list[str]) -> int:
    return len("\n".join(folders).encode("utf-8"))


def fmt_bytes(n: float | None) -> str:
    """1,234 B, 12.3 KB, 4.5 MB (powers of 1000); '-' for None."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def check_stored_bytes(planned: dict[str, int], actual: dict[str, int], what: str) -> None:
    """The bytes printed before compute must be the bytes stored: refuse to go on when they are not."""
    wrong = {k: (planned.get(k), v) for k, v in actual.items() if planned.get(k) != v}
    if wrong:
        raise RuntimeError(
            f"{what}: stored bytes differ from the planned budget (component: (planned, stored)) {wrong}; "
            "this is a bug in promptset, please report it"
        )


def png_bytes(images: torch.Tensor) -> int:
    """PNG size of uint8 images (N, 3, S, S), encoded one by one as real images are in `compressed_real_sizes`."""
    from .data import to_pil

    total = 0
    for img in images:
        buf = io.BytesIO()
        to_pil(img.float().div(255)).save(buf, format="PNG", optimize=True)
        total += buf.tell()
    return total


_CODECS = (("png_bytes", "PNG", {"optimize": True}), ("jpeg_q75_bytes", "JPEG", {"quality": 75}))


def compressed_real_sizes(data: Path, ipc: int, size: int) -> dict[str, int]:
    """PNG (lossless) and JPEG q75 bytes of the first `ipc` images per class, resized to `size`, and the
    `COMPRESSOR` size of their raw pixels, of their PNG files and of their JPEG files (each stream concatenated).

    A class with fewer than `ipc` images contributes all it has, so `images` (how many were counted) can be below
    `ipc * classes`; the compressed sizes are then those of the images that exist, not of `ipc` per class.
    """
    import numpy as np

    from .data import load_image, resize_center_crop, scan_image_folder

    index = scan_image_folder(data, flag="--data", check_headers=False)
    sizes = {"png_bytes": 0, "jpeg_q75_bytes": 0, "images": 0, "classes_short": 0}
    streams = {name: zlib.compressobj(_LEVEL) for name in ("raw_zlib_bytes", "png_zlib_bytes", "jpeg_q75_zlib_bytes")}
    packed = dict.fromkeys(streams, 0)
    for files in index.files:
        sizes["classes_short"] += len(files) < ipc
        for path in files[:ipc]:
            img = resize_center_crop(load_image(path), size)
            chunks = {"raw_zlib_bytes": np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).tobytes()}  # (3, S, S)
            for key, fmt, options in _CODECS:
                buf = io.BytesIO()
                img.save(buf, format=fmt, **options)
                sizes[key] += buf.tell()
                chunks[key.replace("_bytes", "_zlib_bytes")] = buf.getvalue()
            for name, chunk in chunks.items():
                packed[name] += len(streams[name].compress(chunk))
            sizes["images"] += 1
    for name, stream in streams.items():
        sizes[name] = packed[name] + len(stream.flush())
    return sizes


def print_budget(stored: int, *, num_classes: int, image_size: int | None, title: str) -> None:
    """Print stored bytes against raw real images at IPC 1/10/50, before compute is spent."""
    lines = [title, f"  stored (prompts + class list): {fmt_bytes(stored)}"]
    if image_size:
        per_ipc = real_bytes(1, num_classes, image_size)
        lines.append(f"  IPC-equivalent at {image_size}x{image_size}x3 uint8: {stored / per_ipc:.3f} images per class")
        for ipc in (1, 10, 50):
            lines.append(f"  real images, IPC {ipc:>2}: {fmt_bytes(real_bytes(ipc, num_classes, image_size))} raw")
    print("\n".join(lines), flush=True)
