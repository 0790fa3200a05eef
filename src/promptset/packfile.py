"""The packed distilled set: one safetensors file that `promptset pack` writes and `promptset materialize` reads.

Tensors: `prompts.<name>` (the prompt tensors as stored: fp32/fp16 embeddings, or int8 plus scales; with modes also
`prompts.mode_class` and `prompts.mode_weight`, which say which mode each image of a class is drawn from), `seeds`
(R, C * images per class) int32, one row per round of images, and the soft labels of every patch of every round
through their codec (`soft_labels` or `soft_labels.<part>`, leading dims (R, C * ipc), ImageFolder order; see
`labelcodec`). Metadata: one JSON value per key (`format`, `classes`, `prompts`, `generator`, `generation`, `labels`,
`teacher`, `evaluation`, `image_sha256`, `stored`) plus the codec's `label_codec` and `label_shape`.

Integrity: `content_sha256` (names, dtypes, shapes and bytes of every tensor) and `metadata_sha256` (every other
metadata string) are stored and checked, and the header must be the compact JSON safetensors writes followed only
by its padding, so a change to any single byte of the file is refused (a whitespace change inside the header would
otherwise parse to the same content).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .artifacts import load_tensors, save_tensors
from .errors import UserError

PACK_FORMAT = "promptset.pack"
PACK_VERSION = "1"
REQUIRED = ("classes", "prompts", "generator", "generation", "labels", "teacher", "evaluation", "image_sha256")


@dataclass
class PackedSet:
    """A packed set as read back: its tensors and its metadata, every JSON value decoded."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict  # key -> decoded JSON value
    raw_meta: dict[str, str]  # as stored (what `labelcodec.decode_soft_labels` reads)

    @property
    def rounds(self) -> int:
        return int(self.tensors["seeds"].shape[0])

    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        return {k[len("prompts.") :]: v for k, v in self.tensors.items() if k.startswith("prompts.")}


def write_pack(path: Path, tensors: dict[str, torch.Tensor], info: dict, label_meta: dict[str, str]) -> None:
    """Write the packed file atomically: `info` values become JSON metadata strings, hashes are added."""
    meta = {"format": PACK_FORMAT, "format_version": PACK_VERSION, "promptset_version": __version__}
    meta.update({k: json.dumps(v, sort_keys=True) for k, v in info.items()})
    meta.update(label_meta)
    save_tensors(path, tensors, meta)


def read_pack(path: str | Path, flag: str = "FILE") -> PackedSet:
    """Read and verify a packed file; a UserError naming it for anything truncated, edited or foreign."""
    path = Path(path)
    what = f"{flag} {path}"
    if not path.is_file():
        raise UserError(f"{what}: file not found (pass the .safetensors file `promptset pack` wrote)")
    _check_canonical_header(path, what)
    try:
        tensors, raw = load_tensors(path, "packed file")
    except UserError as err:  # its wording is for run artifacts ("regenerate it"); a received file is fetched again
        reason = str(err).replace(f"packed file {path} ", "").replace("; regenerate it", "")
        raise UserError(f"{what}: {reason}; get a fresh copy from whoever packed it") from None
    if "metadata_sha256" not in raw:  # load_tensors lets older artifacts without one through; a pack always has one
        raise UserError(f"{what} has no metadata hash (damaged or edited); get a fresh copy")
    if raw.get("format") != PACK_FORMAT:
        raise UserError(f"{what} is not a packed distilled set (format {raw.get('format')!r}); pass a file written "
                        "by `promptset pack`")
    if raw.get("format_version") != PACK_VERSION:
        raise UserError(f"{what} has pack format version {raw.get('format_version')}; this promptset reads "
                        f"version {PACK_VERSION}")
    missing = [k for k in REQUIRED if k not in raw] + [k for k in ("seeds",) if k not in tensors]
    if missing:
        raise UserError(f"{what} lacks {missing}; pack the run again")
    meta = dict(raw)
    for key in (*REQUIRED, "stored", "source", "image_digests", "made_with"):
        if key in raw:
            try:
                meta[key] = json.loads(raw[key])
            except json.JSONDecodeError:
                raise UserError(f"{what}: its {key!r} entry is not JSON; pack the run again") from None
    return PackedSet(path, tensors, meta, raw)


def _check_canonical_header(path: Path, what: str) -> None:
    """The header is exactly compact JSON plus space padding to 8 bytes, as safetensors writes it."""
    refused = f"{what} is damaged or was edited (its header is not the one promptset wrote); get a fresh copy"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{what} is truncated ({len(head)} bytes); get a fresh copy")
        (n,) = struct.unpack("<Q", head)
        if n > path.stat().st_size - 8 or n > 100_000_000:
            raise UserError(f"{what} is truncated or not a safetensors file; get a fresh copy")
        header = f.read(n)
    body = header.rstrip(b" ")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(refused) from None
    if n % 8 or n - len(body) >= 8 or json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode() != body:
        raise UserError(refused)
