"""`recipes/`: every recipe of the paper's settings runs end to end (teacher, select, invert, generate, budget,
evaluate under P1 and P2 with every method, report) on a tiny random Stable Diffusion and a tiny ImageFolder, with
only its paths and its counts overridden through `--set`, so none of them rots. Also the recipe mechanism itself:
`paths:` variables, `--set`, list sections and the teacher step's two forms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_pipeline import write_toy_data

from promptset.cli import main
from promptset.pipeline import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
PAPER_SETTINGS = ["cifar10-sd15", "cifar100-sd15", "tinyimagenet-convnet4-sd15", "tinyimagenet-resnet18-sd15",
                  "imagenet100-sd15", "imagenet1k-sd15"]
STEPPED = ("teacher", "select", "invert", "generate", "evaluate")  # sections whose stage has device and progress


def scale_down(data: Path, model: Path, out: Path) -> list[str]:
    """The `--set` flags that point a recipe at the tiny data and model and cut every count to the minimum."""
    sets = {"paths.train": data, "paths.test": data, "paths.model": model,
            "paths.teacher": out / "teacher.safetensors", "run": out / "run",
            "teacher.epochs": 1, "teacher.image_size": 16, "select.resolution": 16, "invert.steps": 1,
            "invert.resolution": 16, "invert.batch_size": 3, "generate.ipc": 1, "generate.steps": 1,
            "evaluate.ipc": 1, "evaluate.epochs": 1, "evaluate.seeds": 1, "evaluate.regen_every": 1}
    sets |= {f"{s}.device": "cpu" for s in STEPPED} | {f"{s}.progress": "false" for s in STEPPED}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_data(tmp_path_factory.mktemp("recipe-data") / "data")


def test_the_paper_settings_are_all_there():
    assert {p.stem for p in RECIPES} >= set(PAPER_SETTINGS)


@pytest.mark.parametrize("name", PAPER_SETTINGS)
def test_recipe_runs_end_to_end_on_a_tiny_model(name, tiny_sd, toy_data, tmp_path, one_thread):
    recipe = REPO / "recipes" / f"{name}.yaml"
    text = yaml.safe_load(recipe.read_text())
    assert [s for s in STAGE_ORDER if s in text] == STAGE_ORDER  # every stage, the teacher step included
    out = tmp_path / name
    assert main(["run", "--config", str(recipe), *scale_down(toy_data, tiny_sd, out)]) == 0

    run = out / "run"
    assert (out / "teacher.safetensors").is_file()
    for f in ("classes.json", "select.json", "prompts.safetensors", "labels.safetensors", "budget.json",
              "eval/results.json", "report.md"):
        assert (run / f).is_file(), f
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    # what the recipe chose and the test did not override reached the stages
    for stage in ("select", "invert", "generate"):
        for key, value in text[stage].items():
            if isinstance(value, (int, float, bool)) and key not in ("resolution", "steps", "batch_size", "ipc"):
                assert resolved[stage][key] == value, (stage, key)
    assert resolved["invert"]["model"] == str(tiny_sd.resolve())  # paths.model reached invert through ${model}
    entries = json.loads((run / "eval" / "results.json").read_text())["entries"].values()
    sections = text["evaluate"]
    methods = {m.strip() for m in sections[0]["method"].split(",")}
    protocols = {s["protocol"] for s in sections}
    assert protocols == {"p1", "p2"}
    assert {(e["method"], e["protocol"]) for e in entries} == {(m, p) for m in methods for p in protocols}
    assert {e["student"] for e in entries} == {sections[0]["student"]}


def test_paths_are_variables_and_set_overrides_them(tmp_path, capsys):
    """`--set paths.NAME=` changes every `${NAME}`; an unknown variable, path or section is refused up front with
    the file or flag named, exit code 2, and nothing written."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "paths": {"train": str(tmp_path / "missing"), "teacher": ""},
        "run": str(tmp_path / "run"),
        "select": {"data": "${train}", "teacher": "none"},
    }))
    code = main(["run", "--config", str(recipe)])
    assert code == 2 and f"[select] data: {tmp_path / 'missing'} is not a folder" in capsys.readouterr().err
    code = main(["run", "--config", str(recipe), "--set", "paths.trian=x"])
    assert code == 2 and "has no paths.trian; its paths are: teacher, train" in capsys.readouterr().err
    code = main(["run", "--config", str(recipe), "--set", "invert.steps=3"])
    assert code == 2 and "has no 'invert:' section" in capsys.readouterr().err
    code = main(["run", "--config", str(recipe), "--set", "select.num_crop=3"])
    assert code == 2 and "unknown option 'num_crop'; did you mean 'num_crops'?" in capsys.readouterr().err
    code = main(["run", "--config", str(recipe), "--set", "select.teacher=${teacher}"])
    assert code == 2 and "paths.teacher is empty; set it in the file or pass --set paths.teacher=PATH" in \
        capsys.readouterr().err
    code = main(["run", "--config", str(recipe), "--set", "select.teacher=${teachr}"])
    assert code == 2 and "${teachr} is not defined under 'paths:'" in capsys.readouterr().err
    code = main(["run", "--config", str(recipe), "--set", "steps=3"])
    assert code == 2 and "SECTION.OPTION=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_list_section_runs_once_per_item_and_set_reaches_every_item(tmp_path):
    from promptset.pipeline import resolved_sections
    from promptset.runconfig import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("paths: {test: T}\nrun: R\nevaluate:\n  - &a {protocol: p1, test: '${test}', epochs: 5}\n"
                      "  - {<<: *a, protocol: p2}\n")
    loaded = load_recipe(str(recipe), ["evaluate.epochs=2", "paths.test=/data/test"], STAGE_ORDER)
    runs = resolved_sections(loaded, str(recipe), None)
    assert [(n, c.protocol, c.epochs, c.test, c.run) for n, c, _ in runs] == [
        ("evaluate", "p1", 2, "/data/test", "R"), ("evaluate", "p2", 2, "/data/test", "R")]


