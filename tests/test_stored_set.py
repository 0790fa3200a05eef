"""The stored distilled set (issue 17): images at the resolution of the data the prompts were learned from, teachers
fed at the input size they expect, seed selection.

A tiny random Stable Diffusion (16 px) inverts raw 8 px images without `select`; generate must store 8 px patches,
and a 32 px CIFAR ResNet teacher labels them at 32 px.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import promptset
import promptset.evaluation.student
from promptset.artifacts import load_tensors
from promptset.cli import main
from promptset.data import load_image, to_tensor
from promptset.errors import UserError
from promptset.labelcodec import decode_soft_labels
from promptset.models import create_student, load_teacher

CLASSES = ("car", "cat", "dog")  # conftest's RAW_CLASSES and RAW_SIZE: the raw_run fixture's data
DATA_SIZE = 8  # the raw images; the tiny model generates 16 px

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_weights(arch: str, path: Path, size: int) -> Path:
    torch.manual_seed(0)
    save_file(create_student(arch, len(CLASSES), size).state_dict(), str(path))
    return path


def test_stored_images_keep_the_resolution_of_the_data_and_the_teacher_sees_its_own_size(raw_run):
    """The defect: 16 px patches were stored (and labelled as they were) for prompts learned from 8 px images."""
    run = raw_run.run
    promptset.generate(run=str(run), ipc=2, steps=2, soft_labels=True, teacher=raw_run.teacher, device="cpu",
                       progress=False)
    pngs = sorted((run / "generated").rglob("*.png"))
    assert len(pngs) == 2 * len(CLASSES)
    assert {Image.open(p).size for p in pngs} == {(DATA_SIZE, DATA_SIZE)}
    tensors, meta = load_tensors(run / "labels.safetensors")
    assert meta["image_size"] == str(DATA_SIZE)
    # the 32 px teacher labelled every 8 px patch after resizing it to 32 px
    net = load_teacher(raw_run.teacher, num_classes=len(CLASSES)).net
    x = torch.stack([to_tensor(load_image(p)) for p in pngs])  # (6, 3, 8, 8), ImageFolder order
    expected = net(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1))
    stored = decode_soft_labels(tensors, meta)[:, 0]  # (N, C): one patch per image
    assert torch.allclose(stored, expected.to(torch.float16).float(), atol=1e-3)


def test_builtin_teachers_know_their_input_size_and_resize_to_it(tmp_path):
    cifar = load_teacher(f"resnet20:{_random_weights('resnet20', tmp_path / 'r20.safetensors', 32)}")
    assert cifar.image_size == 32
    x = torch.rand(2, 3, 64, 64)
    small = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.equal(cifar(x), cifar.net(small))  # a 64 px image reaches the 32 px network at 32 px
    conv = load_teacher(f"convnet_tiny:{_random_weights('convnet_tiny', tmp_path / 'c.safetensors', 12)}")
    assert conv.image_size == 12  # read off the classifier's width


def test_a_teacher_of_unknown_input_size_is_refused_until_named(raw_run, tmp_path, capsys):
    weights = _random_weights("resnet18", tmp_path / "r18.safetensors", 32)  # a 3x3 stem: 64 px or less
    assert load_teacher(f"resnet18:{weights}").image_size is None
    out = tmp_path / "gen"
    code = main(["generate", "--run", str(raw_run.run), "--out", str(out), "--ipc", "1", "--steps", "1",
                 "--soft-labels", "--teacher", f"resnet18:{weights}", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "does not say which image size it was trained at" in err and f"resnet18@SIZE:{weights}" in err
    assert not out.exists()
    assert load_teacher(f"resnet18@16:{weights}").image_size == 16
    with pytest.raises(UserError, match="SIZE in NAME@SIZE:PATH must be a positive number"):
        load_teacher(f"resnet18@x:{weights}")


def test_topk_labels_are_counted_part_by_part_and_p1_trains_on_exactly_the_decoded_logits(raw_run, tmp_path,
                                                                                           monkeypatch, capsys):
    """generate --label-codec topk:2 writes values, indices and a fill value, budget counts each (raw and
    compressed), and evaluate --protocol p1 with that codec hands the student exactly what its labels file decodes."""
    run = tmp_path / "run"
    shutil.copytree(raw_run.run, run)
    code = main(["generate", "--run", str(run), "--ipc", "2", "--steps", "2", "--soft-labels", "--teacher",
                 raw_run.teacher, "--label-codec", "topk:2", "--device", "cpu", "--no-progress"])
    assert code == 0
    tensors, meta = load_tensors(run / "labels.safetensors")
    n = 2 * len(CLASSES)  # patches (factor 1)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items() if k.startswith("soft_labels")} == {
        "soft_labels.values": (torch.float16, (n, 1, 2)), "soft_labels.indices": (torch.int16, (n, 1, 2)),
        "soft_labels.fill": (torch.float16, (n, 1))}
    capsys.readouterr()
    assert main(["budget", "--run", str(run), "--ipcs", "1"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "budget.json").read_text())
    assert {k: v for k, v in result["components"].items() if k.startswith("soft_labels")} == {
        "soft_labels.fill": n * 2, "soft_labels.indices": n * 2 * 2, "soft_labels.values": n * 2 * 2}
    assert result["components_compressed"].keys() == result["components"].keys()
    assert result["compressor"] == "zlib level 9" and result["label_codec"] == "topk:2"
    assert all(k in printed for k in ("soft_labels.values", "soft_labels.indices", "soft_labels.fill", "zlib"))
    assert {"raw_zlib_bytes", "png_zlib_bytes", "jpeg_q75_zlib_bytes"} <= result["real"][0].keys()

    seen = []
    real_train = promptset.evaluation.student.train_student

    def spy(model, rounds, *args, **kwargs):
        seen.append([r.logits.clone() for r in rounds])
        return real_train(model, rounds, *args, **kwargs)

    monkeypatch.setattr("promptset.stages.evaluate.train_student", spy)
    results = promptset.evaluate(run=str(run), test=str(raw_run.data), student="convnet_tiny", epochs=2, seeds=1,
                                 regen_every=1, ipc=2, gen_steps=2, label_codec="topk:2", device="cpu",
                                 progress=False, report=False)
    (entry,) = results["entries"].values()
    from promptset.backends.selection import AUTO_CANDIDATES  # generate's default: seed selection with a teacher

    assert entry["key"].endswith(f"/topk2/best-of-{AUTO_CANDIDATES}/mixed")
    assert entry["distilled"]["label_codec"] == "topk:2"
    labels, labels_meta = load_tensors(run / entry["distilled"]["labels_file"])
    decoded = decode_soft_labels(labels, labels_meta)  # (rounds, C*ipc, C): what a receiver decodes
    assert decoded.shape == (2, n, len(CLASSES))
    assert len(seen) == 1 and all(torch.equal(got, want) for got, want in zip(seen[0], decoded))
    assert {k: v for k, v in entry["stored_components"].items() if k.startswith("soft_labels")} == {
        "soft_labels.values": 2 * n * 2 * 2, "soft_labels.indices": 2 * n * 2 * 2, "soft_labels.fill": 2 * n * 2}
    assert entry["stored_compressed"].keys() == entry["stored_components"].keys()


@pytest.mark.parametrize("codec, message", [("topk:4", "more than the 3 classes"), ("fp8", "is not a label codec")])
def test_a_bad_codec_is_refused_with_exit_2_and_nothing_written(raw_run, tmp_path, capsys, codec, message):
    out = tmp_path / "gen"
    code = main(["generate", "--run", str(raw_run.run), "--out", str(out), "--ipc", "1", "--soft-labels",
                 "--teacher", raw_run.teacher, "--label-codec", codec, "--device", "cpu", "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err and not out.exists()
    before = sorted(p.name for p in raw_run.run.iterdir())
    code = main(["evaluate", "--run", str(raw_run.run), "--test", str(raw_run.data), "--label-codec", codec,
                 "--device", "cpu", "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in raw_run.run.iterdir()) == before


def test_seed_selection_keeps_the_lowest_cross_entropy_candidate_and_its_seed_regenerates_it(raw_run, tmp_path,
                                                                                               capsys):
    from promptset.atomic import read_jsonl
    from promptset.backends import create_backend
    from promptset.backends.sampling import Job, PromptConditioner, generate_batch, jobs_for
    from promptset.backends.selection import candidate_seed

    out = tmp_path / "best-of-4"
    kw = dict(run=str(raw_run.run), out=str(out), ipc=2, steps=2, teacher=raw_run.teacher, device="cpu",
              progress=False)
    promptset.generate(candidates=4, **kw)
    rows = read_jsonl(out / "generated" / "manifest.jsonl")
    seeds = load_tensors(out / "labels.safetensors")[0]["seeds"].tolist()
    backend = create_backend("sd", str(raw_run.sd), device="cpu")
    conditioner = PromptConditioner(backend, promptset.PromptSet.load(raw_run.run / "prompts.safetensors"))
    uncond = backend.encode_prompts([""])
    gen = dict(steps=2, guidance=7.5, factor=1, image_size=DATA_SIZE, uncond=uncond, micro_batch=8)
    teacher = load_teacher(raw_run.teacher, num_classes=len(CLASSES))
    picked = []
    for job, row, seed in zip(jobs_for([0, 1, 2], 2, 0), rows, seeds):
        assert (row["class_index"], row["image"]) == (job.cls, job.index) and row["seed"] == seed
        candidates = [Job(job.cls, job.index, candidate_seed(job.seed, g)) for g in range(4)]
        images = generate_batch(backend, conditioner, candidates, **gen)[:, 0]  # (4, 3, S, S)
        images = images.clamp(0, 1).mul(255).round().div(255)
        ce = F.cross_entropy(teacher(images), torch.full((4,), job.cls), reduction="none")
        best = int(ce.argmin())
        picked.append(best)
        assert row["candidate"] == best and seed == candidate_seed(job.seed, best)
        again = generate_batch(backend, conditioner, [Job(job.cls, job.index, seed)], **gen)[0, 0]  # the seed alone
        png = to_tensor(load_image(out / "generated" / CLASSES[job.cls] / f"{job.index:05d}.png"))
        assert torch.equal(again.clamp(0, 1).mul(255).round(), png.mul(255).round())
    assert any(g != 0 for g in picked)  # with 6 images and 4 candidates, some pick is not the plain image
    capsys.readouterr()
    promptset.generate(candidates=4, **kw)  # a rerun recognises the chosen candidates: nothing is made again
    assert "6 of 6 images already made with these settings; making 0" in capsys.readouterr().out
    plain = tmp_path / "plain"
    promptset.generate(**{**kw, "out": str(plain), "candidates": 1})  # G = 1: the seeds of a run without selection
    plain_seeds = load_tensors(plain / "labels.safetensors")[0]["seeds"].tolist()
    assert plain_seeds == [j.seed for j in jobs_for([0, 1, 2], 2, 0)]


def test_seed_selection_is_on_by_default_wherever_a_teacher_scores_and_evaluate_follows_generate(raw_run, tmp_path):
    from promptset.backends.selection import AUTO_CANDIDATES
    from promptset.runfolder import stage_config

    assert AUTO_CANDIDATES > 1
    kw = dict(ipc=1, steps=2, device="cpu", progress=False)
    auto = tmp_path / "auto"
    shutil.copytree(raw_run.run, auto)
    promptset.generate(run=str(auto), teacher=raw_run.teacher, **kw)  # a teacher: G = AUTO_CANDIDATES
    assert stage_config(auto, "generate")["candidates"] == AUTO_CANDIDATES
    assert any(json.loads(line).get("candidate", 0) > 0 for line in (auto / "generated" / "manifest.jsonl").open())
    bare = tmp_path / "bare"
    shutil.copytree(raw_run.run, bare)
    promptset.generate(run=str(bare), **kw)  # no teacher: nothing can score, G = 1
    assert stage_config(bare, "generate")["candidates"] == 1
    pinned = tmp_path / "pinned"
    shutil.copytree(raw_run.run, pinned)
    promptset.generate(run=str(pinned), teacher=raw_run.teacher, candidates=1, **kw)
    ev = dict(test=str(raw_run.data), student="convnet_tiny", epochs=1, seeds=1, ipc=1, gen_steps=2, device="cpu",
              progress=False, report=False)
    # evaluate's default is the stored set's own recipe: generate's G, in fresh rounds too
    (key, entry), = promptset.evaluate(run=str(auto), method="d3m", protocol="p2", regen_every=1, **ev)[
        "entries"].items()
    assert key.endswith(f"/best-of-{AUTO_CANDIDATES}/mixed") and entry["distilled"]["candidates"] == AUTO_CANDIDATES
    (key, entry), = promptset.evaluate(run=str(pinned), method="d3m", protocol="p2", **ev)["entries"].items()
    assert "best-of" not in key and entry["distilled"]["candidates"] == 1
    (key, entry), = promptset.evaluate(run=str(bare), method="d3m", protocol="p2", **ev)["entries"].items()
    assert "best-of" not in key and entry["distilled"]["candidates"] == 1  # P2 without a teacher: nothing scores
    code = main(["generate", "--run", str(bare), "--out", str(tmp_path / "neg"), "--candidates", "-1",
                 "--device", "cpu", "--no-progress"])
    assert code == 2 and not (tmp_path / "neg").exists()


def test_evaluate_fresh_rounds_with_seed_selection_store_seeds_that_regenerate_them(raw_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(raw_run.run, run)
    results = promptset.evaluate(run=str(run), test=str(raw_run.data), student="convnet_tiny", epochs=2, seeds=1,
                                 regen_every=1, ipc=2, gen_steps=2, protocol="p2", candidates=3,
                                 teacher=raw_run.teacher, device="cpu", progress=False, report=False)
    (key, entry), = results["entries"].items()
    assert key.endswith("/best-of-3/mixed") and entry["distilled"]["candidates"] == 3
    d = entry["distilled"]
    assert 0 <= d["teacher_top1_on_images"] <= 100
    assert len(d["teacher_top1_per_round"]) == len(d["teacher_entropy_per_round"]) == 2  # 2 epochs, regen_every 1
    assert abs(sum(d["teacher_top1_per_round"]) / 2 - d["teacher_top1_on_images"]) < 0.01
    assert all(0 <= h <= math.log(3) + 1e-6 for h in d["teacher_entropy_per_round"])  # 3 classes: at most ln 3
    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(run), out=str(packed), entry=key)
    report = promptset.materialize(file=str(packed), model=str(raw_run.sd), out=str(tmp_path / "data"),
                                   device="cpu", progress=False)
    assert [r["equal"] for r in report["rounds"]] == [True, True]  # the stored seeds alone give the chosen images
