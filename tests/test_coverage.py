"""`promptset coverage`: precision, recall, density and coverage checked against values computed by hand (ties at the
radius, classes with fewer than k + 1 images), the teacher's penultimate features, and the stage end to end on a tiny
ImageFolder with a tiny teacher (the JSON, the table, report.md's section, refusals before anything is written).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import promptset
from promptset.cli import main
from promptset.evaluation.coverage import pairwise_cosine_distance, prdc
from promptset.evaluation.results import coverage_sections
from promptset.models import Teacher, create_student
from promptset.models.teachers import teacher_features
from promptset.runfolder import write_classes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def col(*values: float) -> torch.Tensor:
    """1-D points as (n, 1) features."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


# ------------------------------------------------------------------------------------------------------------
# the metrics, by hand


def test_precision_recall_density_coverage_match_hand_computation_with_ties():
    # k = 2. Real R = 0 1 2 4 10 50 51 52; radius = distance to the 2nd nearest *other* real point:
    #   0: others at 1 2 4 ...      -> r = 2     ball [-2, 2]
    #   1: others at 1 1 3 ...      -> r = 1     ball [ 0, 2]
    #   2: others at 1 2 2 ...      -> r = 2     ball [ 0, 4]
    #   4: others at 2 3 4 ...      -> r = 3     ball [ 1, 7]
    #  10: others at 6 8 9 ...      -> r = 8     ball [ 2, 18]
    #  50: others at 1 2 40 ...     -> r = 2     ball [48, 52]
    #  51: others at 1 1 ...        -> r = 1     ball [50, 52]
    #  52: others at 1 2 ...        -> r = 2     ball [50, 54]
    # Set F = -1 3 7 18; real balls holding each:
    #  -1: [-2,2]                              -> 1
    #   3: [0,4] [1,7] [2,18]                  -> 3
    #   7: [1,7] (|7-4| = 3 = r: a tie) [2,18] -> 2
    #  18: [2,18] (|18-10| = 8 = r: a tie)     -> 1
    # precision = 4/4 (with a strict < it would be 3/4: 18 sits only on a radius)
    # density = (1 + 3 + 2 + 1) / (k m) = 7 / 8 (strict <: 5/8)
    # coverage: balls of 0, 2, 4, 10 hold a point of F; 1, 50, 51, 52 do not -> 4/8
    # The set's radii (2nd nearest other point of F): -1: 4 8 19 -> 8; 3: 4 4 15 -> 4; 7: 4 8 11 -> 8;
    # 18: 11 15 19 -> 15; balls [-9,7] [-1,7] [-1,15] [3,33] hold 0 1 2 4 10 but not 50 51 52 -> recall 5/8
    real, fake = col(0, 1, 2, 4, 10, 50, 51, 52), col(-1, 3, 7, 18)
    m = prdc(real, fake, k=2)
    assert m["precision"] == 1.0 and m["density"] == 7 / 8 and m["coverage"] == 4 / 8 and m["recall"] == 5 / 8
    assert (m["k_real"], m["k_fake"], m["n_real"], m["n_fake"]) == (2, 2, 8, 4)
    # the same configuration moved off the lattice, so 7 and 18 sit just outside their balls: the ties decided it
    off = prdc(real, col(-1, 3, 7.001, 18.001), k=2)
    assert off["precision"] == 3 / 4 and off["density"] == 5 / 8


def test_ties_at_the_radius_count_as_inside_for_coverage_and_recall():
    # k = 1. Real 0 1: radii 1 1, balls [-1,1] [0,2]. Set 2 3: radii 1 1, balls [1,3] [2,4].
    # precision: 2 lies on [0,2]'s edge (inside), 3 outside -> 1/2; density = 1 / (1 * 2) = 1/2
    # coverage: [0,2] holds 2 (on its edge), [-1,1] nothing -> 1/2
    # recall: 1 lies on [1,3]'s edge (inside), 0 in no ball -> 1/2. With a strict < all four would be 0.
    m = prdc(col(0, 1), col(2, 3), k=1)
    assert (m["precision"], m["recall"], m["density"], m["coverage"]) == (0.5, 0.5, 0.5, 0.5)


