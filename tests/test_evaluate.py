"""Tests for `promptset evaluate`: protocols P1-P3, fresh variations, stored bytes, class checks, real learning.

One module fixture builds a tiny random Stable Diffusion, a 3-colour toy ImageFolder (16 px) and a run through
select / invert / generate; a `convnet_tiny` trained for a few steps on the toy data is the teacher.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers import fit_full_batch
from PIL import Image
from safetensors.torch import load_file, save_file

import promptset
from promptset.artifacts import PromptSet, load_tensors
from promptset.data import load_class_images, scan_image_folder
from promptset.errors import UserError
from promptset.evaluation.augment import crop_flip_params, warp
from promptset.evaluation.methods import build_generative
from promptset.evaluation.student import Recipe, TrainSet, train_student
from promptset.models import create_student
from promptset.stages.evaluate import EvaluateConfig, _context, _validate, evaluate

COLOURS = {"blue": (40, 50, 210), "green": (40, 190, 60), "red": (210, 40, 40)}
SIZE = 16
IPC = 2

ENTRY_FIELDS = {
    "key",
    "method",
    "protocol",
    "student",
    "ipc",
    "num_classes",
    "image_size",
    "train_samples",
    "epochs",
    "seeds",
    "final_top1",
    "best_top1",
    "optimizer_steps",
    "stored_bytes",
    "stored_components",
    "png_bytes",
    "ipc_equivalent",
    "distilled",
    "teacher",
    "recipe",
    "split_hash",
    "versions",
    "device",
    "wall_time_s",
    "finished_at",
}


def _make_split(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.asarray(colour)[None, None] + rng.normal(0, 35, (SIZE, SIZE, 3))  # (H, W, 3)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def _train_teacher(train: Path, path: Path, num_classes: int = 3) -> str:
    index = scan_image_folder(train)
    x = torch.cat([load_class_images(index, c, SIZE) for c in range(index.num_classes)])  # (N, 3, 16, 16)
    y = torch.arange(index.num_classes).repeat_interleave(len(x) // index.num_classes)
    torch.manual_seed(0)
    model = create_student("convnet_tiny", num_classes, SIZE)
    fit_full_batch(model, x, y, steps=25, lr=1e-2)
    save_file(model.state_dict(), str(path))
    return f"convnet_tiny:{path}"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from promptset.backends.tiny import build_sd

    root = tmp_path_factory.mktemp("evaluate")
    train = _make_split(root / "data" / "train", 10, seed=0)
    test = _make_split(root / "data" / "test", 10, seed=1)
    teacher = _train_teacher(train, root / "teacher.safetensors")
    sd = build_sd(root / "sd")
    run = root / "run"
    promptset.select(data=str(train), out=str(run), resolution=SIZE, device="cpu", progress=False)
    promptset.invert(
        out=str(run), backend="sd", model=str(sd), steps=2, batch_size=6, resolution=SIZE, device="cpu", progress=False
    )
    promptset.generate(run=str(run), ipc=IPC, steps=2, device="cpu", soft_labels=True, teacher=teacher,
                       candidates=1, progress=False)  # seed selection is tested in test_stored_set
    return SimpleNamespace(root=root, train=train, test=test, teacher=teacher, run=run)


def _cfg(world, **kw) -> EvaluateConfig:
    args = dict(run=str(world.run), test=str(world.test), student="convnet_tiny", epochs=1, ipc=IPC,
                teacher=world.teacher, regen_every=0, device="cpu", progress=False)  # fmt: skip
    return EvaluateConfig(**(args | kw))


def _eval(world, **kw) -> dict:
    args = dict(
        run=str(world.run),
        test=str(world.test),
        student="convnet_tiny",
        epochs=2,
        seeds=2,
        ipc=IPC,
        teacher=world.teacher,
        gen_steps=2,
        device="cpu",
        progress=False,
        report=False,
    )
    args.update(kw)
    return evaluate(EvaluateConfig(**args))


@pytest.mark.parametrize("protocol", ["p1", "p2", "p3"])
def test_results_have_every_field_per_protocol(world, protocol):
    results = _eval(world, protocol=protocol, method="d3m,rded", regen_every=1)
    saved = json.loads((world.run / "eval" / "results.json").read_text())
    assert saved["entries"].keys() == results["entries"].keys()
    for method in ("d3m", "rded"):
        key = f"{method}/{protocol}/convnet_tiny/ipc{IPC}" + ("/regen1/mixed" if method == "d3m" else "")
        e = saved["entries"][key]
        assert ENTRY_FIELDS <= e.keys(), ENTRY_FIELDS - e.keys()
        assert (e["method"], e["protocol"], e["ipc"], e["seeds"]) == (method, protocol, IPC, [0, 1])
        for acc in (e["final_top1"], e["best_top1"]):
            assert len(acc["per_seed"]) == 2 and 0 <= acc["mean"] <= 100 and acc["std"] >= 0
        assert e["best_top1"]["mean"] >= e["final_top1"]["mean"]
        assert e["ipc_equivalent"] == pytest.approx(e["stored_bytes"] / (3 * SIZE * SIZE * 3))
        assert e["stored_bytes"] == sum(e["stored_components"].values())
        assert len(e["split_hash"]["train"]) == 64 and len(e["split_hash"]["test"]) == 64
        assert {"torch", "diffusers", "transformers", "promptset"} <= e["versions"].keys()
        assert e["device"].startswith("cpu (") and len(e["device"]) > len("cpu ()")  # the processor's model
        assert e["recipe"]["config"]["protocol"] == protocol and e["recipe"]["epochs"] == 2
        assert e["recipe"]["targets"] == {"p1": "stored-soft", "p2": "one-hot", "p3": "online-teacher"}[protocol]
        assert (e["recipe"]["augment"] is None) == (protocol == "p1")
    assert saved["entries"][f"rded/{protocol}/convnet_tiny/ipc{IPC}"]["png_bytes"] > 0
    rows = [json.loads(line) for line in (world.run / "eval" / "metrics.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["protocol"] == protocol]
    assert {(r["method"], r["seed"], r["epoch"]) for r in mine} >= {
        (m, s, ep) for m in ("d3m", "rded") for s in (0, 1) for ep in (1, 2)
    }
    assert all(r["test_top1"] is not None and np.isfinite(r["loss"]) for r in mine)


@pytest.fixture(scope="module")
def variations(world) -> dict:
    """d3m under P1 on a fixed set and with new images every epoch, and under P2 (one-hot), 3 epochs each."""
    common = dict(method="d3m", epochs=3, seeds=1, batch_size=4)
    out = {}
    for name, kw in {
        "fixed": dict(protocol="p1", regen_every=0),
        "fresh": dict(protocol="p1", regen_every=1),
        "onehot": dict(protocol="p2", regen_every=0),
    }.items():
        results = _eval(world, **common, **kw)
        key = f"d3m/{kw['protocol']}/convnet_tiny/ipc{IPC}/" + ("fixed" if kw["regen_every"] == 0 else "regen1/mixed")
        out[name] = results["entries"][key]
    return out


def test_fresh_variations_keep_the_step_count(variations):
    fixed, fresh = variations["fixed"], variations["fresh"]
    assert fixed["distilled"]["rounds"] == 1 and fresh["distilled"]["rounds"] == 3
    steps_per_epoch = -(-3 * IPC // 4)  # ceil(N / B), N = C * ipc = 6, B = 4
    assert fixed["optimizer_steps"] == fresh["optimizer_steps"] == 3 * steps_per_epoch


def test_soft_labels_count_in_the_budget_once_per_round(world, variations):
    fixed, fresh, onehot = variations["fixed"], variations["fresh"], variations["onehot"]
    assert "soft_labels" not in onehot["stored_components"]
    assert fixed["stored_bytes"] > onehot["stored_bytes"]
    assert fresh["stored_bytes"] > fixed["stored_bytes"]
    per_round = 3 * IPC * 3 * 2  # C * ipc samples x C logits x fp16
    assert fixed["stored_components"]["soft_labels"] == per_round
    assert fresh["stored_components"]["soft_labels"] == 3 * per_round
    assert fresh["stored_components"]["seeds"] == 3 * fixed["stored_components"]["seeds"] == 3 * (3 * IPC * 4)
    labels = load_file(str(world.run / fresh["distilled"]["labels_file"]))  # what the run stores, as counted
    assert labels["soft_labels"].shape == (3, 3 * IPC, 3) and labels["soft_labels"].dtype == torch.float16
    assert labels["seeds"].shape == (3, 3 * IPC)
    assert len(set(labels["seeds"].flatten().tolist())) == labels["seeds"].numel()  # new seeds every round


def test_round0_reuses_generate_outputs_exactly(world):
    cfg = _cfg(world)
    reused = build_generative(_context(cfg, ["d3m"]), "d3m")
    cfg.resolution = SIZE  # the resolution generate used, given explicitly: the same settings, still reused
    assert build_generative(_context(cfg, ["d3m"]), "d3m").info["round0_reused_generated"]
    hidden = world.root / "generated.hidden"  # without generate's images, round 0 is generated here
    (world.run / "generated").rename(hidden)
    try:
        fresh = build_generative(_context(cfg, ["d3m"]), "d3m")
    finally:
        hidden.rename(world.run / "generated")
    assert reused.info["round0_reused_generated"] and not fresh.info["round0_reused_generated"]
    assert torch.equal(reused.rounds[0].images, fresh.rounds[0].images)
    assert torch.equal(reused.rounds[0].logits, fresh.rounds[0].logits)
    assert reused.info["generation"]["sampler_batch"] == 8  # generate's default, read from labels.safetensors
    cfg.resolution, cfg.sampler_batch = 0, 3  # another sampler batch changes the last bits: generated/ is not reused
    other = build_generative(_context(cfg, ["d3m"]), "d3m")
    assert not other.info["round0_reused_generated"] and other.info["generation"]["sampler_batch"] == 3
    cfg.sampler_batch = -1
    with pytest.raises(UserError, match="--sampler-batch must not be negative"):
        _validate(cfg)


def test_test_folder_with_other_classes_is_refused(world, capsys):
    other = world.root / "test_other"
    shutil.copytree(world.test, other)
    (other / "blue").rename(other / "cyan")
    with pytest.raises(UserError, match=r"missing \['blue'\].*not in classes.json \['cyan'\]"):
        _eval(world, test=str(other), protocol="p2", method="rded")
    from promptset.cli import main

    code = main(
        [
            "evaluate",
            "--run",
            str(world.run),
            "--test",
            str(other),
            "--student",
            "convnet_tiny",
            "--protocol",
            "p2",
            "--method",
            "rded",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 2 and "cyan" in capsys.readouterr().err


def test_teacher_with_other_classes_is_refused(world):
    four = _train_teacher(world.train, world.root / "teacher4.safetensors", num_classes=4)
    with pytest.raises(UserError, match=r"predicts 4 classes but classes.json lists 3 \(blue, green, red\)"):
        _eval(world, teacher=four, protocol="p1", method="rded")


def test_p1_without_teacher_is_refused(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.run, run, ignore=shutil.ignore_patterns("eval", "labels.safetensors"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["generate"]["teacher"] = ""  # no teacher recorded anywhere in the run
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="needs a teacher"):
        _eval(world, run=str(run), teacher="", protocol="p1", method="rded")


def test_student_learns_real_colours(world):
    results = _eval(
        world,
        method="full,random-real",
        protocol="p2",
        epochs=10,
        seeds=1,
        batch_size=8,
        lr=3e-3,
        ipc=5,
        train=str(world.train),
    )
    full = results["entries"]["full/p2/convnet_tiny/ipcall"]
    assert full["final_top1"]["mean"] > 80  # chance is 33%
    assert full["train_samples"] == 30 and full["stored_components"] == {"images_raw": 30 * SIZE * SIZE * 3}
    real = results["entries"]["random-real/p2/convnet_tiny/ipc5"]
    assert real["train_samples"] == 15 and real["ipc_equivalent"] == pytest.approx(5.0)
    assert real["final_top1"]["mean"] > 60


def _recipe(**kw) -> Recipe:
    args = dict(
        epochs=3,
        batch_size=4,
        optimizer="adamw",
        lr=1e-3,
        momentum=0.9,
        weight_decay=0.01,
        schedule="cosine",
        targets="one-hot",
        temperature=None,
        augment=None,
        regen_every=0,
        eval_every=1,
        eval_batch_size=64,
        channels_last=False,
        compile=False,
        amp=False,
    )
    args.update(kw)
    return Recipe(**args)


def test_training_is_deterministic_on_cpu():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    data = TrainSet(images, torch.arange(3).repeat_interleave(4), torch.randn(12, 3, generator=g))
    teacher = create_student("convnet_tiny", 3, SIZE).eval().requires_grad_(False)
    aug = {"random_resized_crop_min_scale": 0.5, "flip": True, "cutmix_beta": 1.0}
    histories = []
    for _ in range(2):
        torch.manual_seed(1)
        model = create_student("convnet_tiny", 3, SIZE)
        out = train_student(
            model,
            [data, data],
            data,
            _recipe(targets="online-teacher", temperature=20.0, augment=aug, regen_every=2),
            seed=3,
            teacher=teacher,
            progress=False,
        )
        histories.append(out["history"])
    assert histories[0] == histories[1]
    assert out["optimizer_steps"] == 9


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_foreach_optimizers_step_exactly_as_the_per_parameter_loop(optimizer):
    """make_optimizer's multi-tensor (foreach) updates give bit for bit the weights of torch's per-parameter loop."""
    from promptset.evaluation.student import make_optimizer, param_groups

    recipe = _recipe(optimizer=optimizer)
    weights = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = create_student("convnet_tiny", 3, SIZE)
        opt = make_optimizer(model, recipe)
        if not foreach:
            groups = param_groups(model, recipe.weight_decay)
            if optimizer == "sgd":
                opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, foreach=False)
            elif optimizer == "adam":
                opt = torch.optim.Adam(groups, lr=recipe.lr, foreach=False)
            else:
                opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999), foreach=False)
        assert all(g.get("foreach") is foreach for g in opt.param_groups)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.rand(6, 3, SIZE, SIZE, generator=g)
            loss = torch.nn.functional.cross_entropy(model(x), torch.arange(6) % 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def random_resized_crop_flip(x, g, min_scale, flip):
    return warp(x, crop_flip_params(len(x), g, min_scale, flip))


def test_crop_and_flip_geometry():
    x = torch.rand(4, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(random_resized_crop_flip(x, g, 1.0, False), x, atol=1e-6)
    flipped = random_resized_crop_flip(x, g, 1.0, True)
    for a, b in zip(flipped, x):
        assert torch.allclose(a, b, atol=1e-6) or torch.allclose(a, b.flip(-1), atol=1e-6)
    cropped = random_resized_crop_flip(x, g, 0.3, True)
    assert cropped.shape == x.shape and cropped.min() >= 0 and cropped.max() <= 1


def test_report_writes_table_csv_and_plot(world, tmp_path):
    _eval(world, protocol="p2", method="rded", seeds=1)
    from promptset.stages.report import report

    path = report(runs=str(world.run), out=str(tmp_path))
    text = path.read_text()
    assert path == tmp_path / "report.md" and "| rded | p2 | convnet_tiny | 2 |" in text
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert rows[0].startswith("run,method,protocol") and len(rows) >= 2
    png = tmp_path / "accuracy_vs_bytes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()


def test_plot_draws_fixed_sets_and_fresh_rounds_as_separate_lines():
    from promptset.evaluation.results import plot_series

    def row(method, protocol, ipc, variations, nbytes):
        return {"method": method, "protocol": protocol, "ipc": ipc, "variations": variations, "stored_bytes": nbytes}

    rows = [row("d3m", "p1", 1, "fixed", 100), row("d3m", "p1", 10, "fixed", 200),
            row("d3m", "p1", 10, "10 rounds", 900), row("d3m", "p1", 1, "10 rounds", 300),
            row("rded", "p1", 10, "-", 5000), row("rded", "p2", 10, "-", 4000)]
    series = {label: (kind, [r["ipc"] for r in mine]) for label, _, kind, mine in plot_series(rows)}
    assert series == {
        "d3m (p1), fixed": ("fixed", [1, 10]),
        "d3m (p1), 10 rounds": ("10 rounds", [1, 10]),  # sorted by bytes, never zigzagging between the two kinds
        "rded (p1)": ("-", [10]),
        "rded (p2)": ("-", [10]),
    }


def _overlaps(boxes) -> list[tuple[int, int]]:
    return [(i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes[:i])
            if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1]  # fmt: skip


def test_plot_labels_of_methods_at_the_same_bytes_do_not_collide():
    """Three methods at one budget (two with the same accuracy) and a fourth nearby: every IPC label gets its own
    place, in its line's colour, measured by matplotlib's renderer on the finished figure."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    from promptset.evaluation.results import place_labels, plot_figure

    def row(method, ipc, nbytes, top1):
        return {"method": method, "protocol": "p2", "ipc": ipc, "variations": "-", "stored_bytes": nbytes,
                "final_top1_mean": top1, "final_top1_std": 1.0, "num_classes": 10, "student": "convnet",
                "epochs": 5, "seeds": 3}  # fmt: skip

    rows = [row("d3m", 10, 30000, 41.0), row("class-prompt", 10, 30000, 41.0), row("rded", 1, 30000, 41.4),
            row("random-real", 1, 31000, 40.8), row("d3m", 50, 90000, 47.0)]
    fig = plot_figure(rows, "labels")
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().startswith("IPC")]
    assert len(labels) == len(rows)
    assert len({tuple(t.get_color()) for t in labels}) == 4  # each label in its line's colour: 4 methods
    assert _overlaps([t.get_window_extent(renderer) for t in labels]) == []
    plt.close(fig)

    # the placement itself: two labels at one point are stacked; the old fixed offset put one on the other
    sizes = [(30.0, 8.0)] * 3
    anchors = [(100.0, 50.0), (100.0, 50.0), (101.0, 52.0)]
    for offsets, apart in ((place_labels(anchors, sizes), True), ([(4.0, 4.0)] * 3, False)):
        boxes = [Bbox.from_bounds(x + dx, y + dy, w, h) for (x, y), (dx, dy), (w, h) in zip(anchors, offsets, sizes)]
        assert (_overlaps(boxes) == []) == apart
    assert place_labels(anchors, sizes)[0] == (4.0, 4.0)  # a lone label keeps its place up and right


