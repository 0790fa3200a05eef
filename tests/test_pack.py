"""`promptset pack` and `promptset materialize` (issue 17): the distilled set as one checksummed file, turned back into
an ImageFolder and its labels in a fresh folder holding only that file and the generator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import promptset
from promptset.artifacts import load_tensors
from promptset.cli import main
from promptset.errors import UserError
from promptset.labelcodec import decode_soft_labels
from promptset.models import create_student
from promptset.packfile import read_pack

CLASSES = ("car", "cat", "dog")
IPC = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd) -> SimpleNamespace:
    """invert + generate (soft labels, int8) + a P1 evaluate with two rounds, on a tiny random SD."""
    root = tmp_path_factory.mktemp("pack")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / "data" / name).mkdir(parents=True)
        for i in range(3):
            base = np.array([60 + 80 * c, 200 - 70 * c, 90])[None, None]
            pixels = np.clip(base + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i}.png")
    torch.manual_seed(0)
    save_file(create_student("convnet_tiny", 3, 16).state_dict(), str(root / "teacher.safetensors"))
    teacher = f"convnet_tiny:{root / 'teacher.safetensors'}"
    run = root / "run"
    promptset.invert(out=str(run), backend="sd", model=str(tiny_sd), data=str(root / "data"), steps=2, batch_size=3,
                     device="cpu", progress=False)
    promptset.generate(run=str(run), ipc=IPC, steps=2, soft_labels=True, teacher=teacher, label_codec="int8",
                       device="cpu", progress=False)
    results = promptset.evaluate(run=str(run), test=str(root / "data"), student="convnet_tiny", epochs=2, seeds=1,
                                 regen_every=1, ipc=IPC, gen_steps=2, label_codec="int8", device="cpu",
                                 progress=False, report=False)
    (key,) = results["entries"]
    return SimpleNamespace(root=root, run=run, sd=tiny_sd, teacher=teacher, key=key, entry=results["entries"][key])


def _fresh(tmp_path: Path, packed: Path, sd: Path) -> tuple[Path, Path]:
    """A new folder holding only the packed file and a copy of the generator."""
    home = tmp_path / "receiver"
    home.mkdir()
    shutil.copy(packed, home / packed.name)
    shutil.copytree(sd, home / "generator")
    return home / packed.name, home / "generator"


def test_pack_then_materialize_gives_the_runs_images_byte_for_byte_and_its_decoded_labels(world, tmp_path, capsys):
    packed = tmp_path / "set.safetensors"
    assert main(["pack", str(world.run), "--out", str(packed)]) == 0
    file, model = _fresh(tmp_path, packed, world.sd)
    out = file.parent / "data"
    assert main(["materialize", str(file), "--model", str(model), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "bit for bit equal to the images the set was made with" in capsys.readouterr().out
    gen = world.run / "generated"
    ours = sorted(p.relative_to(out / "round00" / "images") for p in (out / "round00" / "images").rglob("*.png"))
    theirs = sorted(p.relative_to(gen) for p in gen.rglob("*.png"))
    assert ours == theirs and len(ours) == len(CLASSES) * IPC
    assert all((out / "round00" / "images" / p).read_bytes() == (gen / p).read_bytes() for p in ours)
    labels = load_file(str(out / "round00" / "labels.safetensors"))
    tensors, meta = load_tensors(world.run / "labels.safetensors")
    run_labels = decode_soft_labels(tensors, meta)[:, 0]  # (C*ipc, C): one patch per image, ImageFolder order
    assert torch.equal(labels["soft_labels"], run_labels)
    assert torch.equal(labels["targets"], torch.arange(3).repeat_interleave(IPC))
    report = json.loads((out / "materialize.json").read_text())
    assert report["fingerprint_matches"] and report["rounds"][0]["equal"]
    info = read_pack(file).meta
    assert info["teacher"]["name"] == "convnet_tiny:teacher.safetensors" and len(info["teacher"]["sha256"]) == 64
    assert info["labels"]["codec"] == "int8" and info["generation"]["ipc"] == IPC
    assert info["generator"]["model_hash"] == json.loads(meta["generation"])["model"]
    assert info["evaluation"] is None  # evaluate trained on two rounds, not on this one


def test_an_evaluate_entry_packs_every_round_with_its_accuracy(world, tmp_path):
    packed = tmp_path / "rounds.safetensors"
    promptset.pack(run=str(world.run), out=str(packed), entry=world.key)
    info = read_pack(packed).meta
    assert info["evaluation"]["final_top1"] == world.entry["final_top1"] and info["evaluation"]["key"] == world.key
    assert info["generation"]["rounds"] == 2 and info["evaluation"]["recipe"]["epochs"] == 2
    file, model = _fresh(tmp_path, packed, world.sd)
    report = promptset.materialize(file=str(file), model=str(model), out=str(file.parent / "data"), device="cpu",
                                   progress=False)
    assert [r["equal"] for r in report["rounds"]] == [True, True]  # the very images evaluate trained on
    tensors, meta = load_tensors(world.run / world.entry["distilled"]["labels_file"])
    decoded = decode_soft_labels(tensors, meta)  # (2, C*ipc, C): what the students trained on
    for r in range(2):
        got = load_file(str(file.parent / "data" / f"round{r:02d}" / "labels.safetensors"))["soft_labels"]
        assert torch.equal(got, decoded[r])


def test_any_one_byte_change_or_truncation_is_refused(world, tmp_path, capsys):
    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(world.run), out=str(packed))
    data = packed.read_bytes()
    bad = tmp_path / "bad.safetensors"
    accepted = []
    for i in range(len(data)):
        changed = bytearray(data)
        changed[i] ^= 0x01
        bad.write_bytes(bytes(changed))
        try:
            read_pack(bad)
            accepted.append(i)
        except UserError:
            pass
    assert not accepted, f"byte changes at {accepted[:10]} were accepted"
    for cut in (0, 7, 100, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError):
            read_pack(bad)
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0x40
    bad.write_bytes(bytes(changed))
    out = tmp_path / "out"
    code = main(["materialize", str(bad), "--model", str(world.sd), "--out", str(out), "--device", "cpu"])
    assert code == 2 and str(bad) in capsys.readouterr().err and not out.exists()


def test_materialize_refuses_a_full_folder_and_another_model_unless_forced(world, tmp_path, capsys):
    from promptset.backends.tiny import build_sd

    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(world.run), out=str(packed))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code = main(["materialize", str(packed), "--model", str(world.sd), "--out", str(full), "--device", "cpu"])
    assert code == 2 and "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    other = build_sd(tmp_path / "other-sd", seed=1)
    out = tmp_path / "out"
    code = main(["materialize", str(packed), "--model", str(other), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    model_id = read_pack(packed).meta["generator"]["model_id"]
    assert code == 2 and "was made with sd model" in err and model_id in err and "--force" in err
    assert not out.exists()
    report = promptset.materialize(file=str(packed), model=str(other), out=str(out), force=True, device="cpu",
                                   progress=False)
    assert report["forced"] and not report["fingerprint_matches"] and not report["rounds"][0]["equal"]
    assert report["differences"][0].startswith("model: --force")


def test_pack_refuses_what_it_cannot_pack(world, tmp_path, capsys):
    assert main(["pack", str(world.run), "--out", str(tmp_path / "x.bin")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["pack", str(world.run), "--out", str(tmp_path / "x.safetensors"), "--entry", "nope"]) == 2
    assert world.key in capsys.readouterr().err  # the error lists the entries it could pack
    assert main(["pack", "--run", str(world.run), str(tmp_path / "y")]) == 2  # RUN given twice, differently
    assert not list(tmp_path.iterdir())


def test_materialize_replays_the_thread_count_beside_a_busy_process(world, tmp_path):
    """The set was made at one thread (the tests' count); materialize in a fresh process with the machine's default
    count, while another process keeps a core busy, replays the recorded count and gets the set's images."""
    import os
    import subprocess
    import sys

    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(world.run), out=str(packed))
    assert read_pack(packed).meta["generation"]["cpu_threads"] == 1
    file, model = _fresh(tmp_path, packed, world.sd)
    out = file.parent / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("PROMPTSET_THREADS", "OMP_NUM_THREADS")}
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = subprocess.run([sys.executable, "-m", "promptset", "materialize", str(file), "--model", str(model),
                               "--out", str(out), "--device", "cpu", "--no-progress"], env=env, capture_output=True,
                              text=True, check=True)
    finally:
        spin.kill()
        spin.wait()
    assert "bit for bit equal" in done.stdout
    report = json.loads((out / "materialize.json").read_text())
    assert report["rounds"][0]["equal"] and report["rounds"][0]["images_differing"] == 0
    assert report["regenerated_with"]["cpu_threads"] == 1 and report["differences"] == []