def test_distances_are_euclidean_in_several_dimensions():
    # k = 1. Real (0,0) (3,4): 5 apart, so both radii are 5. Set (3,0): 3 from (0,0) and 4 from (3,4), inside both
    # balls; (6,8): 10 from (0,0), and exactly 5 from (3,4), on its edge -> inside.
    # precision 2/2, density (2 + 1) / (1 * 2) = 3/2, coverage 2/2. The set's radii: both |(3,0) - (6,8)| =
    # sqrt(73) = 8.54, and (0,0), (3,4) are 3 and 4 from (3,0) -> recall 2/2.
    m = prdc(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [6.0, 8.0]]), k=1)
    assert (m["precision"], m["density"], m["coverage"], m["recall"]) == (1.0, 1.5, 1.0, 1.0)
    # (6.01, 8) is sqrt(3.0^2 + 4^2) > 5 from (3,4): outside every ball -> precision 1/2, density 2/2
    m = prdc(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [6.01, 8.0]]), k=1)
    assert (m["precision"], m["density"]) == (0.5, 1.0)


def test_a_class_with_fewer_than_k_plus_one_images_uses_k_of_n_minus_one():
    # k = 5 but only 3 real points: k' = 2 (the farthest other point). Real 0 1 3: radii 3 (others 1 3),
    # 2 (others 1 2), 3 (others 3 2); balls [-3,3] [-1,3] [0,6]. Set 1 10 (k' = 1: radii 9 9, balls [-8,10] [1,19]).
    # precision: 1 is in all three balls, 10 in none -> 1/2; density = 3 / (k' m) = 3 / (2 * 2) = 3/4
    # coverage: every ball holds 1 -> 1; recall: 0 1 3 all in [-8,10] -> 1
    m = prdc(col(0, 1, 3), col(1, 10), k=5)
    assert (m["k_real"], m["k_fake"]) == (2, 1)
    assert (m["precision"], m["recall"], m["density"], m["coverage"]) == (0.5, 1.0, 0.75, 1.0)
    # one point has no other point, so no radius: the metrics that need its balls are None, the others stay defined
    one_fake = prdc(col(0, 1, 3), col(1), k=5)
    assert one_fake["recall"] is None and one_fake["k_fake"] == 0
    assert (one_fake["precision"], one_fake["density"], one_fake["coverage"]) == (1.0, 3 / 2, 1.0)
    one_real = prdc(col(5), col(5, 6), k=5)  # set radii 1 1: balls [4,6] [5,7] hold the real 5 -> recall 1
    assert one_real["k_real"] == 0 and one_real["precision"] is None and one_real["density"] is None
    assert one_real["coverage"] is None and one_real["recall"] == 1.0


def test_duplicates_are_other_points_at_distance_zero():
    # k = 1. Real 0 0 5: the two zeros are each other's nearest other point (radius 0); 5's radius is 5.
    # Set 0: in both zero balls (0 <= 0) and in 5's ball [0,10] (a tie) -> precision 1, density 3 / 1, coverage 1.
    m = prdc(col(0, 0, 5), col(0), k=1)
    assert (m["precision"], m["density"], m["coverage"]) == (1.0, 3.0, 1.0)


def test_identical_sets_give_precision_recall_coverage_one_and_density_k_plus_one_over_k():
    x = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    m = prdc(x, x.clone(), k=5)
    assert (m["precision"], m["recall"], m["coverage"]) == (1.0, 1.0, 1.0)
    # every real ball holds its own point and its k nearest others (no ties in random data): n (k + 1) / (k n)
    assert m["density"] == pytest.approx(6 / 5, abs=1e-12)