def test_cli_has_the_evaluate_and_report_flags():
    from promptset.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    evaluate_flags = {s for a in sub["evaluate"]._actions for s in a.option_strings}
    assert {
        "--run",
        "--test",
        "--student",
        "--protocol",
        "--epochs",
        "--seeds",
        "--batch-size",
        "--lr",
        "--teacher",
        "--method",
        "--ipc",
        "--train",
        "--regen-every",
        "--temperature",
        "--device",
        "--compile",
    } <= evaluate_flags
    assert {"--runs", "--out"} <= {s for a in sub["report"]._actions for s in a.option_strings}


def test_round0_reuse_follows_generation_settings_not_file_times(world, tmp_path):
    """generate's PNGs serve round 0 only when the settings generate recorded match; file times do not count."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run, ignore=shutil.ignore_patterns("eval"))  # copy2: file times kept
    cfg = _cfg(world, run=str(run))
    assert build_generative(_context(cfg, ["d3m"]), "d3m").info["round0_reused_generated"]
    recorded = json.loads(load_tensors(run / "labels.safetensors")[1]["generation"])
    assert recorded["dtype"] == "fp32" and recorded["sampler"] == "ddim" and "compile" not in recorded

    prompts = PromptSet.load(run / "prompts.safetensors")  # prompts learned again after generate ...
    prompts.embeddings = prompts.embeddings + 0.5
    prompts.save(run / "prompts.safetensors")
    old = (run / "labels.safetensors").stat().st_mtime - 3600  # ... but with an older file time (cp -p, rsync -t)
    os.utime(run / "prompts.safetensors", (old, old))
    assert not build_generative(_context(cfg, ["d3m"]), "d3m").info["round0_reused_generated"]


def test_budget_invariant_is_a_real_check(world, monkeypatch):
    """Planned and stored bytes must agree even under `python -O` (no assert)."""
    import promptset.evaluation.methods as methods

    ctx = _context(_cfg(world), ["d3m"])
    planned = methods.plan_generative
    monkeypatch.setattr(methods, "plan_generative", lambda ctx, m: planned(ctx, m) | {"seeds": 1})
    with pytest.raises(RuntimeError, match="stored bytes differ from the planned budget"):
        build_generative(ctx, "d3m")


def test_guidance_zero_can_be_asked_for(world):
    from promptset.cli import build_parser

    assert _context(_cfg(world, guidance=0.0), ["d3m"]).gen["guidance"] == 0.0
    assert _context(_cfg(world), ["d3m"]).gen["guidance"] == 7.5  # unset: what generate used
    assert build_parser().parse_args(["evaluate", "--guidance", "0"]).guidance == 0.0
    with pytest.raises(UserError, match="--guidance -1.0 must not be negative"):
        _validate(_cfg(world, guidance=-1.0))


def test_real_split_cache_is_bounded(world):
    from promptset.evaluation import methods
    from promptset.runfolder import require_classes

    classes = require_classes(world.run)
    first = methods.load_real_folder(world.test, 8, "--test", classes, progress=False)
    assert methods.load_real_folder(world.test, 8, "--test", classes, progress=False) is first  # cached
    for size in range(9, 9 + methods.REAL_CACHE_SIZE + 2):
        methods.load_real_folder(world.test, size, "--test", classes, progress=False)
    assert len(methods._FOLDERS) == methods.REAL_CACHE_SIZE
    assert methods.load_real_folder(world.test, 8, "--test", classes, progress=False) is not first  # evicted


def test_generated_rounds_are_cached_on_disk_keyed_by_what_changes_a_pixel(world, tmp_path, monkeypatch):
    """A second evaluate (a new process: the in-memory rounds cleared) takes every fresh round from <run>/eval/rounds/
    without loading the generator, bit for bit; IPC 1 reuses IPC 2's images; other settings generate anew."""
    from promptset.evaluation import methods

    run = tmp_path / "run"
    shutil.copytree(world.run, run, ignore=shutil.ignore_patterns("eval"))
    cfg = _cfg(world, run=str(run), regen_every=1, epochs=3, gen_steps=2)  # 3 rounds; round 0 is generate's
    first = build_generative(_context(cfg, ["d3m"]), "d3m")
    assert first.info["round_cache"] == {"generated": 2 * 3 * IPC, "reused": 0}
    assert len(list((run / "eval" / "rounds").glob("*.safetensors"))) == 2  # one file per fresh round's key
    methods._ROUNDS.clear()

    def no_model(*args, **kwargs):
        raise AssertionError("the generator was loaded although every round was cached")

    monkeypatch.setattr("promptset.backends.create_backend", no_model)
    again = build_generative(_context(cfg, ["d3m"]), "d3m")
    assert again.info["round_cache"] == {"generated": 0, "reused": 2 * 3 * IPC}
    for a, b in zip(first.rounds, again.rounds):
        assert torch.equal(a.images, b.images) and torch.equal(a.logits, b.logits)
    methods._ROUNDS.clear()
    ctx = _context(cfg, ["d3m"])
    ctx.ipc = 1  # as evaluate sets it for each --ipc value
    one = build_generative(ctx, "d3m")
    assert one.info["round_cache"]["generated"] == 0
    assert torch.equal(one.rounds[1].images, first.rounds[1].images.view(3, IPC, 3, SIZE, SIZE)[:, 0])
    monkeypatch.undo()
    methods._ROUNDS.clear()
    other = build_generative(_context(_cfg(world, run=str(run), regen_every=1, epochs=3, gen_steps=3), ["d3m"]), "d3m")
    assert other.info["round_cache"]["generated"] == 3 * 3 * IPC  # other denoising steps: other pixels (round 0 too)
    assert not torch.equal(other.rounds[1].images, first.rounds[1].images)
    methods._ROUNDS.clear()
    off = build_generative(_context(_cfg(world, run=str(run), regen_every=1, epochs=3, gen_steps=2,
                                         round_cache=False), ["d3m"]), "d3m")  # fmt: skip
    assert "round_cache" not in off.info and torch.equal(off.rounds[2].images, first.rounds[2].images)


