"""`promptset run --config`: every stage from one YAML file; and the precedence defaults < YAML < flags."""

from __future__ import annotations

import json

import yaml
from test_pipeline import write_toy_data

from promptset.cli import main


def test_run_config_runs_every_named_stage(tiny_sd, tmp_path):
    data = write_toy_data(tmp_path / "data")
    run = tmp_path / "run"
    config = {
        "run": str(run),
        "select": {"data": str(data), "teacher": "none", "resolution": 16, "progress": False},
        "invert": {"backend": "sd", "model": str(tiny_sd), "steps": 4, "batch_size": 3, "resolution": 16,
                   "device": "cpu", "progress": False},
        "generate": {"ipc": 2, "steps": 2, "device": "cpu", "progress": False},
        "budget": {},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0
    for name in ("classes.json", "select.json", "prompts.safetensors", "labels.safetensors", "budget.json"):
        assert (run / name).is_file(), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["invert"]["steps"] == 4 and resolved["select"]["resolution"] == 16
    assert json.loads((run / "budget.json").read_text())["num_classes"] == 3


def test_flags_override_yaml_which_overrides_defaults(tiny_sd, tmp_path):
    data = write_toy_data(tmp_path / "data")
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump({"select": {"num_crops": 3, "resolution": 16, "seed": 7}}))
    run = tmp_path / "run"
    argv = ["select", "--config", str(path), "--data", str(data), "--out", str(run), "--seed", "9", "--no-progress"]
    assert main(argv) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())["select"]
    assert resolved["num_crops"] == 3  # from the file
    assert resolved["seed"] == 9  # the flag wins over the file
    assert resolved["factor"] == 1  # the default


def test_unknown_yaml_option_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"select": {"num_crop": 3}}))
    assert main(["select", "--config", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "num_crop" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_gradient_checkpointing_gives_the_same_prompts(tiny_sd, tmp_path):
    from test_pipeline import SIZE, invert_config

    from promptset.artifacts import PromptSet
    from promptset.stages.invert import invert

    data = write_toy_data(tmp_path / "data")
    prompts = {}
    for gc in (False, True):
        run = tmp_path / f"run-gc{int(gc)}"
        invert(invert_config(run, tiny_sd, data=str(data), steps=6, gradient_checkpointing=gc, resolution=SIZE))
        prompts[gc] = PromptSet.load(run / "prompts.safetensors").embeddings
    assert (prompts[False] - prompts[True]).abs().max() < 1e-5
