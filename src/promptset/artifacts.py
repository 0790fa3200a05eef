"""The stored distilled dataset: `prompts.safetensors` and `labels.safetensors`, self-describing and verified on load.

Every artifact carries its metadata (format, backend, model fingerprint, template, tokens, class-list hash) and a
sha256 of its tensor bytes; a truncated or edited file is refused with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from . import __version__
from .atomic import atomic_path
from .errors import UserError
from .modes import MODE_RULE, ModeRows

FORMAT_VERSION = "1"  # one prompt per class
MODES_FORMAT_VERSION = "2"  # with modes: also `mode_class` and `mode_weight` (M,) int32
PROMPT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_FILE_HASHES: dict[tuple, str] = {}  # (resolved path, size, mtime_ns, ctime_ns, inode) -> sha256, this process
_HEX = set("0123456789abcdef")


def hash_cache_dir() -> Path:
    """Where file hashes are cached across processes: `$PROMPTSET_CACHE/file-sha256`, else
    `$XDG_CACHE_HOME/promptset/file-sha256` (default `~/.cache/promptset/file-sha256`); never inside a model folder."""
    env = os.environ.get("PROMPTSET_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptset"
    return base.expanduser() / "file-sha256"


def sha256_file_cached(path: str | os.PathLike) -> str:
    """`sha256_file`, remembered by (path, size, mtime, ctime, inode): in this process, and on disk for later ones.

    A model file is hashed once per machine (per cache folder), not at every load of every stage on every rank. The
    first process to need a hash takes a lock on its cache entry (`fcntl.flock`); the others wait for it and read
    the result instead of hashing the same bytes at once. Rewriting a file changes its mtime and ctime (and a copy
    is a new inode), so a changed file is hashed again. Without a writable cache folder it just hashes.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _disk_cached_sha256(p, key)
    return _FILE_HASHES[key]


def _disk_cached_sha256(path: Path, key: tuple) -> str:
    try:
        import fcntl
    except ImportError:  # not on POSIX: hash every time
        return sha256_file(path)
    entry = hash_cache_dir() / sha256_bytes(json.dumps(key).encode("utf-8"))[:40]
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        f = open(entry, "a+", encoding="ascii")
    except OSError:
        return sha256_file(path)
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        except OSError:
            return sha256_file(path)
        f.seek(0)
        cached = f.read().strip()
        if len(cached) == 64 and set(cached) <= _HEX:
            return cached
        digest = sha256_file(path)
        try:  # a torn write (a killed process) leaves an entry that is not 64 hex digits: hashed again
            f.seek(0)
            f.truncate()
            f.write(digest)
            f.flush()
        except OSError:
            pass
        return digest


def fingerprint_files(root: str | os.PathLike, files: list[Path]) -> str:
    """Content fingerprint of `files` under the folder `root`: sha256 over each file's relative name, size and full
    bytes (sorted; hidden files skipped). Two fine-tunes of one model differ somewhere in their weights, rarely in
    the first or last MiB, so every byte counts."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(files):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}:{p.stat().st_size}:{sha256_file_cached(p)}\n".encode())
    return h.hexdigest()


def fingerprint_path(path: str | os.PathLike) -> str:
    """`fingerprint_files` of a model file, or of every (non-hidden) file of a folder."""
    path = Path(path)
    if path.is_dir():
        return fingerprint_files(path, [p for p in path.rglob("*") if p.is_file()])
    return fingerprint_files(path.parent, [path])


def combined_fingerprint(parts: dict[str, str]) -> str:
    """One fingerprint of several (name: fingerprint or setting) parts, e.g. weights plus a config folder."""
    return sha256_bytes(json.dumps(parts, sort_keys=True).encode("utf-8"))


def hub_fingerprint(model: str, revision: str | None, resolved_commit: str | None) -> str:
    """The identity of a Hub model: pinned to the commit that was actually loaded whenever it is known."""
    if resolved_commit:
        return f"hub:{model}@{resolved_commit}"
    return f"hub:{model}@{revision or 'main'}"


def snapshot_commit(folder: str | os.PathLike | None) -> str | None:
    """The commit of a Hugging Face cache snapshot folder (`.../snapshots/<40 hex>/...`), or None."""
    if not folder:
        return None
    parts = Path(folder).parts
    for name, nxt in zip(parts, parts[1:]):
        if name == "snapshots" and len(nxt) == 40 and all(c in "0123456789abcdef" for c in nxt):
            return nxt
    return None


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and raw bytes of a dict of tensors (order independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        # reshape first: a 0-dim tensor (batch norm's num_batches_tracked) cannot be viewed as bytes; same bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def images_sha256(images: torch.Tensor) -> str:
    """sha256 of uint8 images (N, 3, S, S) with their shape: the same pixels, in the same order, give the same hash."""
    x = images.detach().contiguous().cpu()
    if x.dtype != torch.uint8:
        raise ValueError(f"images_sha256 takes uint8 images, got {x.dtype}")
    return sha256_bytes(f"{tuple(x.shape)}\n".encode() + x.numpy().tobytes())


def image_digests(images: torch.Tensor) -> str:
    """One short hash per uint8 image (N, 3, S, S), 8 hex characters each, concatenated: which images of a set differ
    when the set's hash does not match (`materialize`)."""
    x = images.detach().contiguous().cpu()
    if x.dtype != torch.uint8:
        raise ValueError(f"image_digests takes uint8 images, got {x.dtype}")
    return "".join(hashlib.sha256(image.numpy().tobytes()).hexdigest()[:8] for image in x)


