"""`promptset run --config R --plan`: the work, FLOPs, bytes and estimated time of a recipe, offline, without weights,
and nothing written. (That its counts equal what a run does is checked in test_recipes.py on every recipe; the
estimated time against a measured run is benchmarks/plan_check.py, in benchmarks/results/plan_check.json.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from promptset.cli import main
from promptset.errors import UserError
from promptset.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
IMAGENET1K = REPO / "recipes" / "imagenet1k-sd15.yaml"


def test_plan_of_imagenet1k_prints_work_bytes_and_hours_offline(tmp_path, monkeypatch, capsys):
    """No data, no model folder, no weights: SD 1.5's shipped configs are counted on the meta device."""
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths (runs/, data/, models/) point at nothing here
    start = time.perf_counter()
    assert main(["run", "--config", str(IMAGENET1K), "--plan", "--plan-device", "h100"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "1,000 classes" in out and "the recipe's dataset: block" in out
    assert "Stable Diffusion 1.5's configs shipped with promptset" in out
    assert "NVIDIA H100 SXM: the generator in bf16 at 40% of 989.4 TFLOP/s" in out
    for stage in ("select", "invert", "generate", "evaluate", "total"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    assert "125 groups of 8 classes x 500 steps x batch 8 = 500,000 UNet forward+backward at 512 px" in out
    assert "13,000 images x 1 candidate(s)" in out  # 1,000 classes x ceil(50 / 4) collages
    assert "stored bytes per IPC" in out and "real images (224 px)" in out
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert elapsed < 60


def test_plan_numbers_are_sd15s_and_scale_with_the_named_device():
    h100 = make_plan(str(IMAGENET1K), sets=[], device="h100")
    a100 = make_plan(str(IMAGENET1K), sets=[], device="a100", utilization=0.2)
    f = h100["flops"]
    # SD 1.5's UNet: about 0.8 TFLOP per 64x64-latent forward; the backward to the prompt about as much again
    assert 0.75e12 < f["unet_forward"] < 0.85e12 and 1.9 < f["unet_forward_backward"] / f["unet_forward"] < 2.3
    assert f["generated_image"] == 25 * 2 * f["unet_forward"] + f["vae_decode"]
    assert h100["total_flops"] == a100["total_flops"]
    # the generator runs at 40% of 989.4 vs 20% of 312 TFLOP/s, the students at 40% of 494.7 vs 20% of 156
    gen = [x for x in h100["lines"] if x["stage"] == "generate" and "VAE" not in x["text"]][0]
    gen_a100 = [x for x in a100["lines"] if x["stage"] == "generate" and "VAE" not in x["text"]][0]
    assert gen_a100["seconds"] / gen["seconds"] == pytest.approx(0.4 * 989.4 / (0.2 * 312.0))
    rows = {(r["protocol"], r["ipc"], r["method"]): r for r in h100["bytes"]["rows"]}
    # P2 d3m stores the prompts (1,000 x 768 fp32), the class list and one int32 seed per collage of every round
    assert rows[("p2", 1, "d3m")]["components"]["prompts"] == 1000 * 768 * 4
    assert rows[("p2", 50, "d3m")]["components"]["seeds"] == 5 * 1000 * 13 * 4
    # P1 adds an fp16 soft label per patch of every round: 5 rounds x 50 patches x 1,000 classes x 1,000 logits x 2 B
    assert rows[("p1", 50, "d3m")]["components"]["soft_labels"] == 5 * 50 * 1000 * 1000 * 2


def test_plan_with_modes_counts_every_prompt_of_every_class(tmp_path, monkeypatch, capsys):
    """`invert.modes: 5` plans five prompts per class: the printed plan says so, invert trains 5x the rows, and
    d3m's prompt bytes are every mode's vector plus its class and weight, exactly what a prompts file stores."""
    import torch

    from promptset.artifacts import PromptSet

    monkeypatch.chdir(tmp_path)
    argv = ["run", "--config", str(IMAGENET1K), "--plan", "--plan-device", "h100", "--set", "invert.modes=5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stored bytes per IPC (d3m's prompts: 5 prompts per class, 5,000 in all)" in out
    assert "625 groups of 8 prompts (--modes 5: 5 prompts per class, 5,000 in all) x 500 steps x batch 8" in out
    one = make_plan(str(IMAGENET1K), sets=[], device="h100")
    five = make_plan(str(IMAGENET1K), sets=["invert.modes=5"], device="h100")
    assert one["prompts"] == {"modes": 1, "total": 1000, "per_class_min": 1, "per_class_max": 1}
    assert five["prompts"] == {"modes": 5, "total": 5000, "per_class_min": 5, "per_class_max": 5}
    assert five["counts"]["invert_samples"] == 5 * one["counts"]["invert_samples"]
    stored = PromptSet(torch.zeros(5000, 1, 768), [f"<t{i}>" for i in range(5000)], [f"c{i}" for i in range(1000)],
                       "a photo of {token}", "sd", "m", "h", mode_class=[i // 5 for i in range(5000)],
                       mode_weight=[15] * 5000).stored_bytes()  # fmt: skip
    rows1, rows5 = ({(r["protocol"], r["ipc"], r["method"]): r for r in p["bytes"]["rows"]} for p in (one, five))
    for key, row in rows5.items():
        if key[2] == "d3m":  # five times the vectors, and each mode's class and weight (two int32)
            assert row["components"]["prompts"] == stored == 5 * 1000 * 768 * 4 + 5000 * 8
            assert row["bytes"] - rows1[key]["bytes"] == stored - 1000 * 768 * 4
        elif "@" not in key[2]:  # random-real@d3m may take a larger IPC under the larger budget
            assert row == rows1[key], key


def test_plan_refuses_what_it_cannot_count(tmp_path, capsys):
    with pytest.raises(UserError, match="--plan-device 'h300': not one of cpu, h100"):
        make_plan(str(IMAGENET1K), device="h300")
    bare = tmp_path / "r.yaml"
    bare.write_text("run: R\npaths: {train: nowhere}\nselect: {data: '${train}'}\ninvert: {model: m}\n")
    assert main(["run", "--config", str(bare), "--plan", "--plan-device", "h100"]) == 2
    err = capsys.readouterr().err
    assert "nowhere is not on this machine" in err and "no 'dataset:' block" in err
    assert main(["run", "--config", str(IMAGENET1K), "--plan-device", "h100"]) == 2
    assert "--plan-device is a --plan option" in capsys.readouterr().err


def test_plan_times_calls_on_the_device_at_hand_when_the_model_folder_is_here(tiny_sd, tmp_path, one_thread):
    """With the model folder here and cheap calls, the generator's, teacher's and students' calls are timed on this
    CPU (the estimate benchmarks/plan_check.py compares with a measured run) and the model's load is counted."""
    from test_pipeline import write_toy_data
    from test_recipes import scale_down

    data = write_toy_data(tmp_path / "data")
    sets = scale_down(data, tiny_sd, tmp_path / "out")[1::2]
    plan = make_plan(str(REPO / "recipes" / "cifar10-sd15.yaml"), sets=sets, device="cpu")
    assert "cpu" in plan["timing"] and "measured here" in plan["timing"]
    assert any(n.startswith(f"generator times: measured on {tiny_sd}") for n in plan["notes"])
    by_text = {x["text"]: x for x in plan["lines"]}
    assert {x["stage"] for x in plan["lines"] if x["text"] == "load the generator"} == {"invert", "generate"}
    assert all(x["measured"] and x["seconds"] > 0 for x in plan["lines"]), [t for t, x in by_text.items()
                                                                            if not x["measured"]]
    assert not (tmp_path / "out").exists()
