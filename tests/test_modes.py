"""Modes: several learned prompts per class (`invert --modes K`), on a tiny random Stable Diffusion (CPU, seconds).

Must show: `invert --modes 3` writes three prompts per class; `generate --ipc 6` draws images from every mode of every
class; `pack` then `materialize` in a fresh folder gives the same images; `export` writes one token per mode;
`invert --modes 1` writes exactly what `invert` without the flag writes. Plus the k-means and the spreading rule on
their own, a class with fewer images than K, budgets that count every mode vector, and evaluate's fresh rounds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import promptset
from promptset.accounting import prompt_bytes
from promptset.artifacts import PromptSet, load_tensors, tensors_hash
from promptset.cli import main
from promptset.errors import UserError
from promptset.evaluation.results import load_rows
from promptset.models import create_student, load_teacher, penultimate_features
from promptset.modes import kmeans, mode_of, mode_sequence, split_modes
from promptset.packfile import read_pack

# car and cat have more images than modes; dog has fewer than K = 3 (it gets one mode per image)
IMAGES = {"car": 7, "cat": 6, "dog": 2}
SIZE = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(root: Path) -> Path:
    """Per class a base colour, and within it three shades (so k-means has modes to find), plus noise."""
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(IMAGES.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            base = np.array([60 + 60 * c + 45 * (i % 3), 200 - 70 * c, 90 + 40 * (i % 3)])
            pixels = np.clip(base + rng.integers(-15, 15, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def _invert(out: Path, sd: Path, data: Path, **extra) -> Path:
    return promptset.invert(out=str(out), backend="sd", model=str(sd), data=str(data), steps=2, batch_size=4,
                            device="cpu", progress=False, **extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd) -> SimpleNamespace:
    """Three inversions of the same data: --modes 3, --modes 1 and no flag; generate --ipc 6 on the first."""
    root = tmp_path_factory.mktemp("modes")
    data = _data(root / "data")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        _invert(root / "k3", tiny_sd, data, modes=3)
    _invert(root / "k1", tiny_sd, data, modes=1)
    _invert(root / "plain", tiny_sd, data)
    promptset.generate(run=str(root / "k3"), ipc=6, steps=2, device="cpu", progress=False)
    return SimpleNamespace(root=root, data=data, sd=tiny_sd, k3=root / "k3", k1=root / "k1", plain=root / "plain",
                           said=said.getvalue())


# ------------------------------------------------------------------------------------------------------------
# the must-show lines


def test_invert_modes_3_writes_three_prompts_per_class_and_a_smaller_class_gets_one_per_image(world):
    prompts = PromptSet.load(world.k3 / "prompts.safetensors")
    assert prompts.modes_per_class() == [3, 3, 2]  # dog has 2 images
    assert prompts.num_prompts == 8 and prompts.embeddings.shape[:2] == (8, 1)
    assert prompts.token_names == ["<car-m0>", "<car-m1>", "<car-m2>", "<cat-m0>", "<cat-m1>", "<cat-m2>",
                                   "<dog-m0>", "<dog-m1>"]
    assert prompts.mode_class == [0, 0, 0, 1, 1, 1, 2, 2]
    for c, n in enumerate(IMAGES.values()):  # the weights are the modes' training images
        weights = [prompts.mode_weight[r] for r in prompts.class_rows(c)]
        assert sum(weights) == n and weights == sorted(weights, reverse=True)  # mode 0 is the largest
    # stored as int32 tensors beside the embeddings; format 2 says so to older readers
    tensors, meta = load_tensors(world.k3 / "prompts.safetensors")
    assert set(tensors) == {"embeddings", "mode_class", "mode_weight"}
    assert tensors["mode_class"].dtype == tensors["mode_weight"].dtype == torch.int32
    assert meta["format_version"] == "2" and meta["mode_rule"] == "tijdeman"
    # each mode trained on its own members from the class word: the modes of a class are different vectors
    assert not torch.equal(prompts.embeddings[0], prompts.embeddings[1])
    # the assignment is recorded, inspectable and consistent with the weights
    modes = json.loads((world.k3 / "modes.json").read_text())
    assert modes["feature"] == "latent" and modes["modes_requested"] == 3
    for entry, c in zip(modes["classes"], range(3)):
        members = [i for m in entry["modes"] for i in m["members"]]
        assert sorted(members) == list(range(entry["images"]))
        assert entry["sizes"] == [prompts.mode_weight[r] for r in prompts.class_rows(c)]
    assert modes["classes"][2]["sizes"] == [1, 1]
    assert "invert: class dog has 2 training image(s), fewer than --modes 3: it gets one mode per image" in world.said
    assert "8 prompts in all" in world.said and "modes by k-means on latent features" in world.said
    metrics = [json.loads(x) for x in (world.k3 / "invert" / "metrics.jsonl").read_text().splitlines()]
    assert [r["classes"] for r in metrics] == [["car/m0", "car/m1", "car/m2", "cat/m0"],  # groups of 4 prompts
                                               ["cat/m1", "cat/m2", "dog/m0", "dog/m1"]]


def test_generate_ipc_6_draws_images_from_every_mode_of_every_class(world):
    prompts = PromptSet.load(world.k3 / "prompts.safetensors")
    rows = [json.loads(x) for x in (world.k3 / "generated" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * len(IMAGES)
    drawn = {(r["class"], r["mode"]) for r in rows}
    assert drawn == {(c, k) for c, n in zip(IMAGES, prompts.modes_per_class()) for k in range(n)}
    for r in rows:  # the recorded mode is the rule's, a pure function of (class, index, stored weights)
        weights = [prompts.mode_weight[x] for x in prompts.class_rows(r["class_index"])]
        assert r["mode"] == mode_of(weights, r["image"])
        assert r["token"] == prompts.token_names[prompts.class_rows(r["class_index"])[r["mode"]]]
        assert r["file"] == f"{r['class']}/{r['index']:05d}.png"  # class folders, as without modes
    car = [r["mode"] for r in rows if r["class"] == "car"]  # weights 3/2/2 (or so): six images hit every mode
    assert sorted(set(car)) == [0, 1, 2]
    settings = json.loads(load_tensors(world.k3 / "labels.safetensors")[1]["generation"])
    assert settings["mode_rule"] == "tijdeman"


def test_the_modes_change_the_images_and_a_stored_seed_regenerates_its_image(world, tmp_path):
    """Same seeds, same class: an image drawn from another mode differs; its own (mode, seed) gives it back."""
    from promptset.backends import create_backend
    from promptset.backends.sampling import Job, PromptConditioner, generate_batch
    from promptset.data import quantize_pixels

    prompts = PromptSet.load(world.k3 / "prompts.safetensors")
    rows = [json.loads(x) for x in (world.k3 / "generated" / "manifest.jsonl").read_text().splitlines()]
    backend = create_backend("sd", str(world.sd), device="cpu")
    cond = PromptConditioner(backend, prompts)
    uncond = backend.encode_prompts([""])
    row = next(r for r in rows if r["mode"] == 1)
    kw = dict(steps=2, guidance=7.5, factor=1, image_size=SIZE, uncond=uncond)
    again = quantize_pixels(generate_batch(backend, cond, [Job(row["class_index"], row["image"], row["seed"])], **kw))
    with Image.open(world.k3 / "generated" / row["file"]) as png:
        assert torch.equal(again[0, 0], torch.from_numpy(np.array(png)).permute(2, 0, 1))
    first = next(i for i in range(6) if mode_of([prompts.mode_weight[x] for x in prompts.class_rows(0)], i) == 0)
    other = quantize_pixels(generate_batch(backend, cond, [Job(row["class_index"], first, row["seed"])], **kw))
    assert not torch.equal(again, other)  # the same seed through mode 0 instead of mode 1


def test_pack_then_materialize_in_a_fresh_folder_gives_the_same_images(world, tmp_path, capsys):
    packed = tmp_path / "set.safetensors"
    assert main(["pack", str(world.k3), "--out", str(packed)]) == 0
    assert "modes: 8 prompts for 3 classes" in capsys.readouterr().out
    home = tmp_path / "receiver"
    home.mkdir()
    shutil.copy(packed, home / packed.name)
    shutil.copytree(world.sd, home / "generator")
    assert {"prompts.mode_class", "prompts.mode_weight"} <= set(read_pack(home / packed.name).tensors)
    out = home / "data"
    assert main(["materialize", str(home / packed.name), "--model", str(home / "generator"), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    assert "bit for bit equal to the images the set was made with" in capsys.readouterr().out
    gen = world.k3 / "generated"
    ours = sorted(p.relative_to(out / "round00" / "images") for p in (out / "round00" / "images").rglob("*.png"))
    theirs = sorted(p.relative_to(gen) for p in gen.rglob("*.png"))
    assert ours == theirs and len(ours) == 6 * len(IMAGES)
    assert all((out / "round00" / "images" / p).read_bytes() == (gen / p).read_bytes() for p in ours)
    report = json.loads((out / "materialize.json").read_text())
    assert report["rounds"][0]["equal"] and report["modes"]["per_class"] == [3, 3, 2]


def test_export_writes_one_token_per_mode_that_diffusers_loads(world, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = promptset.export(run=str(world.k3), out=str(tmp_path / "export"))
    prompts = PromptSet.load(world.k3 / "prompts.safetensors")
    files = sorted(out.glob("*.safetensors"))
    assert [f.stem for f in files] == ["car-m0", "car-m1", "car-m2", "cat-m0", "cat-m1", "cat-m2", "dog-m0", "dog-m1"]
    for f in files:
        (token,) = load_file(str(f))  # one token per file, as diffusers reads them
        assert token == f"<{f.stem}>"
    tokens = json.loads((out / "tokens.json").read_text())
    assert tokens["modes_per_class"] == [3, 3, 2] and [t["mode"] for t in tokens["tokens"]] == [0, 1, 2, 0, 1, 2, 0, 1]
    pipe = StableDiffusionPipeline.from_pretrained(world.sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion([str(f) for f in files])
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(prompts.token_names)
    assert torch.equal(table[ids], prompts.embeddings[:, 0])  # (M, D): every mode's vector, as learned
    # exporting a run without modes into the same folder leaves no mode token behind (they would load too)
    promptset.export(run=str(world.plain), out=str(out))
    assert sorted(f.stem for f in out.glob("*.safetensors")) == list(IMAGES)


def test_invert_modes_1_writes_exactly_what_invert_without_the_flag_writes(world):
    assert (world.k1 / "prompts.safetensors").read_bytes() == (world.plain / "prompts.safetensors").read_bytes()
    assert not (world.k1 / "modes.json").exists() and not (world.plain / "modes.json").exists()
    plain = PromptSet.load(world.plain / "prompts.safetensors")  # a file without mode tensors: one mode per class
    assert not plain.has_modes and plain.modes_per_class() == [1, 1, 1] and plain.row_of(2, 5) == 2
    assert set(load_tensors(world.plain / "prompts.safetensors")[0]) == {"embeddings"}


def test_rerunning_resumes_and_another_k_needs_overwrite(world, capsys):
    before = {p: (world.k3 / p).stat().st_mtime_ns for p in ("modes.json", "prompts.safetensors")}
    _invert(world.k3, world.sd, world.data, modes=3)  # the same command: modes.json and the groups are reused
    assert {p: (world.k3 / p).stat().st_mtime_ns for p in before} == before
    assert "clustering again" not in capsys.readouterr().out
    _invert(world.plain, world.sd, world.data, modes=1)  # --modes 1 is the run recorded before the flag existed
    with pytest.raises(UserError, match=r"already holds a different invert run \(changed: modes\)"):
        _invert(world.plain, world.sd, world.data, modes=2)


# ------------------------------------------------------------------------------------------------------------
# every stored vector counts


def test_budget_counts_every_mode_vector_and_its_class_and_weight(world):
    result = promptset.budget(run=str(world.k3), ipcs="1,6")
    prompts = PromptSet.load(world.k3 / "prompts.safetensors")
    d = prompts.embeddings.shape[-1]
    assert result["components"]["prompts"] == 8 * d * 4 + 8 * 4 * 2 == prompt_bytes(8, 1, d, "fp32", modes=True)
    assert result["components"]["prompts"] == prompts.stored_bytes()
    assert result["prompts"] == {"prompts": 8, "vectors_per_prompt": 1, "modes_per_class": [3, 3, 2]}
    plain = promptset.budget(run=str(world.plain), ipcs="1")
    assert plain["components"]["prompts"] == prompt_bytes(3, 1, d, "fp32") == 3 * d * 4


def test_evaluate_fresh_rounds_spread_over_the_modes_and_count_their_bytes(world):
    results = promptset.evaluate(run=str(world.k3), test=str(world.data), student="convnet_tiny", protocol="p2",
                                 epochs=2, seeds=1, regen_every=1, ipc=6, gen_steps=2, device="cpu", progress=False,
                                 report=False)
    (entry,) = results["entries"].values()
    prompts = PromptSet.load(world.k3 / "prompts.safetensors")
    assert entry["stored_components"]["prompts"] == prompts.stored_bytes()  # Method.planned_bytes == stored
    assert entry["distilled"]["modes"] == {"prompts": 8, "per_class": [3, 3, 2]}
    assert entry["distilled"]["round0_reused_generated"]  # generate's images: the same rule and settings
    assert entry["distilled"]["rounds"] == 2
    (row,) = load_rows([world.k3])
    assert row["method"].startswith("d3m [2-3 modes, 8 prompts")


# ------------------------------------------------------------------------------------------------------------
# features from a teacher; flags refused


def test_modes_from_teacher_features(world, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    save_file(create_student("convnet_tiny", len(IMAGES), SIZE).state_dict(), str(weights))
    spec = f"convnet_tiny:{weights}"
    teacher = load_teacher(spec, num_classes=len(IMAGES))
    feats = penultimate_features(teacher, torch.rand(5, 3, SIZE, SIZE))
    assert feats.shape[0] == 5 and feats.shape[1] == teacher.net.classifier.in_features
    _invert(tmp_path / "run", world.sd, world.data, modes=2, mode_features="teacher", teacher=spec)
    modes = json.loads((tmp_path / "run" / "modes.json").read_text())
    assert modes["feature"] == "teacher" and modes["key"]["by"] == teacher.weights_sha256
    assert PromptSet.load(tmp_path / "run" / "prompts.safetensors").modes_per_class() == [2, 2, 2]


@pytest.mark.parametrize("flags, message", [
    (["--modes", "0"], "--modes must be 1 or more"),
    (["--modes", "-2"], "--modes must be 1 or more"),
    (["--modes", "2", "--mode-features", "teacher"], "--mode-features teacher needs --teacher"),
])  # fmt: skip
def test_bad_modes_flags_exit_2_naming_the_flag_and_write_nothing(world, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    argv = ["invert", "--backend", "sd", "--model", str(world.sd), "--data", str(world.data), "--out", str(out),
            "--steps", "2", "--device", "cpu", "--no-progress", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_modes_auto_and_fractions_are_refused_by_the_parser(world, tmp_path, capsys):
    for value in ("auto", "1.5"):
        with pytest.raises(SystemExit) as err:
            main(["invert", "--model", str(world.sd), "--out", str(tmp_path / "run"), "--modes", value])
        assert err.value.code == 2 and "--modes" in capsys.readouterr().err
    with pytest.raises(UserError, match="--modes must be a whole number"):
        promptset.invert(out=str(tmp_path / "run"), model=str(world.sd), modes="auto")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------
# the pieces: k-means and the spreading rule


def test_kmeans_is_deterministic_for_a_seed_and_finds_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [5, 4, 3]
    x = torch.cat([c + 0.1 * torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes)])  # (12, 2)
    perm = torch.randperm(12, generator=g)
    x = x[perm]
    truth = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)[perm]
    runs = [split_modes(x, 3, torch.Generator().manual_seed(s)) for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1]  # same seed, same modes
    for groups in runs:  # any seed separates the blobs, largest first
        assert [len(m) for m in groups] == sizes
        assert all(len(set(truth[m].tolist())) == 1 for m in groups)
        assert sorted(i for m in groups for i in m) == list(range(12))


def test_kmeans_keeps_every_cluster_nonempty_on_duplicates():
    x = torch.zeros(4, 3)  # every row the same: k-means++ has no distance to draw by, every row ties
    assign = kmeans(x, 3, torch.Generator().manual_seed(0))
    assert assign.tolist() == [1, 2, 0, 0]  # ties join cluster 0; the empty ones take the lowest rows it can spare
    assert torch.equal(assign, kmeans(x, 3, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError):
        kmeans(x, 5, torch.Generator().manual_seed(0))


def test_spreading_rule_every_prefix_is_proportional_and_an_image_never_changes_mode():
    rng = random.Random(0)
    cases = [[3, 2, 2], [1, 1], [5], [1, 1000], [7, 3, 3, 1]] + [
        [rng.randint(1, 50) for _ in range(rng.randint(2, 7))] for _ in range(60)]
    for weights in cases:
        total, k = sum(weights), len(weights)
        seq = mode_sequence(weights, 3 * total + 7)
        counts = [0] * k
        for t, m in enumerate(seq, 1):
            counts[m] += 1
            for j in range(k):  # floor or ceil of t * s_j / S: |n_j - t p_j| <= 1 - 1/(2K - 2) < 1
                share = t * weights[j] / total
                assert math.floor(share) <= counts[j] <= math.ceil(share), (weights, t, counts)
        assert [seq[:total].count(j) for j in range(k)] == weights  # a whole cycle: every mode exactly its weight
        assert seq[0] == weights.index(max(weights))  # IPC 1: the largest mode
        assert mode_sequence(weights, 10) == seq[:10]  # IPC 10 is a prefix of IPC 50
        assert [mode_of(weights, i) for i in (0, 5, total)] == [seq[0], seq[5], seq[total]]
    with pytest.raises(ValueError):
        mode_sequence([2, 0], 3)


def test_int8_prompts_with_modes_round_trip_and_count_every_byte(tmp_path):
    emb = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(0))
    prompts = PromptSet(emb, [f"<c{i}>" for i in range(5)], ["a", "b"], "a photo of {token}", "sd", "m", "h",
                        stored_dtype="int8", mode_class=[0, 0, 0, 1, 1], mode_weight=[4, 3, 3, 2, 1])
    prompts.save(tmp_path / "p.safetensors")
    tensors, _ = load_tensors(tmp_path / "p.safetensors")
    assert set(tensors) == {"embeddings", "scales", "mode_class", "mode_weight"}
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == prompt_bytes(5, 2, 16, "int8", modes=True)
    back = PromptSet.load(tmp_path / "p.safetensors")
    assert back.mode_class == [0, 0, 0, 1, 1] and back.mode_weight == [4, 3, 3, 2, 1]
    alone = PromptSet(back.embeddings, back.token_names, back.class_folders, back.template, "sd", "m", "h")
    assert alone.content_hash() == tensors_hash({"embeddings": back.embeddings})  # what settings always recorded
    assert back.content_hash() != alone.content_hash()  # the modes' classes and weights change the images
    assert [back.row_of(1, i) for i in range(4)] == [3, 4, 3, 3]  # weights 2/1: the larger mode first
    assert back.same_as_file(tmp_path / "p.safetensors")


def test_prompt_files_with_broken_modes_are_refused(world, tmp_path):
    tensors, meta = load_tensors(world.k3 / "prompts.safetensors")
    from promptset.artifacts import save_tensors

    bad = dict(tensors, mode_class=torch.tensor([0, 0, 0, 2, 2, 2, 2, 2], dtype=torch.int32))  # class 1 has none
    save_tensors(tmp_path / "p.safetensors", bad, meta)
    with pytest.raises(UserError, match="p.safetensors: its mode_class/mode_weight tensors"):
        PromptSet.load(tmp_path / "p.safetensors")
    save_tensors(tmp_path / "q.safetensors", {k: v for k, v in tensors.items() if k != "mode_weight"}, meta)
    with pytest.raises(UserError, match="q.safetensors lacks or garbles 'mode_weight'"):
        PromptSet.load(tmp_path / "q.safetensors")


@pytest.mark.slow
def test_torchrun_two_processes_learn_the_modes_of_one_process(world, tmp_path):
    """Rank 0 clusters, every rank reads modes.json, the (class, mode) groups go one per process: the same prompts,
    bit for bit, as one process (one thread each, as torchrun's workers)."""
    import os
    import socket
    import subprocess
    import sys

    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["invert", "--backend", "sd", "--model", world.sd, "--data", world.data, "--steps", 3, "--batch-size", 4,
            "--modes", 2, "--device", "cpu", "--no-progress"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = {"one": [sys.executable, "-m", "promptset"],
              "two": [Path(sys.executable).parent / "torchrun", "--nproc-per-node", 2, "--master-port", port, "-m",
                      "promptset"]}
    for name, head in launch.items():
        done = subprocess.run([str(a) for a in [*head, *args, "--out", tmp_path / name]], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "group 1 data parallel" not in done.stdout and "2 group(s) of up to 4 prompts" in done.stdout
    assert (tmp_path / "two" / "modes.json").read_bytes() == (tmp_path / "one" / "modes.json").read_bytes()
    one, two = (load_tensors(tmp_path / k / "prompts.safetensors")[0] for k in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
