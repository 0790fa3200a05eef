"""Bad input through the CLI (`select`, `invert`, and the stages that read their outputs): exit code 2, the file or
flag named on stderr, and nothing written. Also what is accepted: odd image modes and sizes, upper-case extensions,
hidden and non-image files (skipped and counted).

Most cases call `promptset.cli.main` in-process (the console script's entry point, whose return value is the exit
code); a few run the real `python -m promptset` to check the process exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from promptset.cli import main
from promptset.models import create_student

SIZE = 16




def save_rgb(path: Path, size=(20, 20), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def dataset(root: Path, classes=("car", "cat", "dog"), per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            save_rgb(root / name / f"{i}.png", seed=10 * c + i)
    return root


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` with its bytes; None if the folder does not exist."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def select_args(data: Path, out: Path, *extra) -> list:
    return ["select", "--data", data, "--out", out, "--resolution", SIZE, "--no-progress", *extra]


def invert_args(model: Path, data: Path, out: Path, *extra) -> list:
    return ["invert", "--backend", "sd", "--model", model, "--data", data, "--out", out, "--steps", 2,
            "--batch-size", 3, "--resolution", SIZE, "--device", "cpu", "--no-progress", *extra]


# --- bad datasets: each case builds a folder under root and returns (data folder, what stderr must name) ----------


def _missing(root: Path):
    return root / "nope", [str(root / "nope"), "not found"]


def _empty(root: Path):
    (root / "data").mkdir()
    return root / "data", [str(root / "data"), "empty"]


def _no_class_folders(root: Path):
    save_rgb(root / "data" / "0.png")
    return root / "data", [str(root / "data"), "no class subfolders"]


def _single_class(root: Path):
    dataset(root / "data", classes=("cat",))
    return root / "data", ["single class", "'cat'"]


def _empty_class(root: Path):
    dataset(root / "data")
    (root / "data" / "emu").mkdir()
    (root / "data" / "emu" / "readme.txt").write_text("no images here")
    return root / "data", [str(root / "data" / "emu"), "no images"]


def _zero_byte(root: Path):
    dataset(root / "data")
    (root / "data" / "cat" / "2.png").write_bytes(b"")
    return root / "data", [str(root / "data" / "cat" / "2.png"), "0 bytes"]


def _truncated(root: Path):
    dataset(root / "data")
    bad = save_rgb(root / "data" / "dog" / "2.png", size=(64, 64))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return root / "data", [str(bad), "truncated"]


def _not_an_image(root: Path):
    dataset(root / "data")
    (root / "data" / "car" / "notes.JPG").write_text("this is text, not a JPEG")
    return root / "data", [str(root / "data" / "car" / "notes.JPG")]


def _bomb(root: Path):
    dataset(root / "data")
    save_rgb(root / "data" / "cat" / "huge.png", size=(300, 200))
    return root / "data", [str(root / "data" / "cat" / "huge.png"), "decompression-bomb", "60,000 pixels"]


def _backslash_name(root: Path):
    dataset(root / "data", classes=("car", "x\\..\\..\\escape"))  # a separator on Windows; ".." alone is hidden
    return root / "data", ["x\\\\..\\\\..\\\\escape", "unsafe", "path separator"]


def _control_char_name(root: Path):
    dataset(root / "data", classes=("car", "bad\x1bname"))
    return root / "data", ["bad\\x1bname", "unsafe", "control character"]


BAD_DATA = [_missing, _empty, _no_class_folders, _single_class, _empty_class, _zero_byte, _truncated, _not_an_image,
            _bomb, _backslash_name, _control_char_name]


@pytest.mark.parametrize("command", ["select", "invert"])
@pytest.mark.parametrize("case", BAD_DATA, ids=[f.__name__.strip("_") for f in BAD_DATA])
def test_bad_data_exits_2_names_the_file_and_writes_nothing(case, command, tmp_path, capsys, tiny_sd):
    data, expected = case(tmp_path)
    out = tmp_path / "run"
    extra = ["--max-image-pixels", 50_000] if case is _bomb else []
    args = select_args(data, out, *extra) if command == "select" else invert_args(tiny_sd, data, out, *extra)
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert err.startswith(f"promptset {command}: error: --data ")
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()


def test_real_process_exit_codes(tmp_path, tiny_sd):
    def promptset(*argv) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "promptset", *map(str, argv)], capture_output=True, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})

    missing = promptset(*select_args(tmp_path / "nope", tmp_path / "a"))
    assert missing.returncode == 2 and str(tmp_path / "nope") in missing.stderr
    data, expected = _truncated(tmp_path)
    corrupt = promptset(*invert_args(tiny_sd, data, tmp_path / "b"))
    assert corrupt.returncode == 2 and expected[0] in corrupt.stderr
    assert "Traceback" not in missing.stderr + corrupt.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("flags, named", [
    (["--initializer", "zebra crossing"], "--initializer: initializer 'zebra crossing' is 2 tokens"),
    (["--initializers", "car,zebra crossing,xqzvbnw"],
     "--initializers: initializer 'zebra crossing' is 2 tokens ['zebra</w>', 'crossing</w>']; 'xqzvbnw' is"),
    (["--initializers", "car,cat"], "--initializers has 2 words for 3 classes"),
])
def test_multi_token_or_missing_initializer(flags, named, tmp_path, capsys, tiny_sd):
    """Words the user chose are refused when not one token, every bad word in one message (the default, the class
    names, never refuses: tests/test_usability.py)."""
    classes = ("car", "cat", "dog")
    data = dataset(tmp_path / "data", classes=classes)
    out = tmp_path / "run"
    code, _, err = cli(capsys, *invert_args(tiny_sd, data, out, *flags))
    assert code == 2 and named in err, err
    assert not out.exists()


def test_out_holding_a_different_run_is_refused_unless_overwrite(tmp_path, capsys):
    data = dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert cli(capsys, *select_args(data, out))[0] == 0
    before = snapshot(out)
    code, _, err = cli(capsys, *select_args(data, out, "--resolution", 8))
    assert code == 2 and f"--out {out} already holds a different select run (changed: resolution)" in err
    assert snapshot(out) == before

    code, out_text, _ = cli(capsys, *select_args(data, out))  # the same command again: nothing to redo
    assert code == 0 and "already complete" in out_text and snapshot(out) == before

    assert cli(capsys, *select_args(data, out, "--resolution", 8, "--overwrite"))[0] == 0
    assert Image.open(out / "collages" / "cat" / "00000.png").size == (8, 8)


def test_out_that_is_not_a_run_folder_is_refused(tmp_path, capsys):
    data = dataset(tmp_path / "data")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, _, err = cli(capsys, *select_args(data, out))
    assert code == 2 and f"--out {out} is not empty and holds no promptset run" in err
    assert snapshot(out) == {"thesis.tex": b"precious"}


def _teacher(path: Path, num_classes: int, classes: list[str] | None = None) -> Path:
    net = create_student("convnet_tiny", num_classes, SIZE)
    meta = {"class_folders": json.dumps(classes)} if classes else None
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def test_teacher_whose_classes_disagree_is_refused(tmp_path, capsys):
    data = dataset(tmp_path / "data")
    out = tmp_path / "run"
    wide = _teacher(tmp_path / "wide.safetensors", 5)
    code, _, err = cli(capsys, *select_args(data, out, "--teacher", f"convnet_tiny:{wide}"))
    assert code == 2 and f"teacher weights {wide} predict 5 classes but the data has 3" in err
    shuffled = _teacher(tmp_path / "shuffled.safetensors", 3, ["cat", "car", "dog"])
    code, _, err = cli(capsys, *select_args(data, out, "--teacher", f"convnet_tiny:{shuffled}"))
    assert code == 2 and str(shuffled) in err and "same classes in a different order" in err
    assert not out.exists()
    right = _teacher(tmp_path / "right.safetensors", 3, ["car", "cat", "dog"])
    assert cli(capsys, *select_args(data, out, "--teacher", f"convnet_tiny:{right}"))[0] == 0


def test_data_or_prompts_whose_classes_disagree_with_classes_json(tmp_path, capsys, tiny_sd):
    data = dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert cli(capsys, *select_args(data, out))[0] == 0
    other = dataset(tmp_path / "other", classes=("car", "cat", "emu"))
    before = snapshot(out)
    code, _, err = cli(capsys, *invert_args(tiny_sd, other, out))
    assert code == 2 and f"--data {other} does not match classes.json" in err and "'emu'" in err
    assert snapshot(out) == before

    assert cli(capsys, *invert_args(tiny_sd, out / "collages", out))[0] == 0
    classes = out / "classes.json"
    swapped = classes.read_text().replace('"car"', '"tmp"').replace('"cat"', '"car"').replace('"tmp"', '"cat"')
    classes.write_text(swapped)
    before = snapshot(out)
    for command in (["export", "--run", out], ["generate", "--run", out, "--ipc", 1, "--steps", 1, "--device", "cpu"]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and f"prompts file {out / 'prompts.safetensors'} does not match classes.json" in err
        assert "same classes in a different order" in err
    assert snapshot(out) == before

    classes.write_text('[{"index": 0, "folder": "../../outside", "name": "x"}]')
    code, _, err = cli(capsys, "generate", "--run", out, "--device", "cpu")
    assert code == 2 and str(classes) in err and "unsafe" in err


def test_odd_images_are_accepted_and_skipped_files_counted(tmp_path, capsys, tiny_sd):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("car", "cat"):
        (root / name).mkdir(parents=True)
        gray = rng.integers(0, 255, (30, 7), dtype=np.uint8)
        Image.fromarray(gray, "L").save(root / name / "gray.PNG")
        rgba = rng.integers(0, 255, (9, 40, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(root / name / "alpha.png")
        Image.fromarray(rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)).convert("CMYK").save(
            root / name / "print.JPG")
        Image.fromarray(rng.integers(0, 255, (50, 33, 3), dtype=np.uint8)).convert("P").save(root / name / "pal.gif")
        Image.fromarray(rng.integers(0, 255, (3, 300, 3), dtype=np.uint8)).save(root / name / "strip.JPEG")
        (root / name / ".DS_Store").write_bytes(b"\0\1")
        (root / name / "labels.csv").write_text("a,b\n")
    (root / ".hidden_class").mkdir()
    out = tmp_path / "run"
    code, text, err = cli(capsys, *select_args(root, out))
    assert code == 0, err
    assert "2 classes, 10 images; skipped 3 hidden and 2 non-image entries" in text
    for name in ("car", "cat"):
        collages = sorted((out / "collages" / name).glob("*.png"))
        assert len(collages) == 5
        assert all(Image.open(p).mode == "RGB" and Image.open(p).size == (SIZE, SIZE) for p in collages)

    code, text, err = cli(capsys, *invert_args(tiny_sd, root, tmp_path / "direct", "--batch-size", 2))
    assert code == 0, err
    assert "2 classes, 10 images; skipped 3 hidden and 2 non-image entries" in text
    assert (tmp_path / "direct" / "prompts.safetensors").is_file()
