"""A researcher's own dataset, start to finish (issue 12): `--help` of every command, defaults that never refuse valid
input (multi-token class names, any class count with any batch size), `promptset teacher` feeding select / generate
--soft-labels / evaluate P1, IPC lists and the equal-bytes random-real row, readable grids and plots, quiet logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import promptset
from promptset.backends.selection import AUTO_CANDIDATES
from promptset.cli import COMMANDS, main
from promptset.models import load_teacher

SIZE = 16
# folder -> colour; "zebra_crossing" and "xqzvbnw" are several tokens in CLIP's BPE, so the default initializer
# (the class name) has to fall back for them
COLOURS = {"car": (220, 40, 40), "xqzvbnw": (40, 200, 60), "zebra_crossing": (50, 70, 230)}


def _split(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.asarray(colour)[None, None] + rng.normal(0, 35, (20, 20, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.jpg")
    (root / ".DS_Store").write_bytes(b"\0")  # a stray file in the root is skipped, not an error
    return root


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.mark.parametrize("command", [*COMMANDS, "run"])
def test_help_of_every_command_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: promptset" in capsys.readouterr().out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("usability")
    train = _split(root / "data" / "train", 8, seed=0)
    test = _split(root / "data" / "test", 6, seed=1)
    return SimpleNamespace(root=root, train=train, test=test, sd=tiny_sd, teacher=root / "teacher.safetensors",
                           run=root / "run")


def test_teacher_trains_stores_its_recipe_and_resumes(world, capsys):
    code, out, err = cli(capsys, "teacher", "--data", world.train, "--test", world.test, "--out", world.teacher,
                         "--arch", "convnet_tiny", "--image-size", SIZE, "--epochs", 6, "--lr", 1e-2,
                         "--checkpoint-every", 2, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "teacher: test top-1" in out and str(world.teacher) in out
    from safetensors import safe_open

    with safe_open(str(world.teacher), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "convnet_tiny" and json.loads(meta["class_folders"]) == list(COLOURS)
    assert meta["image_size"] == str(SIZE) and json.loads(meta["normalize"])["mean"][0] == pytest.approx(0.485)
    assert float(meta["test_top1"]) > 50.0  # three colours: easy
    assert not Path(f"{world.teacher}.checkpoint").exists()
    code, out, _ = cli(capsys, "teacher", "--data", world.train, "--test", world.test, "--out", world.teacher,
                       "--arch", "convnet_tiny", "--image-size", SIZE, "--epochs", 6, "--lr", 1e-2, "--device", "cpu")
    assert code == 0 and "already trained with these options" in out

    # its bare path is a teacher: the architecture, classes and input size come from the file
    teacher = load_teacher(str(world.teacher), class_folders=list(COLOURS))
    assert (teacher.name, teacher.image_size, teacher.num_classes) == ("convnet_tiny", SIZE, 3)
    assert teacher(torch.rand(2, 3, 40, 40)).shape == (2, 3)  # any input size: resized to the trained size
    with pytest.raises(promptset.UserError, match="promptset teacher --data"):
        load_teacher(str(world.teacher), class_folders=["car", "zebra_crossing", "xqzvbnw"])
    with pytest.raises(promptset.UserError, match="trained as 'convnet_tiny'"):
        load_teacher(f"convnet3:{world.teacher}")


def test_student_training_resumes_bit_for_bit_from_a_checkpoint():
    from promptset.evaluation.student import Recipe, TrainSet, train_student
    from promptset.models import create_student

    g = torch.Generator().manual_seed(0)
    data = TrainSet((torch.rand(12, 3, 8, 8, generator=g) * 255).byte(), torch.arange(3).repeat(4))
    recipe = Recipe(epochs=4, batch_size=5, optimizer="adamw", lr=1e-2, momentum=0.9, weight_decay=0.01,
                    schedule="cosine", targets="one-hot", temperature=None,
                    augment={"random_resized_crop_min_scale": 0.5, "ratio": None, "flip": True, "cutmix_beta": 1.0},
                    regen_every=0, eval_every=1, eval_batch_size=8, channels_last=False, compile=False, amp=False)

    def fresh():
        torch.manual_seed(1)
        return create_student("convnet_tiny", 3, 8)

    saved = []
    whole = fresh()
    full = train_student(whole, [data], None, recipe, seed=3, progress=False, on_checkpoint=saved.append,
                         checkpoint_every=2)
    assert full["final_top1"] is None and len(saved) == 1  # no test split: nothing tested
    resumed = fresh()
    part = train_student(resumed, [data], None, recipe, seed=3, progress=False, resume=saved[0])
    assert part["optimizer_steps"] == full["optimizer_steps"]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_select_invert_generate_evaluate_with_that_teacher_and_default_initializers(world, capsys):
    if not world.teacher.is_file():
        pytest.skip("needs the teacher of the test above")
    run = world.run
    code, _, err = cli(capsys, "select", "--data", world.train, "--out", run, "--teacher", world.teacher,
                       "--resolution", SIZE, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert json.loads((run / "select.json").read_text())["teacher"] == str(world.teacher)

    # 3 classes, batch 4 (no multiple), two multi-token names: the defaults run and say what they chose
    code, out, err = cli(capsys, "invert", "--backend", "sd", "--model", world.sd, "--out", run, "--steps", 3,
                         "--batch-size", 4, "--resolution", SIZE, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "group(s) of up to 3 classes, batch 4: the classes in turn" in out
    assert "initializer 'zebra crossing' is 2 tokens" in out and "starts from the mean of their embeddings" in out
    assert "final loss" in out
    first = promptset.PromptSet.load(run / "prompts.safetensors").embeddings
    again = world.root / "again"
    assert cli(capsys, "invert", "--backend", "sd", "--model", world.sd, "--out", again, "--data", run / "collages",
               "--steps", 3, "--batch-size", 4, "--resolution", SIZE, "--device", "cpu", "--no-progress")[0] == 0
    assert torch.equal(first, promptset.PromptSet.load(again / "prompts.safetensors").embeddings)  # seed -> result

    code, out, err = cli(capsys, "generate", "--run", run, "--ipc", 2, "--steps", 2, "--soft-labels", "--teacher",
                         world.teacher, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "generate: 6 images (3 classes x 2" in out  # --no-progress still says what it did
    grid = Image.open(run / "grid.png")
    assert grid.width >= 256 + 20 and grid.height == 3 * max(SIZE * 8, 14)  # enlarged, plus a label column
    left = np.asarray(grid.convert("L"))[:, :20]
    assert (left < 128).any()  # the class names are drawn in the label column

    code, out, err = cli(capsys, "evaluate", "--run", run, "--test", world.test, "--train", world.train,
                         "--method", "d3m,random-real,random-real@d3m", "--protocol", "p1", "--ipc", "1,2",
                         "--student", "convnet_tiny", "--epochs", 2, "--seeds", 1, "--gen-steps", 2,
                         "--regen-every", 1, "--device", "cpu", "--no-progress")
    assert code == 0, err
    entries = json.loads((run / "eval" / "results.json").read_text())["entries"]
    best = f"best-of-{AUTO_CANDIDATES}"  # a teacher was given, so seed selection is on by default
    assert {f"d3m/p1/convnet_tiny/ipc1/regen1/{best}/mixed", f"d3m/p1/convnet_tiny/ipc2/regen1/{best}/mixed",
            "random-real/p1/convnet_tiny/ipc1", "random-real/p1/convnet_tiny/ipc2"} <= set(entries)
    equal = [e for e in entries.values() if e["method"] == "random-real@d3m"]
    assert len(equal) == 2
    for e in equal:
        match = e["distilled"]["equal_bytes"]
        assert e["ipc"] == match["ipc"] and e["stored_bytes"] <= max(match["method_stored_bytes"],
                                                                     e["stored_bytes"] if e["ipc"] == 1 else 0)
    assert entries[f"d3m/p1/convnet_tiny/ipc1/regen1/{best}/mixed"]["teacher"]["spec"] == str(world.teacher)
    assert (run / "eval" / "accuracy_vs_bytes.png").is_file()

    code, _, err = cli(capsys, "evaluate", "--run", run, "--test", world.test, "--ipc", 0, "--device", "cpu")
    assert code == 2 and "--ipc '0': images per class must be at least 1" in err


def test_config_yaml_records_absolute_paths(world, monkeypatch, capsys, tmp_path):
    import yaml

    monkeypatch.chdir(world.root)
    out = tmp_path / "rel"
    assert cli(capsys, "select", "--data", "data/train", "--out", out, "--resolution", SIZE, "--device", "cpu",
               "--no-progress")[0] == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())["select"]
    assert recorded["data"] == str(world.train)
    # the same command from the same folder is the same run (resumes), not a "different run"
    assert cli(capsys, "select", "--data", "data/train", "--out", out, "--resolution", SIZE, "--device", "cpu",
               "--no-progress")[0] == 0


def test_export_of_a_mini_run_says_no_stable_diffusion_can_load_it(tmp_path, capsys):
    from promptset.artifacts import PromptSet
    from promptset.runfolder import write_classes

    run = tmp_path / "run"
    write_classes(run, ["car", "cat"], ["car", "cat"])
    PromptSet(embeddings=torch.zeros(2, 1, 384), token_names=["<car>", "<cat>"], class_folders=["car", "cat"],
              template="a photo of {token}", backend="mini", model_id="m", model_hash="h", initializers=["car", "cat"],
              stored_dtype="fp32").save(run / "prompts.safetensors")
    code, out, _ = cli(capsys, "export", "--run", run)
    assert code == 0 and "No Stable Diffusion pipeline can load them" in out and "load_textual_inversion" not in out
    assert "384-wide" in json.loads((run / "export" / "tokens.json").read_text())["usable_with"]


def test_progress_to_a_log_is_whole_lines(capsys):
    from promptset.progress import progress_bar

    bar = progress_bar(range(5), desc="work", unit="step")  # stderr is captured: not a terminal
    assert sum(1 for _ in bar) == 5
    err = capsys.readouterr().err
    assert "\r" not in err and err.strip().splitlines() == [err.strip()] and "work: done 5/5 step" in err


def test_batch_rows_rotate_and_match_the_old_grouping_when_it_divides():
    from promptset.stages.invert import _batch_rows

    assert torch.equal(_batch_rows(7, 6, 3), torch.arange(3).repeat(2))  # divisible: each class twice
    seen = torch.cat([_batch_rows(s, 4, 3) for s in range(3)])  # 3 steps of 4 samples over 3 classes
    assert torch.bincount(seen).tolist() == [4, 4, 4]