def test_materialize_says_how_far_and_why_images_differ(world, tmp_path, capsys):
    """Another dtype: the report names it, counts the differing images, and measures the difference against the set's
    own images (--reference)."""
    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(world.run), out=str(packed))
    out = tmp_path / "bf16"
    assert main(["materialize", str(packed), "--model", str(world.sd), "--out", str(out), "--device", "cpu",
                 "--dtype", "bf16", "--reference", str(world.run / "generated"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "materialize.json").read_text())
    r = report["rounds"][0]
    assert not r["equal"] and report["differences"] == ["dtype: made in fp32, regenerated in bf16 (--dtype)"]
    assert 0 < r["images_differing"] <= len(CLASSES) * IPC and r["reference_images_differing"] == r["images_differing"]
    assert r["max_level_difference"] >= 1 and 0 < r["pixels_differing"] <= 1
    assert f"{r['images_differing']} of {len(CLASSES) * IPC} images differ" in said and "dtype: made in fp32" in said
    assert f"by at most {r['max_level_difference']} uint8 level" in said
    code = main(["materialize", str(packed), "--model", str(world.sd), "--out", str(tmp_path / "x"), "--device", "cpu",
                 "--reference", str(tmp_path / "nowhere")])
    assert code == 2 and "--reference" in capsys.readouterr().err and not (tmp_path / "x").exists()
