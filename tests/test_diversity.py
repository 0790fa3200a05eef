"""Diversity that stores nothing (issue 3): guidance on an interval of the steps, condition-annealed sampling (CADS)
and seed selection that spreads a class's images (`backends/diversity.py`), through generate, evaluate, pack and
materialize.

A tiny random Stable Diffusion (16 px) inverts raw 8 px images; a random CIFAR ResNet-20 is the teacher.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import promptset
from promptset.artifacts import PromptSet, load_tensors
from promptset.atomic import read_jsonl
from promptset.backends import create_backend
from promptset.backends.diversity import Cads, Diversity, SpreadSelection, job_shares
from promptset.backends.sampling import Job, PromptConditioner, TextConditioner, generate_batch, generation_settings
from promptset.backends.selection import candidate_seed
from promptset.cli import main
from promptset.errors import UserError
from promptset.seeding import derive_seed

CLASSES = ("car", "cat", "dog")  # conftest's RAW_CLASSES and RAW_SIZE: the raw_run fixture's data
DATA_SIZE = 8

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# the sampler


def _todays_sample(backend, cond, uncond, noise, *, steps, guidance, generators, guided=None):
    """The sampling loop as it was before these options (`DiffusionBackend.sample`), with guidance only on the step
    indices in `guided` (None: every step) and the conditional pass alone elsewhere."""
    scheduler = type(backend.sample_scheduler).from_config(backend.sample_scheduler.config)
    scheduler.set_timesteps(steps, device=backend.device)
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    latents = noise.float() * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        use_cfg = uncond is not None and guidance != 1.0 and (guided is None or k in guided)
        states = (torch.cat([uncond, cond]) if use_cfg else cond).to(backend.dtype)
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if use_cfg else latents, t)
        pred = backend.unet(model_in.to(backend.dtype), t, encoder_hidden_states=states).sample.float()
        if use_cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return backend.decode_latents(latents)


def _inputs(backend, seeds):
    cond = TextConditioner(backend, ["a photo of a car", "a photo of a cat", "a photo of a dog"])
    states = cond(torch.arange(len(seeds)) % 3)  # (B, L, D)
    uncond = backend.encode_prompts([""]).expand(len(seeds), -1, -1)
    return states, uncond


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_defaults_sample_todays_images_bit_for_bit(tiny_sd, sampler):
    backend = create_backend("sd", str(tiny_sd), device="cpu", sampler=sampler)
    seeds = [3, 4]
    cond, uncond = _inputs(backend, seeds)
    noise = backend.initial_noise(_gens(seeds))
    today = _todays_sample(backend, cond, uncond, noise, steps=4, guidance=5.0, generators=_gens(seeds))
    for diversity in (None, Diversity(), Diversity.parse("0,1", "off", "typical", guidance=5.0, candidates=4)):
        images = backend.sample(cond, uncond, noise, steps=4, guidance=5.0, generators=_gens(seeds),
                                diversity=diversity)
        assert torch.equal(images, today)
    assert Diversity.parse("0,1", "off", "typical", guidance=5.0, candidates=4) == Diversity()


def test_generation_settings_record_only_the_options_that_are_on():
    kw = dict(prompts_hash="p", template="t", model_hash="m", steps=4, guidance=5.0, sampler="ddim", seed=0,
              resolution=16, factor=1, image_size=8, dtype="fp32", sampler_batch=8, compile=False)
    today = {"prompts", "template", "model", "steps", "guidance", "sampler", "seed", "resolution", "factor",
             "image_size", "dtype", "sampler_batch"}
    assert set(generation_settings(**kw)) == today
    assert generation_settings(**kw, diversity=Diversity()) == generation_settings(**kw)
    on = generation_settings(**kw, diversity=Diversity.parse("0.2,0.8", "0.6,0.9", "diverse:1", guidance=5.0,
                                                             candidates=4))
    assert on == {**generation_settings(**kw), "guidance_interval": [0.2, 0.8], "selection": "diverse:1",
                  "cads": {"tau1": 0.6, "tau2": 0.9, "noise_scale": 0.25, "psi": 1.0}}
    assert Diversity.from_settings(on) == Diversity((0.2, 0.8), Cads(0.6, 0.9), 1.0)  # what materialize reads back
    assert Diversity.from_settings(generation_settings(**kw)) == Diversity()


def test_guidance_interval_skips_the_unconditional_pass_outside_it_and_equals_guidance_1_there(tiny_sd):
    backend = create_backend("sd", str(tiny_sd), device="cpu")
    seeds = [5, 6]
    cond, uncond = _inputs(backend, seeds)
    noise = backend.initial_noise(_gens(seeds))
    sizes = []
    hook = backend.unet.register_forward_pre_hook(lambda _module, args: sizes.append(args[0].shape[0]))
    middle = Diversity.parse("0.25,0.75", "", "typical", guidance=5.0, candidates=1)  # steps 1 and 2 of 4
    images = backend.sample(cond, uncond, noise, steps=4, guidance=5.0, generators=_gens(seeds), diversity=middle)
    hook.remove()
    assert sizes == [2, 4, 4, 2]  # the unconditional rows only on the guided steps
    assert [middle.guided(k, 4) for k in range(4)] == [False, True, True, False]
    reference = _todays_sample(backend, cond, uncond, noise, steps=4, guidance=5.0, generators=_gens(seeds),
                               guided={1, 2})
    assert torch.equal(images, reference)
    everywhere = backend.sample(cond, uncond, noise, steps=4, guidance=5.0, generators=_gens(seeds))
    unguided = backend.sample(cond, None, noise, steps=4, guidance=1.0, generators=_gens(seeds))
    assert not torch.equal(images, everywhere) and not torch.equal(images, unguided)
    nowhere = Diversity.parse("0.1,0.2", "", "typical", guidance=5.0, candidates=1)  # no k/4 falls in [0.1, 0.2)
    images = backend.sample(cond, uncond, noise, steps=4, guidance=5.0, generators=_gens(seeds), diversity=nowhere)
    assert torch.equal(images, unguided)  # guidance 1 on every step, bit for bit


def test_cads_anneals_the_condition_as_the_paper_defines_it():
    cads = Cads(0.6, 0.9)
    assert (cads.noise_scale, cads.psi) == (0.25, 1.0)
    assert [cads.gamma(t) for t in (1.0, 0.9, 0.75, 0.6, 0.3)] == [0.0, 0.0, pytest.approx(0.5), 1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 6, generator=g) * 3 + 1  # (B, L, D)
    y[1, 3:] = 0  # positions the backend zeroed (padding the mini model reads as absent)
    plain = Diversity(cads=Cads(0.6, 0.9, 0.25, 0.0))
    gens = _gens([7, 8])
    assert plain.condition(y, 4, 10, gens) is y  # t = 0.6 <= tau1: the condition itself, nothing drawn
    out = plain.condition(y, 2, 10, gens)  # t = 0.8: gamma = 1/3
    noise = torch.stack([torch.randn(5, 6, generator=gen) for gen in _gens([7, 8])])  # each image's own first draw
    expected = math.sqrt(1 / 3) * y + 0.25 * math.sqrt(2 / 3) * noise
    expected[1, 3:] = 0
    assert torch.allclose(out, expected, atol=1e-6)
    again = plain.condition(y, 2, 10, gens)  # a new draw at every step
    assert not torch.allclose(again, out)
    rescaled = Diversity(cads=Cads(0.6, 0.9, 0.25, 1.0)).condition(y, 0, 10, _gens([7, 8]))  # t = 1: pure noise
    for b, n in ((0, 5), (1, 3)):  # the image's own mean and std, over its kept positions
        assert torch.allclose(rescaled[b, :n].mean(), y[b, :n].mean(), atol=1e-5)
        assert torch.allclose(rescaled[b, :n].std(), y[b, :n].std(), atol=1e-5)
    assert torch.equal(rescaled[1, 3:], torch.zeros(2, 6))
    one = Diversity(cads=Cads(0.6, 0.9, 0.25, 1.0)).condition(y[1:], 0, 10, _gens([8]))
    assert torch.allclose(one[0], rescaled[1], atol=1e-6)  # an image's annealing does not depend on its batch


def test_each_option_changes_images_and_an_image_is_the_same_alone_or_in_a_batch(tiny_sd):
    backend = create_backend("sd", str(tiny_sd), device="cpu", sampler="ddpm")  # ddpm: its step noise interleaves
    cond = TextConditioner(backend, ["a photo of a car", "a photo of a cat", "a photo of a dog"])
    kw = dict(steps=4, guidance=5.0, factor=1, image_size=backend.resolution, uncond=backend.encode_prompts([""]),
              micro_batch=2)
    a, b, c = Job(0, 0, 11), Job(1, 0, 12), Job(2, 0, 13)
    plain = generate_batch(backend, cond, [a], **kw)
    for gi, cads in (("0.25,1", ""), ("", "0.6,0.9"), ("0.25,1", "0.2,0.9,0.5,0.5")):
        diversity = Diversity.parse(gi, cads, "typical", guidance=5.0, candidates=1)
        alone = generate_batch(backend, cond, [a], diversity=diversity, **kw)
        together = generate_batch(backend, cond, [b, a, c], diversity=diversity, **kw)  # a in another micro batch row
        assert torch.equal(alone[0], together[1]), (gi, cads)
        assert not torch.equal(alone, plain), (gi, cads)


def test_bad_values_are_refused_naming_the_flag():
    for text in ("0.8,0.2", "0.2", "a,b", "0.2,0.2", "-0.1,0.5", "0.5,1.5", "nan,1"):
        with pytest.raises(UserError, match=r"--guidance-interval .*LO,HI"):
            Diversity.parse(text, "", "typical", guidance=5.0, candidates=1)
    for text in ("0.9,0.6", "0.6", "0.6,0.9,0", "0.6,0.9,0.25,2", "0.6,0.9,0.25,1,1", "x,y"):
        with pytest.raises(UserError, match=r"--cads .*TAU1,TAU2"):
            Diversity.parse("", text, "typical", guidance=5.0, candidates=1)
    for text in ("spread", "typical:1", "diverse:-1", "diverse:x"):
        with pytest.raises(UserError, match=r"--selection .*diverse\[:MARGIN\]"):
            Diversity.parse("", "", text, guidance=5.0, candidates=4)
    with pytest.raises(UserError, match="--selection diverse chooses among the candidates"):
        Diversity.parse("", "", "diverse", guidance=5.0, candidates=1)
    with pytest.raises(UserError, match="--guidance-interval 0.2,0.8 restricts classifier-free guidance"):
        Diversity.parse("0.2,0.8", "", "typical", guidance=1.0, candidates=1)


# ---------------------------------------------------------------------------------------------------------------------
# seed selection that spreads a class's images


def _pixels(points: list[tuple[int, int]]) -> torch.Tensor:
    """Synthetic 'images' whose features are their first two pixel values: (N, 1, 3, 1, 1) uint8."""
    return torch.tensor([[x, y, 0] for x, y in points], dtype=torch.uint8).view(-1, 1, 3, 1, 1)


def _features_of(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pixels.flatten(1)[:, :2].float(), torch.zeros(len(pixels), 2)


def test_diverse_selection_keeps_the_farthest_in_class_candidate_and_looks_only_back():
    jobs = [Job(0, 0, 1), Job(0, 1, 2), Job(0, 2, 3), Job(1, 0, 4)]
    ce = torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.2, 2.0], [0.1, 0.1, 0.1], [0.5, 0.4, 0.6]])  # (B, G)
    points = [[(4, 4), (0, 0), (8, 8)],  # image 0: the lowest cross-entropy, as typical (candidate 1)
              [(2, 0), (6, 0), (20, 0)],  # image 1: 20 is farthest but 1.8 nats worse than the best, 6 is next
              [(0, 2), (3, 0), (6, 1)],  # image 2: nearest chosen at 2, 3 and 1: candidate 1
              [(9, 9), (9, 9), (0, 0)]]  # class 1 starts afresh: the lowest cross-entropy
    features = torch.stack([_features_of(_pixels(p).flatten(0, 1))[0] for p in points]).unsqueeze(2)  # (B, G, 1, D)
    assert SpreadSelection(0.5, _features_of).choose(jobs, ce, features).tolist() == [1, 1, 1, 1]
    # margin 0: the lowest cross-entropy only, spread breaking its ties (image 2's three candidates)
    assert SpreadSelection(0.0, _features_of).choose(jobs, ce, features).tolist() == [1, 0, 2, 1]
    one_by_one = SpreadSelection(0.5, _features_of)
    picks = [int(one_by_one.choose([j], ce[i : i + 1], features[i : i + 1])) for i, j in enumerate(jobs)]
    assert picks == [1, 1, 1, 1]
    asked = []

    def earlier(cls, indices):  # the chosen images of a class, as files or a round cache hold them
        asked.append((cls, indices))
        return _pixels([[(0, 0), (6, 0)][i] for i in indices])

    resumed = SpreadSelection(0.5, _features_of, earlier)
    assert resumed.choose(jobs[2:3], ce[2:3], features[2:3]).tolist() == [1]  # image 2 from images 0 and 1 alone
    assert asked == [(0, [0, 1])]
    with pytest.raises(RuntimeError, match="needs images"):
        SpreadSelection(0.5, _features_of).choose(jobs[1:2], ce[1:2], features[1:2])


def test_job_shares_keep_classes_whole_for_diverse_selection():
    jobs = [Job(c, i, 0) for c in range(3) for i in range(4)]
    assert job_shares(jobs, 2, whole_classes=False) == [(0, 6), (6, 12)]  # `rank_share`'s, a class split
    assert job_shares(jobs, 2, whole_classes=True) == [(0, 8), (8, 12)]
    assert job_shares(jobs[2:], 4, whole_classes=True) == [(0, 2), (2, 6), (6, 10), (10, 10)]
    assert job_shares([], 2, whole_classes=True) == [(0, 0), (0, 0)]


# ---------------------------------------------------------------------------------------------------------------------
# through the stages


# the run: conftest's `raw_run` (invert on raw 8 px folders at the model's 16 px; a random CIFAR ResNet-20 teacher)


def _set(out: Path) -> tuple[list[list[int]], dict[str, bytes]]:
    """(seeds per class, {file: PNG bytes}) of a generate output."""
    seeds = load_tensors(out / "labels.safetensors")[0]["seeds"].view(len(CLASSES), -1).tolist()
    return seeds, {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "generated").rglob("*.png"))}


def test_diverse_selection_sets_are_prefixes_of_larger_ones_and_resume_from_their_files(raw_run, tmp_path):
    kw = dict(run=str(raw_run.run), steps=2, teacher=raw_run.teacher, candidates=4, device="cpu", progress=False)
    promptset.generate(out=str(tmp_path / "three"), ipc=3, selection="diverse", **kw)
    promptset.generate(out=str(tmp_path / "six"), ipc=6, selection="diverse", **kw)
    promptset.generate(out=str(tmp_path / "typical"), ipc=6, **kw)
    (small, small_png), (large, large_png) = _set(tmp_path / "three"), _set(tmp_path / "six")
    assert small == [row[:3] for row in large]
    assert small_png == {f: b for f, b in large_png.items() if int(Path(f).stem) < 3}
    typical = _set(tmp_path / "typical")[0]
    assert [row[0] for row in typical] == [row[0] for row in large]  # image 0 of a class: the lowest cross-entropy
    assert typical != large  # later images are chosen for spread
    rows = read_jsonl(tmp_path / "six" / "generated" / "manifest.jsonl")
    for row in rows:  # the manifest names the chosen candidate, whose seed regenerates the image
        job_seed = derive_seed(0, "generate", row["class_index"], row["image"])
        assert row["seed"] == candidate_seed(job_seed, row["candidate"])
    meta = load_tensors(tmp_path / "six" / "labels.safetensors")[1]
    assert json.loads(meta["generation"])["selection"] == "diverse:0.1"
    assert "selection" not in json.loads(load_tensors(tmp_path / "typical" / "labels.safetensors")[1]["generation"])
    shutil.copytree(tmp_path / "three", tmp_path / "grown")  # IPC 3 made, then 6: images 3-5 look back at the files
    promptset.generate(out=str(tmp_path / "grown"), ipc=6, selection="diverse", **kw)
    assert _set(tmp_path / "grown") == (large, large_png)


@pytest.mark.parametrize("flags", [{"guidance_interval": "0.2,0.7"}, {"cads": "0.6,0.9"},
                                   {"candidates": 3, "selection": "diverse:2", "cads": "0.3,0.9,0.5,0.5"}])
def test_pack_then_materialize_reproduces_the_images_of_each_option(raw_run, tmp_path, flags):
    out = tmp_path / "gen"
    promptset.generate(run=str(raw_run.run), out=str(out), ipc=2, steps=3, teacher=raw_run.teacher, guidance=5.0,
                       device="cpu", progress=False, **{"candidates": 1, **flags})
    plain = tmp_path / "plain"
    promptset.generate(run=str(raw_run.run), out=str(plain), ipc=2, steps=3, candidates=1, guidance=5.0,
                       device="cpu", progress=False)
    assert _set(out)[1] != _set(plain)[1]  # the option changed the images
    shutil.copytree(raw_run.run, tmp_path / "run")  # pack reads generate's set from the run folder
    for name in ("generated", "labels.safetensors"):
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, tmp_path / "run" / name)
    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(tmp_path / "run"), out=str(packed))
    report = promptset.materialize(file=str(packed), model=str(raw_run.sd), out=str(tmp_path / "data"), device="cpu",
                                   progress=False)
    assert report["rounds"][0]["equal"]
    for f, data in _set(out)[1].items():  # the PNGs themselves, byte for byte
        cls, name = Path(f).parent.name, Path(f).name
        assert (tmp_path / "data" / "round00" / "images" / cls / name).read_bytes() == data


def test_evaluate_fresh_rounds_take_the_options_grow_from_the_round_cache_and_materialize(raw_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(raw_run.run, run)
    ev = dict(test=str(raw_run.data), student="convnet_tiny", epochs=2, seeds=1, regen_every=1, gen_steps=2,
              protocol="p2", candidates=3, selection="diverse", cads="0.6,0.9", guidance_interval="0.2,0.8",
              teacher=raw_run.teacher, device="cpu", progress=False, report=False)
    (key, entry), = promptset.evaluate(run=str(run), ipc=1, **ev)["entries"].items()
    assert key.endswith("/best-of-3/gi0.2-0.8/cads0.6-0.9-0.25-1/diverse0.1/mixed")
    assert entry["variant"] == "best of 3, guidance interval 0.2,0.8, CADS 0.6,0.9,0.25,1, diverse:0.1, rounds mixed"
    assert entry["distilled"]["generation"]["cads"] == {"tau1": 0.6, "tau2": 0.9, "noise_scale": 0.25, "psi": 1.0}
    # IPC 2 after IPC 1: image 1 of each class looks back at image 0 in the round cache
    key = key.replace("/ipc1/", "/ipc2/")
    grown = promptset.evaluate(run=str(run), ipc=2, **ev)["entries"][key]
    assert grown["distilled"]["round_cache"] == {"generated": 6, "reused": 6}
    fresh = tmp_path / "fresh"
    shutil.copytree(raw_run.run, fresh)
    (_, made), = promptset.evaluate(run=str(fresh), ipc=2, round_cache=False, **ev)["entries"].items()
    seeds = [load_tensors(r / e["distilled"]["labels_file"])[0]["seeds"] for r, e in ((run, grown), (fresh, made))]
    assert torch.equal(*seeds)
    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(run), out=str(packed), entry=key)
    report = promptset.materialize(file=str(packed), model=str(raw_run.sd), out=str(tmp_path / "data"), device="cpu",
                                   progress=False)
    assert [r["equal"] for r in report["rounds"]] == [True, True]


def test_evaluate_follows_generates_options_unless_told_otherwise(raw_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(raw_run.run, run)
    promptset.generate(run=str(run), ipc=1, steps=2, teacher=raw_run.teacher, candidates=2, selection="diverse",
                       cads="0.6,0.9", guidance_interval="0.2,0.8", device="cpu", progress=False)
    ev = dict(test=str(raw_run.data), student="convnet_tiny", epochs=1, seeds=1, ipc=1, gen_steps=2, protocol="p2",
              regen_every=0, teacher=raw_run.teacher, device="cpu", progress=False, report=False)
    (key, entry), = promptset.evaluate(run=str(run), **ev)["entries"].items()
    assert key.endswith("/best-of-2/gi0.2-0.8/cads0.6-0.9-0.25-1/diverse0.1")
    assert entry["distilled"]["round0_reused_generated"]  # the same settings: generate's own images
    entries = promptset.evaluate(run=str(run), cads="off", guidance_interval="0,1", selection="typical",
                                 **ev)["entries"]
    entry = entries[key.replace("/gi0.2-0.8/cads0.6-0.9-0.25-1/diverse0.1", "")]
    assert not entry["distilled"]["round0_reused_generated"] and len(entries) == 2
    assert not {"cads", "guidance_interval", "selection"} & set(entry["distilled"]["generation"])


@pytest.mark.parametrize("argv, flag", [
    (["--guidance-interval", "0.8,0.2"], "--guidance-interval"),
    (["--guidance-interval", "0.2,0.8", "--guidance", "1"], "--guidance-interval"),
    (["--cads", "0.9,0.6"], "--cads"),
    (["--cads", "0.6,0.9,-1"], "--cads"),
    (["--selection", "spread"], "--selection"),
    (["--selection", "diverse", "--candidates", "1"], "--selection"),
])  # fmt: skip
def test_bad_values_exit_2_naming_the_flag_and_write_nothing(raw_run, tmp_path, capsys, argv, flag):
    out = tmp_path / "gen"
    code = main(["generate", "--run", str(raw_run.run), "--out", str(out), "--ipc", "1", "--steps", "1", "--teacher",
                 raw_run.teacher, "--device", "cpu", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and f"promptset generate: error: {flag}" in err and not out.exists()
    run = tmp_path / "run"
    shutil.copytree(raw_run.run, run)
    code = main(["evaluate", "--run", str(run), "--test", str(raw_run.data), "--ipc", "1", "--epochs", "1",
                 "--protocol", "p2", "--teacher", raw_run.teacher, "--device", "cpu", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and f"promptset evaluate: error: {flag}" in err and not (run / "eval").exists()


@pytest.mark.slow
def test_torchrun_diverse_selection_keeps_classes_whole_and_matches_one_process(raw_run, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = ["generate", "--ipc", "3", "--steps", "2", "--teacher", raw_run.teacher, "--candidates", "3", "--selection",
            "diverse", "--cads", "0.6,0.9", "--soft-labels", "--device", "cpu", "--no-progress", "--run-dir",
            str(raw_run.run)]
    one = subprocess.run([sys.executable, "-m", "promptset", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(bin_dir / "torchrun"), "--nproc-per-node", "2", "-m", "promptset", *args, "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 0 made 6 of its 6 images (jobs 0-5 of 9" in two.stdout  # classes 0 and 1 whole
    assert "process 1 made 3 of its 3 images (jobs 6-8 of 9" in two.stdout
    assert _set(tmp_path / "two") == _set(tmp_path / "one")
    (a, meta_a), (b, meta_b) = load_tensors(tmp_path / "one" / "labels.safetensors"), load_tensors(
        tmp_path / "two" / "labels.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and meta_a == meta_b


def test_prompt_conditioner_images_follow_the_stored_seed_with_cads(raw_run):
    """A stored seed alone regenerates its image under CADS: the annealing noise comes from that seed."""
    backend = create_backend("sd", str(raw_run.sd), device="cpu")
    conditioner = PromptConditioner(backend, PromptSet.load(raw_run.run / "prompts.safetensors"))
    kw = dict(steps=3, guidance=5.0, factor=1, image_size=DATA_SIZE, uncond=backend.encode_prompts([""]),
              micro_batch=4, diversity=Diversity(cads=Cads(0.2, 0.9)))
    jobs = [Job(c, i, 100 + 10 * c + i) for c in range(3) for i in range(2)]
    every = generate_batch(backend, conditioner, jobs, **kw)
    for n, job in enumerate(jobs):
        torch.manual_seed(n)  # the global random state plays no part
        assert torch.equal(generate_batch(backend, conditioner, [job], **kw)[0], every[n])


def test_described_prompts_draw_words_from_the_seed_alone(tiny_sd):
    from promptset.captions import DESCRIBE_WORDS, described_prompt

    texts = [described_prompt("{token}", s) for s in range(40)]
    assert texts == [described_prompt("{token}", s) for s in range(40)] and len(set(texts)) > 30
    assert all(t.startswith("a photo of ") and t.count("{token}") == 1 for t in texts)
    assert {w for t in texts for w in DESCRIBE_WORDS["object"] if f" {w} {{token}}" in t} >= {"red", "blue"}
    backend = create_backend("sd", str(tiny_sd), device="cpu", sampler="ddim")
    cond = TextConditioner(backend, ["a photo of a car", "a photo of a cat", "a photo of a dog"], names=list(CLASSES))
    kw = dict(steps=3, guidance=5.0, factor=1, image_size=backend.resolution, uncond=backend.encode_prompts([""]),
              micro_batch=2)
    a, b, c = Job(0, 0, 11), Job(1, 0, 12), Job(2, 0, 13)
    plain = generate_batch(backend, cond, [a], **kw)
    diversity = Diversity.parse("", "", "typical", guidance=5.0, candidates=1, describe="random")
    alone = generate_batch(backend, cond, [a], diversity=diversity, **kw)
    together = generate_batch(backend, cond, [b, a, c], diversity=diversity, **kw)
    assert torch.equal(alone[0], together[1]) and not torch.equal(alone, plain)
    states = cond(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([11, 11]))
    assert torch.equal(states[0], states[1])  # the same seed: the same words
    assert Diversity.from_settings(diversity.settings()) == diversity and "describe" in diversity.settings()
    with pytest.raises(UserError, match="--describe"):
        Diversity.parse("", "", "typical", guidance=5.0, candidates=1, describe="sometimes")
    with pytest.raises(UserError, match="does not know"):
        Diversity.from_settings({"describe": "pixel-words-99"})


def test_described_generate_packs_materializes_and_evaluate_follows(raw_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(raw_run.run, run)
    promptset.generate(run=str(run), ipc=2, steps=3, candidates=1, guidance=5.0, describe="random", device="cpu",
                       teacher=raw_run.teacher, soft_labels=True, progress=False)
    settings = json.loads(load_tensors(run / "labels.safetensors")[1]["generation"])
    assert settings["describe"] == "pixel-words-1"
    packed = tmp_path / "set.safetensors"
    promptset.pack(run=str(run), out=str(packed))
    report = promptset.materialize(file=str(packed), model=str(raw_run.sd), out=str(tmp_path / "data"), device="cpu",
                                   progress=False)
    assert report["rounds"][0]["equal"]
    ev = dict(test=str(raw_run.data), student="convnet_tiny", epochs=1, seeds=1, ipc=2, gen_steps=3, protocol="p2",
              regen_every=0, teacher=raw_run.teacher, device="cpu", progress=False, report=False)
    (key, entry), = promptset.evaluate(run=str(run), **ev)["entries"].items()
    assert key.endswith("/described") and entry["distilled"]["round0_reused_generated"]
    entries = promptset.evaluate(run=str(run), describe="off", **ev)["entries"]
    assert key.removesuffix("/described") in entries