def test_pairwise_cosine_distance_by_hand():
    # (1,0) (0,1) (1,1): pairs 1-0 = 1, 1 - 1/sqrt(2), 1 - 1/sqrt(2); mean over the 3 pairs
    got = pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert got == pytest.approx((1 + 2 * (1 - 1 / math.sqrt(2))) / 3, abs=1e-12)
    assert pairwise_cosine_distance(torch.tensor([[2.0, 0.0], [5.0, 0.0]])) == pytest.approx(0.0, abs=1e-12)
    assert pairwise_cosine_distance(torch.ones(1, 3)) is None


def test_prdc_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="features"):
        prdc(torch.zeros(3, 2), torch.zeros(3, 4), k=1)
    with pytest.raises(ValueError, match="k must be"):
        prdc(torch.zeros(3, 2), torch.zeros(3, 2), k=0)


# ------------------------------------------------------------------------------------------------------------
# penultimate features


def test_teacher_features_are_the_input_of_the_final_linear_layer():
    torch.manual_seed(0)
    for name, size, dim in (("convnet_tiny", 16, 16 * 4 * 4), ("resnet20", 32, 64)):
        net = create_student(name, 3, size).eval()
        teacher = Teacher(net, f"{name}:x", name, Path("x"), "0" * 64, image_size=size)
        pixels = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)
        feats, logits = teacher_features(teacher, pixels, chunk=4)  # 4 + 1 padded to 4
        assert feats.shape == (5, dim) and logits.shape == (5, 3)
        x = pixels.float() / 255
        with torch.no_grad():
            if name == "convnet_tiny":
                want = net.features(net.normalize(x)).flatten(1)
            else:
                h = torch.relu(net.bn1(net.conv1(net.normalize(x))))
                want = net.layer3(net.layer2(net.layer1(h))).mean(dim=(2, 3))
            torch.testing.assert_close(feats, want)
            torch.testing.assert_close(logits, net(x))
        # an image's features do not depend on its batch neighbours
        alone, _ = teacher_features(teacher, pixels[3:4], chunk=4)
        assert torch.equal(alone[0], feats[3])
        assert not any(m._forward_pre_hooks for m in net.modules())  # the hook is gone


# ------------------------------------------------------------------------------------------------------------
# the stage, end to end

COLOURS = {"blue": (40, 50, 210), "green": (40, 190, 60), "red": (210, 40, 40)}
SIZE = 16


def _folder(root: Path, per_class: int, seed: int, noise: float = 35.0) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.asarray(colour)[None, None] + rng.normal(0, noise, (SIZE, SIZE, 3))  # (H, W, 3)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("coverage")
    real = _folder(root / "real", 10, seed=1)
    run = root / "run"
    write_classes(run, list(COLOURS), list(COLOURS))
    _folder(run / "generated", 4, seed=2, noise=10.0)  # a narrow set: little noise around each colour
    (run / "generated" / "manifest.jsonl").write_text("{}\n")  # generate's manifest: skipped, not an image
    torch.manual_seed(0)
    path = root / "teacher.safetensors"
    save_file(create_student("convnet_tiny", len(COLOURS), SIZE).state_dict(), str(path))
    return SimpleNamespace(root=root, real=real, run=run, teacher=f"convnet_tiny:{path}")


