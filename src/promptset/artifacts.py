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
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_path
from .errors import UserError

FORMAT_VERSION = "1"
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
        save_file(tensors, str(tmp), metadata=meta)


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
    """One learned prompt per class: embeddings (C, V, D) plus everything needed to use them with their model."""

    embeddings: torch.Tensor  # (C, V, D) fp32 in memory
    token_names: list[str]
    class_folders: list[str]
    template: str
    backend: str
    model_id: str
    model_hash: str
    initializers: list[str] = field(default_factory=list)
    stored_dtype: str = "fp32"

    @property
    def num_classes(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_vectors(self) -> int:
        return int(self.embeddings.shape[1])

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as written to disk in `stored_dtype` (int8: symmetric per-vector quantisation)."""
        if self.stored_dtype == "int8":
            # quantise with the scale as it is stored (fp16), so decoding q * scale finds the nearest grid point
            scale = (self.embeddings.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-6).to(torch.float16)
            q = torch.round(self.embeddings / scale.float()).clamp(-127, 127).to(torch.int8)  # (C, V, D)
            return {"embeddings": q, "scales": scale}  # scale: (C, V, 1)
        return {"embeddings": self.embeddings.to(PROMPT_DTYPES[self.stored_dtype])}

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def save(self, path: str | os.PathLike) -> None:
        if self.stored_dtype not in PROMPT_DTYPES:
            raise UserError(f"--prompt-dtype {self.stored_dtype!r} is not one of {sorted(PROMPT_DTYPES)}")
        save_tensors(path, self.stored_tensors(), self.metadata())

    def metadata(self) -> dict[str, str]:
        """The metadata strings written with the tensors (the hashes are added by `save_tensors`)."""
        return {
            "format": "promptset.prompts",
            "format_version": FORMAT_VERSION,
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
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"prompts file {path} has format version {meta.get('format_version')}, expected 1")
        try:
            emb = tensors["embeddings"]
            if meta["stored_dtype"] == "int8":
                emb = emb.float() * tensors["scales"].float()
            folders = json.loads(meta["class_folders"])
            token_names = json.loads(meta["token_names"])
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
            )
        except (KeyError, ValueError) as err:
            raise UserError(f"prompts file {path} lacks or garbles {err}; regenerate it with invert") from err
        if class_list_hash(folders) != meta.get("class_list_hash"):
            raise UserError(f"prompts file {path}: class list does not match its hash; regenerate it")
        if emb.ndim != 3 or len(folders) != emb.shape[0] or len(token_names) != emb.shape[0]:
            raise UserError(
                f"prompts file {path}: embeddings of shape {tuple(emb.shape)} do not fit its {len(folders)} classes"
            )
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


def token_name_for(folder: str, taken: set[str]) -> str:
    """A unique placeholder token string for a class folder, e.g. `<golden-retriever>`."""
    slug = "".join(ch.lower() if ch.isalnum() else "-" for ch in folder).strip("-") or "class"
    name, k = f"<{slug}>", 1
    while name in taken:
        k += 1
        name = f"<{slug}-{k}>"
    taken.add(name)
    return name
