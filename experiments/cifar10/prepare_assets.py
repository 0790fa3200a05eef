#!/usr/bin/env python3
"""Prepare the CIFAR-10 world's assets in a folder laid out like ../shared, for the study scripts' `--shared DIR`.

    python experiments/cifar10/prepare_assets.py --out DIR                      # from ../shared, else the network
    python experiments/cifar10/prepare_assets.py --out DIR --from-local ../shared
    python experiments/cifar10/prepare_assets.py --out DIR --mirror file:///work/shared   # or https://...
    python experiments/cifar10/prepare_assets.py --out DIR --upstream           # each asset's public source

It writes `DIR/data/cifar10-jpeg.tar.gz`, `DIR/weights/*.safetensors`, their licences and a `SHA256SUMS` per folder.
What each asset is, its licence, its public source and how it is converted: `assets.json` beside this script
(`--list` prints it). Three sources:

- `--from-local DIR` / `--mirror URL` copy the prepared files themselves (`data/...`, `weights/...` under DIR or URL).
- `--upstream` downloads each asset's public source (a GitHub file or archive at a named commit) and converts it:
  PyTorch checkpoints are read with `torch.load(..., weights_only=True)` only (the loader that refuses arbitrary
  objects) and written as safetensors; the CIFAR-10 JPEG repository archive is checked against its git tree hash and
  repacked into a tarball with sorted members (same JPEG bytes as ../shared's copy, a different member order).

Every file is verified against the manifest's SHA-256 before it is renamed into place: files are staged in
`DIR/.partial` and moved in only once all of them verified, so a failed run (exit code 2, the message names the file,
the expected and the actual sum) leaves DIR as it was. Files already present and correct are skipped.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from promptset.errors import UserError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MANIFEST = HERE / "assets.json"
PARTIAL = ".partial"
CHUNK = 1 << 20
SUMS = "SHA256SUMS"
KINDS = ("copy", "torch-to-safetensors", "repack-tar")
NO_NETWORK = (
    "Without a network, pass --from-local DIR (a folder holding data/ and weights/, such as ../shared) or "
    "--mirror URL (file:// or https://, the prepared files in the same layout)"
)


def log(msg: str) -> None:
    print(f"[assets] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# manifest
def load_manifest(path: Path) -> list[dict]:
    """The assets of `path` (assets.json's layout), checked: relative file names, 64-hex sums, known conversions."""
    try:
        assets = json.loads(Path(path).read_text(encoding="utf-8"))["assets"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--manifest {path}: not a readable assets manifest ({err})") from None
    for a in assets:
        name = a.get("file", "")
        if not name or name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise UserError(f"--manifest {path}: bad file name {name!r} (a relative path such as weights/x)")
        if not re.fullmatch(r"[0-9a-f]{64}", a.get("sha256", "")) or not isinstance(a.get("size"), int):
            raise UserError(f"--manifest {path}: {name} needs sha256 (64 hex digits) and size (bytes)")
        if a.get("convert", {}).get("kind") not in KINDS or "url" not in a.get("source", {}):
            raise UserError(f"--manifest {path}: {name} needs source.url and convert.kind (one of {', '.join(KINDS)})")
    return assets


def select(assets: list[dict], only: list[str]) -> list[dict]:
    """The assets named by `--only` (file, base name or folder), with the licence files they name."""
    if not only:
        return assets
    by_file = {a["file"]: a for a in assets}
    chosen = {}
    for word in only:
        word = word.rstrip("/")
        hits = [a for a in assets if word in (a["file"], a["file"].rsplit("/", 1)[-1], a["file"].split("/")[0])]
        if not hits:
            raise UserError(f"--only {word}: no such asset; known: {', '.join(by_file)}")
        for a in hits:
            chosen[a["file"]] = a
            if a.get("licence_file") in by_file:
                chosen[a["licence_file"]] = by_file[a["licence_file"]]
    return [a for a in assets if a["file"] in chosen]


# ----------------------------------------------------------------------------------------------------------------
# verification
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def gunzipped_sha256(path: Path) -> str | None:
    """SHA-256 of the stream inside a gzip file; None when it is not one."""
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
    except (OSError, EOFError, zlib.error):
        return None
    return h.hexdigest()


def verify(asset: dict, path: Path) -> tuple[bool, str]:
    """(ok, the file's SHA-256). A tarball rebuilt from the upstream archive has other bytes than the prepared one
    (member order): it is accepted when the tar stream inside it has the manifest's `convert.tar_sha256`."""
    got = sha256_file(path)
    if got == asset["sha256"]:
        return True, got
    tar_sha = asset["convert"].get("tar_sha256")
    return bool(tar_sha) and gunzipped_sha256(path) == tar_sha, got


def expected(asset: dict) -> str:
    tar_sha = asset["convert"].get("tar_sha256")
    return asset["sha256"] + (f" (or a rebuilt tarball whose tar stream has SHA-256 {tar_sha})" if tar_sha else "")


# ----------------------------------------------------------------------------------------------------------------
# fetching
def fetch(url: str, dest: Path, hint: str, what: str) -> None:
    """Download `url` (https://, http:// or file://) to `dest` with the standard library."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "promptset-prepare-assets/1"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f, CHUNK)
    except urllib.error.HTTPError as err:
        raise UserError(f"{what}: cannot fetch {url}: HTTP {err.code} {err.reason}. {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise UserError(f"{what}: cannot fetch {url}: {getattr(err, 'reason', err)}. {hint}") from None


def mirror_url(base: str, file: str) -> str:
    return base.rstrip("/") + "/" + urllib.parse.quote(file)


# ----------------------------------------------------------------------------------------------------------------
# conversions (upstream file -> prepared file)
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # fmt: skip
# The safetensors library stores tensors by dtype (its enum order, descending), then by name; kept, so that a file
# written here equals one written by the library with the same tensors and sorted metadata.
_ST_ORDER = ["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"]


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write `tensors` (name -> torch tensor) as safetensors, byte-deterministic: metadata keys sorted (the library
    keeps them in a hash map, whose order changes from run to run), header padded with spaces to 8 bytes."""
    import torch

    items = []
    for name, t in tensors.items():
        dtype = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise UserError(f"{path.name}: tensor {name} has dtype {t.dtype}, which this writer does not store")
        items.append((name, dtype, t))
    items.sort(key=lambda it: (-_ST_ORDER.index(it[1]), it[0]))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    blobs, offset = [], 0
    for name, dtype, t in items:
        blob = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for blob in blobs:
            f.write(blob)


def convert_torch(asset: dict, src: Path, dest: Path) -> None:
    """A PyTorch checkpoint -> safetensors. Read with weights_only=True: tensors, dicts, lists and numbers only."""
    spec = asset["convert"]
    try:
        import torch
    except ImportError:
        raise UserError(f"{asset['file']}: converting {src.name} needs PyTorch; or pass --mirror URL") from None
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler refuses any other object; a broken file fails too
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        why = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise UserError(
            f"{asset['file']}: {asset['source']['url']} is not a weights-only PyTorch checkpoint "
            f"(torch.load(weights_only=True) refused it: {why.strip()}); pass --mirror URL"
        ) from None
    key = spec.get("state_dict_key")
    state = obj.get(key) if key and isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        where = f" under {key!r}" if key else ""
        raise UserError(f"{asset['file']}: {src.name} holds no state dict of tensors{where}; pass --mirror URL")
    prefix, dtype = spec.get("strip_prefix", ""), getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    tensors = {k.removeprefix(prefix): (v.to(dtype) if dtype is not None else v) for k, v in state.items()}
    write_safetensors(dest, tensors, spec.get("metadata", {}))


def git_tree_sha1(files: dict[str, tuple[str, bytes]]) -> str:
    """Git's tree id of `files` (path -> (mode such as '100644', content)): the id a commit's tree has."""
    root: dict = {}
    for path, entry in files.items():
        node = root
        *dirs, base = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[base] = entry

    def tree(node: dict) -> bytes:
        rows = []
        for name, child in node.items():
            if isinstance(child, dict):
                rows.append((name + "/", b"40000 " + name.encode() + b"\0" + tree(child)))
            else:
                mode, data = child
                blob = hashlib.sha1(b"blob %d\0" % len(data) + data).digest()
                rows.append((name, mode.encode() + b" " + name.encode() + b"\0" + blob))
        body = b"".join(row for _, row in sorted(rows, key=lambda r: r[0].encode()))
        return hashlib.sha1(b"tree %d\0" % len(body) + body).digest()

    return tree(root).hex()


def repack_tar(asset: dict, src: Path, dest: Path) -> None:
    """A repository archive (GitHub's tar.gz at a commit) -> a tarball of the members matching `include`, sorted by
    path, with fixed owner, modes and mtime; the archive's whole tree must have the manifest's git tree id."""
    spec = asset["convert"]
    include, strip = re.compile(spec["include"]), int(spec.get("strip_components", 0))
    tree_files: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(src, "r:*") as tar:
            for m in tar:  # members are read into memory, never extracted
                name = "/".join(p for p in m.name.split("/")[strip:] if p not in ("", "."))
                if not name or m.isdir():
                    continue
                if m.name.startswith("/") or ".." in name.split("/"):
                    raise UserError(f"{asset['file']}: {src.name} holds an unsafe member name {m.name!r}")
                if m.isfile():
                    tree_files[name] = ("100755" if m.mode & 0o111 else "100644", tar.extractfile(m).read())
                elif m.issym():
                    tree_files[name] = ("120000", m.linkname.encode())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise UserError(f"{asset['file']}: {asset['source']['url']} is not a readable tar archive ({err})") from None
    want_tree = spec.get("git_tree")
    if want_tree and (got_tree := git_tree_sha1(tree_files)) != want_tree:
        raise UserError(
            f"{asset['file']}: {asset['source']['url']} holds git tree {got_tree}, expected {want_tree} "
            f"({asset['source'].get('repo')} @ {asset['source'].get('commit')}); nothing was written"
        )
    keep = {n: data for n, (mode, data) in tree_files.items() if mode != "120000" and include.search(n)}
    if not keep:
        raise UserError(f"{asset['file']}: no member of {src.name} matches {spec['include']!r}")
    dirs = {"/".join(n.split("/")[:i]) for n in keep for i in range(1, n.count("/") + 1)}
    entries = sorted([(d, None) for d in dirs] + list(keep.items()), key=lambda e: e[0].split("/"))
    mtime, owner = int(spec["mtime"]), spec.get("owner", "root")
    dir_mode, file_mode = int(spec.get("dir_mode", "755"), 8), int(spec.get("file_mode", "644"), 8)
    with open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                for name, data in entries:
                    info = tarfile.TarInfo(name)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, owner, owner
                    if data is None:
                        info.type, info.mode = tarfile.DIRTYPE, dir_mode
                        tar.addfile(info)
                    else:
                        info.size, info.mode = len(data), file_mode
                        tar.addfile(info, io.BytesIO(data))


CONVERTERS = {"torch-to-safetensors": convert_torch, "repack-tar": repack_tar}


# ----------------------------------------------------------------------------------------------------------------
# preparing a folder
def stage(asset: dict, source: tuple[str, str | None], staging: Path) -> tuple[Path, str]:
    """Fetch (and convert) one asset into `staging`; returns the staged file and a word on where it came from."""
    kind, where = source
    dest = staging / asset["file"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == "local":
        src = Path(where) / asset["file"]
        if not src.is_file():
            raise UserError(f"{asset['file']}: not found in --from-local {where}; pass --mirror URL or --upstream")
        shutil.copyfile(src, dest)
        return dest, f"copied from {src}"
    if kind == "mirror":
        url = mirror_url(where, asset["file"])
        fetch(url, dest, f"--mirror {where} must hold {asset['file']} (the layout of ../shared)", asset["file"])
        return dest, f"fetched from {url}"
    url, convert = asset["source"]["url"], asset["convert"]["kind"]
    if convert == "copy":
        fetch(url, dest, NO_NETWORK, asset["file"])
        return dest, f"fetched from {url}"
    download = staging / ".download" / Path(urllib.parse.urlparse(url).path).name
    fetch(url, download, NO_NETWORK, asset["file"])
    CONVERTERS[convert](asset, download, dest)
    download.unlink()
    return dest, f"converted ({convert}) from {url}"


def write_sums(out: Path, assets: list[dict], sums: dict[str, str]) -> None:
    """`SHA256SUMS` in each folder (as in ../shared), over the manifest's files present there."""
    for folder in sorted({a["file"].rsplit("/", 1)[0] for a in assets if "/" in a["file"]}):
        lines = []
        for a in sorted(assets, key=lambda a: a["file"]):
            path = out / a["file"]
            if a["file"].rsplit("/", 1)[0] == folder and path.is_file() and not path.name.startswith("LICENSE"):
                lines.append(f"{sums.get(a['file']) or sha256_file(path)}  {path.name}\n")
        if lines:
            tmp = out / PARTIAL / f"{folder}.{SUMS}"
            tmp.write_text("".join(lines))
            os.replace(tmp, out / folder / SUMS)


def prepare(out: Path, source: tuple[str, str | None], assets: list[dict], all_assets: list[dict]) -> int:
    """Stage every missing or wrong asset in `out/.partial`, verify each, then move them all into place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    created = not out.exists()
    staging = out / PARTIAL
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run: ours
    staged: list[tuple[dict, Path, str]] = []
    sums: dict[str, str] = {}
    try:
        staging.mkdir(parents=True)
        for asset in assets:
            target = out / asset["file"]
            if target.is_file():
                ok, got = verify(asset, target)
                if ok:
                    sums[asset["file"]] = got
                    log(f"{asset['file']}: present and verified, skipped")
                    continue
                log(f"{asset['file']}: present but its SHA-256 is {got}, not {asset['sha256']}: replacing it")
            path, how = stage(asset, source, staging)
            ok, got = verify(asset, path)
            if not ok:
                raise UserError(
                    f"{asset['file']}: SHA-256 mismatch ({how}): expected {expected(asset)}, got {got}; "
                    f"nothing was written to {out}"
                )
            sums[asset["file"]] = got
            staged.append((asset, path, how))
            log(f"{asset['file']}: {how}; SHA-256 {got} verified")
        for asset, path, _ in staged:  # all verified: move them in
            (out / asset["file"]).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, out / asset["file"])
        write_sums(out, all_assets, sums)
    except BaseException as err:  # a refused file, a full disk, Ctrl-C: DIR as it was
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(f"--out {out}: {err}") from None
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log(f"{len(assets)} file(s) ready in {out} ({len(staged)} fetched); the study scripts take it as --shared {out}")
    return 0


def default_source() -> tuple[str, str | None]:
    """A local copy at $PROMPTSET_SHARED or ../shared when one exists, else each asset's public source."""
    env = os.environ.get("PROMPTSET_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if (cand / "data").is_dir() or (cand / "weights").is_dir():
            return "local", str(cand)
    return "upstream", None


def print_manifest(assets: list[dict]) -> None:
    for a in assets:
        s = a["source"]
        print(f"{a['file']}\n  sha256 {a['sha256']}  size {a['size']}\n  licence {a.get('licence', '?')}\n"
              f"  source {s.get('repo', '?')} @ {s.get('commit', '?')}: {s.get('path', '?')}\n  url {s['url']}\n"
              f"  how {a['convert'].get('how', a['convert']['kind'])}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without --from-local, --mirror or --upstream: the local copy at $PROMPTSET_SHARED or ../shared when "
        "there is one, else --upstream. Assets, licences and sources: experiments/cifar10/README.md (Assets).",
    )
    ap.add_argument("--out", metavar="DIR", help="folder to prepare (gets data/ and weights/, as ../shared)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--from-local", metavar="DIR", help="copy the prepared files from a folder laid out as ../shared")
    src.add_argument("--mirror", metavar="URL", help="fetch the prepared files from URL/data/..., URL/weights/... "
                     "(file:// or https://)")  # fmt: skip
    src.add_argument("--upstream", action="store_true", help="download each asset's public source and convert it")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="prepare only this asset (file, base name, or folder data/weights; repeatable)")  # fmt: skip
    ap.add_argument("--manifest", default=str(MANIFEST), help="the assets manifest (default: assets.json here)")
    ap.add_argument("--list", action="store_true", help="print the manifest (file, sum, licence, source) and exit")
    args = ap.parse_args(argv)
    try:
        all_assets = load_manifest(Path(args.manifest))
        if args.list:
            print_manifest(all_assets)
            return 0
        if not args.out:
            raise UserError("--out DIR is required (the folder to prepare)")
        if args.from_local:
            if not Path(args.from_local).is_dir():
                raise UserError(f"--from-local {args.from_local}: no such folder")
            source: tuple[str, str | None] = ("local", args.from_local)
        elif args.mirror:
            source = ("mirror", args.mirror)
        elif args.upstream:
            source = ("upstream", None)
        else:
            source = default_source()
        log(f"source: {source[0]}" + (f" {source[1]}" if source[1] else " (each asset's public source)"))
        return prepare(Path(args.out), source, select(all_assets, args.only), all_assets)
    except UserError as err:
        print(f"prepare_assets: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
