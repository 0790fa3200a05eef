"""Per-image captions: `promptset caption` (pixel attributes, the captions file), `promptset pretrain --captions`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from promptset import cli
from promptset.captions import colour_name, compose_caption, pixel_attributes, read_captions, tercile_words
from promptset.data import scan_image_folder
from promptset.errors import UserError
from promptset.models import create_student
from promptset.stages import pretrain as pretrain_module
from promptset.stages.caption import caption
from promptset.stages.pretrain import pretrain

TINY = dict(vae="identity", resolution=16, unet_size="tiny", batch_size=4, warmup_steps=0, grid_samples=1,
            sample_steps=2, log_every=2, checkpoint_every=2, progress=False, device="cpu")  # fmt: skip
COLOURS = {"apple": [(200, 30, 30), (240, 220, 40)], "sky": [(50, 80, 220), (245, 245, 245)]}


def _square(fg, bg, size=24, box=(6, 18)) -> np.ndarray:
    x = np.zeros((size, size, 3), np.uint8) + np.array(bg, np.uint8)
    x[box[0] : box[1], box[0] : box[1]] = fg
    return x


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes of four 24 px images: a coloured square on a background; two object colours per class."""
    root = tmp_path_factory.mktemp("captioned")
    for name, fgs in COLOURS.items():
        (root / name).mkdir()
        for i in range(4):
            bg = (20, 120, 30) if i % 2 else (40, 40, 40)
            Image.fromarray(_square(fgs[i // 2], bg)).save(root / name / f"{i:02d}.png")
    return root


def test_colour_names():
    named = {(1.0, 0.0, 0.0): "red", (0.1, 0.2, 0.9): "blue", (0.2, 0.7, 0.2): "green", (0.95, 0.95, 0.95): "white",
             (0.5, 0.5, 0.52): "grey", (0.05, 0.05, 0.05): "black", (0.5, 0.3, 0.1): "brown",
             (0.95, 0.85, 0.1): "yellow", (1.0, 0.55, 0.1): "orange"}  # fmt: skip
    for rgb, name in named.items():
        assert colour_name(torch.tensor(rgb)) == name, rgb


def test_pixel_attributes_find_the_object_and_its_background():
    top = _square((220, 20, 20), (30, 40, 200), size=32, box=(2, 12))  # small red square high up on blue
    big = _square((240, 240, 240), (20, 20, 20), size=32, box=(4, 28))  # large white square on black
    images = torch.from_numpy(np.stack([top, big])).permute(0, 3, 1, 2).float() / 255
    a = pixel_attributes(images)
    assert [colour_name(c) for c in a.object] == ["red", "white"]
    assert [colour_name(c) for c in a.background] == ["blue", "black"]
    assert a.size[0] < a.size[1] and a.height[0] < 0.4
    assert tercile_words(torch.tensor([3.0, 1.0, 2.0]), "lo", "hi") == ["hi", "lo", ""]
    text = compose_caption("apple", {"size": "distant", "object": "red", "height": "at the top",
                                     "background": "blue", "texture": "plain", "looks_like": "orange"})  # fmt: skip
    assert text == "a photo of a distant red apple at the top on a plain blue background, looks like an orange"


def test_caption_command_describes_each_image(data: Path, tmp_path: Path):
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_file(create_student("convnet_tiny", 2, 32).state_dict(), str(teacher))
    out = caption(data=str(data), out=str(tmp_path / "c.jsonl"), teacher=f"convnet_tiny:{teacher}",
                  runner_up_min=0.0, progress=False)  # fmt: skip
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [f"{c}/{i:02d}.png" for c in COLOURS for i in range(4)]
    by_path = {r["path"]: r["caption"] for r in rows}
    assert "red apple" in by_path["apple/00.png"] and "yellow apple" in by_path["apple/02.png"]
    assert "green background" in by_path["apple/01.png"] and "black background" in by_path["apple/00.png"]
    assert "looks like a sky" in by_path["apple/00.png"]  # two classes: the runner-up is the other one
    assert len(set(by_path.values())) > 2  # captions differ within a class
    stats = json.loads((tmp_path / "c.jsonl.stats.json").read_text())
    assert stats["images"] == 8 and set(stats["informativeness"]) >= {"object", "background", "looks_like"}
    again = caption(data=str(data), out=str(tmp_path / "d.csv"), teacher=f"convnet_tiny:{teacher}",
                    runner_up_min=0.0, progress=False)  # fmt: skip
    lines = again.read_text().splitlines()
    assert lines[0] == "path,caption" and len(lines) == 9
    index = scan_image_folder(data)
    assert read_captions(again, index.root, index.files, all_files=index.files) == [
        [by_path[p.relative_to(data).as_posix()] for p in paths] for paths in index.files
    ]  # the CSV says what the JSONL says


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pretrain_encodes_each_caption_once_and_trains_on_its_own(data: Path, tmp_path: Path, monkeypatch):
    captions = caption(data=str(data), out=str(tmp_path / "c.jsonl"), progress=False)
    seen = {}

    def capture(run, latents, labels, text_states, num_templates, start, secs, teacher=None, image_caption=None):
        seen.update(states=text_states.clone(), image_caption=image_caption.clone(), labels=labels.clone())
        return original(run, latents, labels, text_states, num_templates, start, secs, teacher, image_caption)

    original = pretrain_module._train
    monkeypatch.setattr(pretrain_module, "_train", capture)
    model = pretrain(out=str(tmp_path / "m"), data=str(data), captions=str(captions), steps=4, max_length=32, **TINY)
    monkeypatch.undo()
    info = json.loads((model / "promptset_model.json").read_text())
    texts = [json.loads(x)["caption"] for x in captions.read_text().splitlines()]
    assert info["captions"]["distinct"] == len(set(texts))
    states, rows = seen["states"], seen["image_caption"]
    templates = 2 * 4  # two classes, four built-in templates
    assert len(states) == templates + len(set(texts)) + 1  # each distinct caption once, "" last
    # latents: per class its 4 images, then their 4 mirror images, which share their image's caption
    per_class = [texts[c * 4 : c * 4 + 4] for c in range(2)]
    want = [t for c in range(2) for t in per_class[c] * 2]
    distinct = sorted(set(texts))
    assert [distinct[r - templates] for r in rows.tolist()] == want
    a, b = rows[0], rows[2]  # two images of one class with different captions: different cached states
    assert texts[0] != texts[2] and not torch.equal(states[a], states[b])

    # the same command resumes bit for bit; another captions file is another model
    again = pretrain(out=str(tmp_path / "m"), data=str(data), captions=str(captions), steps=4, max_length=32, **TINY)
    assert again == model
    other = _write(tmp_path / "o.jsonl", [{"path": p, "caption": "a photo of something"} for p in
                                           (json.loads(x)["path"] for x in captions.read_text().splitlines())])
    with pytest.raises(UserError, match="trained differently"):
        pretrain(out=str(tmp_path / "m"), data=str(data), captions=str(other), steps=4, max_length=32, **TINY)


@pytest.mark.parametrize("problem", ["outside", "missing", "empty", "long", "notjson", "csvheader"])
def test_bad_captions_file_exits_2_and_writes_nothing(data: Path, tmp_path: Path, problem: str, capsys):
    paths = [f"{c}/{i:02d}.png" for c in COLOURS for i in range(4)]
    rows = [{"path": p, "caption": f"a photo of thing {i}"} for i, p in enumerate(paths)]
    path = tmp_path / "c.jsonl"
    if problem == "outside":
        rows.append({"path": "pear/00.png", "caption": "a pear"})
    elif problem == "missing":
        rows = rows[1:]
    elif problem == "empty":
        rows[3]["caption"] = "   "
    elif problem == "long":
        rows[3]["caption"] = "a photo of " + " ".join(["thing"] * 40)
    _write(path, rows)
    if problem == "notjson":
        path.write_text(path.read_text() + "{oops\n")
    elif problem == "csvheader":
        path = tmp_path / "c.csv"
        path.write_text("file,text\n" + "".join(f"{r['path']},{r['caption']}\n" for r in rows))
    out = tmp_path / "model"
    flags = ["pretrain", "--out", str(out), "--data", str(data), "--captions", str(path), "--no-progress"]
    flags += [x for k, v in TINY.items() if k != "progress" for x in (f"--{k.replace('_', '-')}", str(v))]
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert "--captions" in err or "caption" in err
    assert not out.exists()