def test_stage_writes_json_and_table_for_a_run(world, capsys):
    result = promptset.coverage(run=str(world.run), real=str(world.real), teacher=world.teacher, progress=False)
    saved = json.loads((world.run / "coverage.json").read_text())
    assert saved["classes"] == result["classes"] and saved["format"] == "promptset.coverage"
    assert saved["teacher"]["feature_dim"] == 16 * 4 * 4 and saved["teacher"]["input_size"] == SIZE
    assert saved["k"] == 5 and saved["counts"] == {"images": "4", "real": "6", "images_total": 12, "real_total": 18}
    for row, folder in zip(saved["classes"], COLOURS):
        assert row["class"] == folder and (row["images"], row["real"]) == (4, 6)
        assert (row["k_real"], row["k_images"]) == (5, 3)  # 6 real: 5 others; 4 images: only 3 others
        assert len(row["reference_files"]) == 4 and len(set(row["reference_files"])) == 4
        for key in ("set", "reference"):
            assert all(0.0 <= row[key][m] <= 1.0 for m in ("precision", "recall", "coverage", "teacher_top1"))
            assert row[key]["density"] >= 0.0 and row[key]["pairwise_cosine"] >= 0.0
    # the narrow set spreads less than as many random real images of its class
    assert saved["overall"]["set"]["pairwise_cosine"] < saved["overall"]["reference"]["pairwise_cosine"]
    for m in ("precision", "coverage"):
        mean = sum(r["set"][m] for r in saved["classes"]) / 3
        assert saved["overall"]["set"][m] == pytest.approx(mean)
    assert saved["overall"]["classes"]["set"]["recall"] == 3
    md = (world.run / "coverage.md").read_text()
    out = capsys.readouterr().out
    assert "| blue | 4 | 6 | images |" in md and "| **overall** | 4 | 6 | images |" in md
    assert "compare only sets of equal size" in md
    assert "Too few images for k: blue (real side k = 5, images k = 3)" in md
    assert md.strip() in out and str(world.run / "coverage.json") in out
    section = coverage_sections([world.run])  # what report.md adds for this run
    assert "## Coverage" in section and "| random real | 4 |" in section
    assert f"{saved['overall']['set']['coverage']:.3f}" in section


def test_the_set_measured_is_the_reference_when_it_holds_the_reference_images(world, tmp_path):
    """The set and the reference are measured against the same real side: copying the drawn real images into a
    folder of their own and measuring that folder gives the reference's numbers exactly."""
    first = promptset.coverage(run=str(world.run), real=str(world.real), teacher=world.teacher, seed=3,
                               out=str(tmp_path / "a.json"), progress=False)
    copy = tmp_path / "drawn"
    for row in first["classes"]:
        (copy / row["class"]).mkdir(parents=True)
        for name in row["reference_files"]:
            shutil.copy(world.real / row["class"] / name, copy / row["class"] / name)
    second = promptset.coverage(images=str(copy), real=str(world.real), teacher=world.teacher, seed=3,
                                progress=False)
    assert (tmp_path / "coverage.json").is_file()  # beside the --images folder by default
    for a, b in zip(first["classes"], second["classes"]):
        assert b["set"] == a["reference"] == b["reference"]


def test_stage_is_deterministic_for_a_seed_and_draws_otherwise_for_another(world, tmp_path):
    kw = dict(run=str(world.run), real=str(world.real), teacher=world.teacher, progress=False)
    a = promptset.coverage(out=str(tmp_path / "a.json"), seed=0, **kw)
    again = promptset.coverage(out=str(tmp_path / "again.json"), seed=0, **kw)
    assert a["classes"] == again["classes"] and a["overall"] == again["overall"]
    b = promptset.coverage(out=str(tmp_path / "b.json"), seed=0, batch_size=3, **kw)  # other batches: same numbers
    for x, y in zip(a["classes"], b["classes"]):
        assert x["reference_files"] == y["reference_files"]
        for key in ("set", "reference"):
            assert y[key] == pytest.approx(x[key], abs=1e-6)
    c = promptset.coverage(out=str(tmp_path / "c.json"), seed=1, **kw)
    assert [r["reference_files"] for r in a["classes"]] != [r["reference_files"] for r in c["classes"]]
    capped = promptset.coverage(out=str(tmp_path / "d.json"), per_class=2, k=1, **kw)
    assert capped["counts"]["images"] == "2" and capped["counts"]["real"] == "8"
    assert all((r["k_real"], r["k_images"]) == (1, 1) for r in capped["classes"])