def test_rounds_denoised_together_equal_rounds_denoised_one_by_one(world, tmp_path, monkeypatch):
    """Fresh rounds are denoised as one job list (one padded tail per group of rounds, not one per round); the
    images and chosen seeds are bit for bit those of rounds denoised one at a time, and fewer images are denoised."""
    from promptset.backends import base
    from promptset.evaluation import methods, rounds

    run = tmp_path / "run"
    shutil.copytree(world.run, run, ignore=shutil.ignore_patterns("eval"))
    denoised = []
    sample = base.DiffusionBackend.sample

    def counting(self, cond, *args, **kwargs):
        denoised.append(len(cond))
        return sample(self, cond, *args, **kwargs)

    monkeypatch.setattr(base.DiffusionBackend, "sample", counting)
    cfg = _cfg(world, run=str(run), regen_every=1, epochs=4, gen_steps=2, round_cache=False, sampler_batch=4)
    together = build_generative(_context(cfg, ["d3m"]), "d3m")  # 4 rounds x 3 classes x IPC jobs in one list
    assert not together.info["round0_reused_generated"]  # another sampler batch than generate's: round 0 too
    n_together = sum(denoised)
    methods._ROUNDS.clear()
    denoised.clear()
    monkeypatch.setattr(rounds, "GROUP_IMAGES", 1)  # every round its own group
    alone = build_generative(_context(cfg, ["d3m"]), "d3m")
    methods._ROUNDS.clear()
    assert n_together == -(-4 * 3 * IPC // 4) * 4 < sum(denoised) == 4 * (-(-3 * IPC // 4) * 4)
    for a, b in zip(together.rounds, alone.rounds):
        assert torch.equal(a.images, b.images) and torch.equal(a.logits, b.logits)
    assert together.info["labels_file"] == alone.info["labels_file"]
    assert rounds.job_step(32, 64, 4) == 32 and rounds.job_step(32, 64, 1) == 64 and rounds.job_step(5, 8, 3) == 8


def test_round_cache_keeps_images_another_process_stored_meanwhile(tmp_path):
    """Two evaluate calls on one run (P1 and P2 side by side): each one's store merges the file the other wrote
    since it was read, instead of overwriting it."""
    from promptset.backends.sampling import Job
    from promptset.evaluation.round_cache import RoundCache

    key = {"stage": "eval-round1", "steps": 2}
    a, b = RoundCache(tmp_path, key), RoundCache(tmp_path, key)  # both read the (absent) file first
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(1, 2, 3, 4, 4)
    a.add([Job(0, 0, 11)], [Job(0, 0, 11)], img)
    b.add([Job(1, 0, 12)], [Job(1, 0, 99)], img + 1)  # B never saw A's image
    c = RoundCache(tmp_path, key)
    assert c.missing([Job(0, 0, 11), Job(1, 0, 12)]) == []
    patches, jobs = c.get([Job(0, 0, 11), Job(1, 0, 12)])
    assert torch.equal(patches, torch.cat([img, img + 1])) and [j.seed for j in jobs] == [11, 99]
    assert RoundCache(tmp_path, {**key, "steps": 3}).missing([Job(0, 0, 11)]) != []  # another key: its own file


def test_mixed_round_order_walks_through_every_image_of_every_round():
    from promptset.evaluation.student import epoch_samples

    n, rounds = 6, 3
    three = torch.cat([epoch_samples(e, n, rounds, seed=5) for e in range(rounds)])
    assert sorted(three.tolist()) == list(range(n * rounds))  # every `rounds` epochs: each sample once
    assert torch.equal(epoch_samples(4, n, rounds, seed=5), epoch_samples(4, n, rounds, seed=5))  # resumable
    assert not torch.equal(epoch_samples(0, n, rounds, seed=5), epoch_samples(0, n, rounds, seed=6))
    odd = torch.cat([epoch_samples(e, 4, 3, seed=0) for e in range(6)])  # 4 does not divide 12: still balanced
    assert torch.bincount(odd, minlength=12).tolist() == [2] * 12


class _Spy(torch.nn.Module):
    """A linear classifier that records the mean pixel of every training sample it sees."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * SIZE * SIZE, 3)
        self.seen: list[float] = []

    def forward(self, x):
        if self.training:
            self.seen += x.mean(dim=(1, 2, 3)).tolist()
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("order", ["sequential", "mixed"])
def test_round_order_decides_which_round_an_epoch_trains_on(order):
    """Round r's images are all r / 2 (in [0, 1]): sequential trains epoch 0 on round 0 alone; mixed draws epoch 0
    from every round; both take the same optimizer steps."""
    rounds = [TrainSet(torch.full((6, 3, SIZE, SIZE), 255 * r // 2, dtype=torch.uint8), torch.arange(3).repeat(2),
                       torch.zeros(6, 3)) for r in range(3)]  # fmt: skip
    spy = _Spy()
    out = train_student(spy, rounds, None, _recipe(targets="stored-soft", temperature=1.0, regen_every=1, epochs=3,
                                                   batch_size=4, round_order=order), seed=0, progress=False)
    assert out["optimizer_steps"] == 3 * 2
    first = {round(v * 2) for v in spy.seen[:6]}
    assert first == {0} if order == "sequential" else len(first) > 1
    assert sorted(round(v * 2) for v in spy.seen) == [0] * 6 + [1] * 6 + [2] * 6  # each image once in 3 epochs


def test_fresh_round_entries_record_their_round_order_in_the_key(world):
    mixed = _eval(world, method="d3m", protocol="p1", regen_every=1, epochs=2, seeds=1)
    seq = _eval(world, method="d3m", protocol="p1", regen_every=1, epochs=2, seeds=1, round_order="sequential")
    key = f"d3m/p1/convnet_tiny/ipc{IPC}/regen1"
    assert {key, key + "/mixed"} <= set(seq["entries"])  # the old order keeps the old key: both entries are kept
    assert mixed["entries"][key + "/mixed"]["recipe"]["round_order"] == "mixed"
    assert seq["entries"][key]["recipe"]["round_order"] == "sequential"
    fixed = _eval(world, method="d3m", protocol="p1", regen_every=0, epochs=1, seeds=1)
    assert f"d3m/p1/convnet_tiny/ipc{IPC}/fixed" in fixed["entries"]  # no rounds, nothing to order