def test_teacher_step_trains_a_bare_path_once_and_uses_a_named_teacher_as_given(toy_data, tmp_path, capsys):
    """A bare PATH is trained when missing and reused when it exists with the same options; NAME@SIZE:PATH is an
    existing teacher, never trained (a missing one refused); a file promptset did not write must be named."""
    from safetensors.torch import save_file

    from promptset.models import create_student

    teacher = tmp_path / "t.safetensors"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"paths": {"teacher": str(teacher), "train": str(toy_data)}, "teacher": {
        "data": "${train}", "out": "${teacher}", "arch": "convnet_tiny", "image_size": 8, "epochs": 1,
        "progress": False, "device": "cpu"}}))
    assert main(["run", "--config", str(recipe)]) == 0
    stamp = teacher.stat().st_mtime_ns
    assert main(["run", "--config", str(recipe)]) == 0
    assert teacher.stat().st_mtime_ns == stamp and "already trained with these options" in capsys.readouterr().out

    assert main(["run", "--config", str(recipe), "--set", f"paths.teacher=convnet_tiny@8:{teacher}"]) == 0
    assert "using convnet_tiny@8:" in capsys.readouterr().out and teacher.stat().st_mtime_ns == stamp
    missing = tmp_path / "none.safetensors"
    assert main(["run", "--config", str(recipe), "--set", f"paths.teacher=resnet18@224:{missing}"]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err and not missing.exists()

    foreign = tmp_path / "foreign.safetensors"
    save_file(create_student("convnet_tiny", 3, 8).state_dict(), str(foreign))
    assert main(["run", "--config", str(recipe), "--set", f"paths.teacher={foreign}"]) == 2
    assert f"NAME@SIZE:{foreign}" in capsys.readouterr().err