def test_cli_refuses_other_classes_in_real_naming_it_and_writes_nothing(world, tmp_path, capsys):
    other = tmp_path / "other"
    for name in ("blue", "green", "yellow"):
        shutil.copytree(world.real / ("red" if name == "yellow" else name), other / name)
    out = tmp_path / "cov.json"
    code = main(["coverage", "--images", str(world.run / "generated"), "--real", str(other), "--teacher",
                 world.teacher, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--real" in err and "'red'" in err and "'yellow'" in err
    assert not out.exists() and not out.with_suffix(".md").exists()


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k 0"),
    (["--per-class", "-1"], "--per-class -1"),
    (["--teacher", "none"], "--teacher is required"),
    (["--teacher", "convnet_tiny:missing.safetensors"], "teacher weights not found"),
    (["--out", "x.md"], "--out x.md"),
])  # fmt: skip
def test_cli_refuses_bad_flags_before_writing(world, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    flags = {"--images": str(world.run / "generated"), "--real": str(world.real), "--teacher": world.teacher,
             "--out": str(tmp_path / "c.json")}
    flags.update(dict(zip(args[::2], args[1::2])))
    code = main(["coverage", *[a for kv in flags.items() for a in kv], "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_refuses_a_real_class_too_small_for_the_reference(world, tmp_path, capsys):
    small = tmp_path / "small"
    for name in COLOURS:
        (small / name).mkdir(parents=True)
        for f in sorted((world.real / name).iterdir())[:5]:  # 5 real images; the reference draws 4, leaving 1
            shutil.copy(f, small / name / f.name)
    code = main(["coverage", "--images", str(world.run / "generated"), "--real", str(small), "--teacher",
                 world.teacher, "--out", str(tmp_path / "c.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--real" in err and "--per-class (at most 3)" in err
    assert not (tmp_path / "c.json").exists()


def test_report_md_shows_a_runs_coverage_and_skips_a_broken_file(world, tmp_path, capsys):
    from promptset.evaluation.results import write_report

    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    promptset.coverage(run=str(run), real=str(world.real), teacher=world.teacher, progress=False)
    top1 = {"mean": 50.0, "std": 1.0, "per_seed": [49.0, 51.0]}
    entry = {"method": "d3m", "protocol": "p2", "student": "convnet_tiny", "ipc": 4, "epochs": 1, "seeds": [0, 1],
             "final_top1": top1, "best_top1": top1, "stored_bytes": 1000, "ipc_equivalent": 0.1, "num_classes": 3}
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"format": "promptset.eval", "entries": {"k": entry}}))
    text = write_report([run], run / "eval").read_text()
    saved = json.loads((run / "coverage.json").read_text())
    assert "| d3m | p2 | convnet_tiny | 4 |" in text and f"## Coverage ({run / 'coverage.json'})" in text
    row = " | ".join(f"{saved['overall']['reference'][m]:.3f}" for m in saved["metrics"])
    assert f"| random real | 4 | {row} |" in text
    (run / "coverage.json").write_text("{not json")
    text = write_report([run], run / "eval").read_text()
    assert "## Coverage" not in text and "not readable JSON" in capsys.readouterr().out


def test_the_runs_teacher_is_the_default_and_is_named(world, tmp_path, capsys):
    from promptset.runfolder import write_config

    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    write_config(run, "generate", {"teacher": world.teacher, "ipc": 4})
    result = promptset.coverage(run=str(run), real=str(world.real), progress=False)
    assert result["teacher"]["spec"] == world.teacher and result["teacher"]["from"] == f"generate's config in {run}"
    assert f"teacher {world.teacher} (from generate's config in {run})" in capsys.readouterr().out
    code = main(["coverage", str(world.run), "--real", str(world.real), "--out", str(tmp_path / "c.json")])
    assert code == 2 and f"({world.run} names no teacher)" in capsys.readouterr().err