def made_with(device: torch.device | str) -> dict:
    """Where a set's images were made, beyond the generation settings: what `materialize` compares when the images it
    regenerates differ (the CPU model, torch version and device can each change the last bits)."""
    from .devices import device_name

    return {"device": device_name(torch.device(device)), "torch": torch.__version__}


def metadata_hash(metadata: dict[str, str]) -> str:
    """sha256 over the metadata strings (except the hashes themselves), so an edited template or model id shows."""
    body = {k: v for k, v in metadata.items() if k not in _HASH_KEYS}
    return sha256_bytes(json.dumps(body, sort_keys=True).encode("utf-8"))


_HASH_KEYS = ("content_sha256", "metadata_sha256")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic safetensors write, with sha256 hashes of the tensors and of the metadata added to the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items() if k not in _HASH_KEYS}
    meta["content_sha256"] = tensors_hash(tensors)
    meta["metadata_sha256"] = metadata_hash(meta)
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_safetensors(save(tensors, metadata=meta)))


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the header's keys sorted, so the same tensors and metadata always give the same file:
    the library writes its metadata map in hash order, which differs at every call. The tensor bytes and their
    offsets are unchanged; the header stays compact JSON padded with spaces to 8 bytes, as the library writes it."""
    n = int.from_bytes(data[:8], "little")
    body = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    header = body.encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def load_tensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors artifact and check its content hash; refuses truncated or edited files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{what} {path} is not a readable safetensors file ({err}); regenerate it") from err
    expected = meta.get("content_sha256")
    if expected is None:
        raise UserError(f"{what} {path} has no content hash in its metadata; it was not written by promptset")
    if tensors_hash(tensors) != expected:
        raise UserError(f"{what} {path} does not match its content hash (edited or corrupted); regenerate it")
    # files written before metadata hashing have none; every file promptset writes now does
    if "metadata_sha256" in meta and metadata_hash(meta) != meta["metadata_sha256"]:
        raise UserError(f"{what} {path}: its metadata does not match its hash (edited or corrupted); regenerate it")
    return tensors, meta


def class_list_hash(folders: list[str]) -> str:
    return sha256_bytes("\n".join(folders).encode("utf-8"))[:16]


@dataclass
class PromptSet:
    """The learned prompts: embeddings (M, V, D) plus everything needed to use them with their model.

    One prompt per class (M = C) unless the run learned modes (`invert --modes K`): then row r is a mode of class
    `mode_class[r]` (class-major), learned on `mode_weight[r]` images, and image i of class c is drawn from the mode
    `modes.mode_of(weights of c, i)`; `rows` (a `modes.ModeRows`, the one model of that mapping) answers both. Without
    modes the file is the format-1 file it always was.
    """

    embeddings: torch.Tensor  # (M, V, D) fp32 in memory
    token_names: list[str]  # one per row
    class_folders: list[str]
    template: str
    backend: str
    model_id: str
    model_hash: str
    initializers: list[str] = field(default_factory=list)
    stored_dtype: str = "fp32"
    mode_class: list[int] | None = None  # (M,) class of each row; None: one prompt per class
    mode_weight: list[int] | None = None  # (M,) training images of each row (the spreading weights)
    _rows: ModeRows | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_folders)

    @property
    def num_prompts(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_vectors(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def has_modes(self) -> bool:
        return self.mode_class is not None

    @property
    def rows(self) -> ModeRows:
        """Which class and mode each row is (`modes.ModeRows`, built once from `mode_class` and `mode_weight`)."""
        if self._rows is None:
            self._rows = ModeRows.from_prompts(self.num_classes, self.mode_class, self.mode_weight)
        return self._rows

    def class_rows(self, c: int) -> list[int]:
        """The rows (prompts) of class c: [c] without modes."""
        return self.rows.class_rows(c)

    def modes_per_class(self) -> list[int]:
        return self.rows.modes_per_class()

    def row_of(self, c: int, index: int) -> int:
        """The prompt image `index` of class c is drawn from (spread over the class's modes by their weights)."""
        return self.rows.row_of(c, index)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as written to disk in `stored_dtype` (int8: symmetric per-vector quantisation), plus the
        modes' classes and weights (int32) when there are modes."""
        if self.stored_dtype == "int8":
            # quantise with the scale as it is stored (fp16), so decoding q * scale finds the nearest grid point
            scale = (self.embeddings.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-6).to(torch.float16)
            q = torch.round(self.embeddings / scale.float()).clamp(-127, 127).to(torch.int8)  # (M, V, D)
            out = {"embeddings": q, "scales": scale}  # scale: (M, V, 1)
        else:
            out = {"embeddings": self.embeddings.to(PROMPT_DTYPES[self.stored_dtype])}
        return out | self._mode_tensors()

    def _mode_tensors(self) -> dict[str, torch.Tensor]:
        if self.mode_class is None:
            return {}
        return {"mode_class": torch.tensor(self.mode_class, dtype=torch.int32),  # (M,)
                "mode_weight": torch.tensor(self.mode_weight, dtype=torch.int32)}  # (M,)

    def content_hash(self) -> str:
        """sha256 of what changes a generated pixel: the vectors (as loaded) and, with modes, their classes and
        weights (the hash of a prompt set without modes is the one generation settings always recorded)."""
        return tensors_hash({"embeddings": self.embeddings} | self._mode_tensors())

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def save(self, path: str | os.PathLike) -> None:
        if self.stored_dtype not in PROMPT_DTYPES:
            raise UserError(f"--prompt-dtype {self.stored_dtype!r} is not one of {sorted(PROMPT_DTYPES)}")
        save_tensors(path, self.stored_tensors(), self.metadata())

    def metadata(self) -> dict[str, str]:
        """The metadata strings written with the tensors (the hashes are added by `save_tensors`)."""
        meta = {
            "format": "promptset.prompts",
            "format_version": FORMAT_VERSION if self.mode_class is None else MODES_FORMAT_VERSION,
            "promptset_version": __version__,
            "backend": self.backend,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "template": self.template,
            "token_names": json.dumps(self.token_names),
            "class_folders": json.dumps(self.class_folders),
            "class_list_hash": class_list_hash(self.class_folders),
            "initializers": json.dumps(self.initializers),
            "stored_dtype": self.stored_dtype,
        }
        if self.mode_class is not None:
            meta["mode_rule"] = MODE_RULE  # how images are spread over a class's modes
        return meta

    def same_as_file(self, path: str | os.PathLike) -> bool:
        """Whether `path` already holds exactly these prompts (tensors as stored, and metadata)."""
        if not Path(path).is_file():
            return False
        try:
            tensors, meta = load_tensors(path, "prompts file")
        except UserError:
            return False
        stored = self.stored_tensors()
        return (
            tensors.keys() == stored.keys()
            and all(tensors[k].dtype == v.dtype and torch.equal(tensors[k], v) for k, v in stored.items())
            and all(meta.get(k) == v for k, v in self.metadata().items())
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptSet:
        tensors, meta = load_tensors(path, "prompts file")
        return cls.from_stored(tensors, meta, path)

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str | os.PathLike) -> PromptSet:
        """The prompts from their stored tensors and metadata (a prompts file's, or a packed set's); `path` names
        where they came from in errors."""
        if meta.get("format") != "promptset.prompts":
            raise UserError(f"prompts file {path} is not a promptset prompts file (format={meta.get('format')})")
        version = meta.get("format_version")
        if version not in (FORMAT_VERSION, MODES_FORMAT_VERSION):
            raise UserError(f"prompts file {path} has format version {version}; this promptset reads versions "
                            f"{FORMAT_VERSION} and {MODES_FORMAT_VERSION} (with modes): update promptset")
        try:
            emb = tensors["embeddings"]
            if meta["stored_dtype"] == "int8":
                emb = emb.float() * tensors["scales"].float()
            folders = json.loads(meta["class_folders"])
            token_names = json.loads(meta["token_names"])
            with_modes = version == MODES_FORMAT_VERSION
            prompts = cls(
                embeddings=emb.float(),
                token_names=token_names,
                class_folders=folders,
                template=meta["template"],
                backend=meta["backend"],
                model_id=meta["model_id"],
                model_hash=meta["model_hash"],
                initializers=json.loads(meta.get("initializers", "[]")),
                stored_dtype=meta["stored_dtype"],
                mode_class=tensors["mode_class"].reshape(-1).tolist() if with_modes else None,
                mode_weight=tensors["mode_weight"].reshape(-1).tolist() if with_modes else None,
            )
            if with_modes and meta["mode_rule"] != MODE_RULE:
                raise UserError(f"prompts file {path} spreads images over modes by rule {meta['mode_rule']!r}; this "
                                f"promptset knows {MODE_RULE!r}: update promptset")
        except (KeyError, ValueError) as err:
            raise UserError(f"prompts file {path} lacks or garbles {err}; regenerate it with invert") from err
        if class_list_hash(folders) != meta.get("class_list_hash"):
            raise UserError(f"prompts file {path}: class list does not match its hash; regenerate it")
        rows = len(folders) if prompts.mode_class is None else len(prompts.mode_class)
        if emb.ndim != 3 or rows != emb.shape[0] or len(token_names) != emb.shape[0]:
            raise UserError(
                f"prompts file {path}: embeddings of shape {tuple(emb.shape)} do not fit its {len(folders)} classes"
                + ("" if prompts.mode_class is None else f" and {rows} modes")
            )
        if prompts.mode_class is not None:
            _check_modes(prompts.mode_class, prompts.mode_weight, len(folders), path)
        return prompts

    def check_backend(self, backend, path: str | os.PathLike = "prompts.safetensors") -> None:
        """Refuse to use prompts with a model other than the one they were learned on."""
        if backend.kind != self.backend or backend.model_hash != self.model_hash:
            raise UserError(
                f"prompts file {path} was learned on {self.backend} model {self.model_id} "
                f"(fingerprint {self.model_hash[:12]}), but the model given is {backend.kind} {backend.model_id} "
                f"(fingerprint {backend.model_hash[:12]}); pass the same --backend and --model as for invert"
            )
        if backend.token_dim != self.embeddings.shape[-1]:
            raise UserError(
                f"prompts file {path} has {self.embeddings.shape[-1]}-d vectors; the model's tokens are "
                f"{backend.token_dim}-d"
            )


def _check_modes(mode_class: list[int], mode_weight: list[int], num_classes: int, path) -> None:
    """Every class has at least one mode, rows are class-major, and every weight is positive."""
    ordered = mode_class == sorted(mode_class) and sorted(set(mode_class)) == list(range(num_classes))
    if not ordered or len(mode_weight) != len(mode_class) or min(mode_weight, default=1) < 1:
        raise UserError(f"prompts file {path}: its mode_class/mode_weight tensors do not give every one of its "
                        f"{num_classes} classes its modes in class order with positive weights; regenerate it with "
                        "invert")


def token_name_for(folder: str, taken: set[str]) -> str:
    """A unique placeholder token string for a class folder, e.g. `<golden-retriever>`."""
    slug = "".join(ch.lower() if ch.isalnum() else "-" for ch in folder).strip("-") or "class"
    name, k = f"<{slug}>", 1
    while name in taken:
        k += 1
        name = f"<{slug}-{k}>"
    taken.add(name)
    return name
