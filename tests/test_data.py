"""Tests for promptset.data: ImageFolder scanning, refusal of bad input, and decoding every common mode to RGB.

All images are tiny and written under tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptset.data import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageFolderIndex,
    display_name,
    load_class_images,
    load_image,
    resize_center_crop,
    scan_image_folder,
    to_pil,
    to_tensor,
    validate_class_name,
)
from promptset.errors import UserError


def _save_rgb(path: Path, size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _dataset(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> Path:
    for name in classes:
        for i in range(per_class):
            _save_rgb(root / name / f"{i:04d}.png", color=(10 * i, 100, 200))
    return root


# --- layout errors ---------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="--data") as info:
        scan_image_folder(missing)
    assert str(missing) in str(info.value) and "not found" in str(info.value)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    file = _save_rgb(tmp_path / "one.png")
    with pytest.raises(UserError, match="not a folder") as info:
        scan_image_folder(file, flag="--eval-data")
    assert str(file) in str(info.value) and "--eval-data" in str(info.value)


def test_empty_folder(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(UserError, match="empty") as info:
        scan_image_folder(root)
    assert str(root) in str(info.value)


def test_images_directly_in_root(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i in range(3):
        _save_rgb(root / f"{i}.jpg")
    with pytest.raises(UserError, match="3 images directly in the folder") as info:
        scan_image_folder(root)
    assert str(root) in str(info.value) and "subfolder per class" in str(info.value)


def test_single_class(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "one", classes=("cat",))
    with pytest.raises(UserError, match="single class") as info:
        scan_image_folder(root)
    assert "'cat'" in str(info.value) and "at least 2 classes" in str(info.value) and str(root) in str(info.value)


def test_empty_class(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    (root / "bird").mkdir()
    (root / "bird" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="contains no images") as info:
        scan_image_folder(root)
    assert "'bird'" in str(info.value) and str(root / "bird") in str(info.value)


def test_min_per_class(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", per_class=2)
    with pytest.raises(UserError, match="at least 5") as info:
        scan_image_folder(root, min_per_class=5)
    assert "'cat'" in str(info.value)


# --- file errors -----------------------------------------------------------------------------------------------------


def test_zero_byte_png(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    bad = root / "dog" / "zero.png"
    bad.write_bytes(b"")
    with pytest.raises(UserError, match="0 bytes") as info:
        scan_image_folder(root)
    assert str(bad) in str(info.value) and "--data" in str(info.value)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    bad = root / "cat" / "x.jpg"
    bad.write_text("this is not a jpeg")
    with pytest.raises(UserError, match="remove or replace") as info:
        scan_image_folder(root)
    assert str(bad) in str(info.value)


def test_several_bad_files_are_counted(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    (root / "cat" / "a.png").write_bytes(b"")
    (root / "dog" / "b.png").write_bytes(b"")
    with pytest.raises(UserError, match="; 1 more bad image file, e.g.") as info:
        scan_image_folder(root)
    assert str(root / "cat" / "a.png") in str(info.value) and str(root / "dog" / "b.png") in str(info.value)


def test_truncated_jpeg_caught_by_load_image(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _dataset(root)
    full = tmp_path / "full.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full, quality=95)
    bad = root / "cat" / "cut.jpg"
    data = full.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    # The header (SOI, tables, SOF with the size) is intact, so the cheap header check can pass; only a full decode
    # sees the missing scan data.
    index = scan_image_folder(root)
    assert bad in index.files[0]
    with pytest.raises(UserError, match="truncated or corrupt") as info:
        load_image(bad)
    assert str(bad) in str(info.value)


def test_decompression_bomb(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    big = _save_rgb(root / "dog" / "big.png", size=(20, 20))  # 400 pixels on a few hundred bytes of disk
    with pytest.raises(UserError, match="decompression-bomb limit of 100 pixels") as info:
        scan_image_folder(root, max_pixels=100)
    assert str(big) in str(info.value) and "max_pixels" in str(info.value)
    with pytest.raises(UserError, match="decompression-bomb") as info:
        load_image(big, max_pixels=100)
    assert str(big) in str(info.value)
    assert load_image(big, max_pixels=400).size == (20, 20)
    assert MAX_IMAGE_PIXELS == 89_478_485 and Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS


def test_raised_limit_restores_pil_global(tmp_path: Path) -> None:
    path = _save_rgb(tmp_path / "a.png")
    before = Image.MAX_IMAGE_PIXELS
    load_image(path, max_pixels=10 * MAX_IMAGE_PIXELS)
    scan_image_folder(_dataset(tmp_path / "ds"), max_pixels=10 * MAX_IMAGE_PIXELS)
    assert Image.MAX_IMAGE_PIXELS == before


# --- class names -----------------------------------------------------------------------------------------------------


def test_hidden_class_folder_is_skipped(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    _save_rgb(root / "..something" / "0.png")
    _save_rgb(root / ".ipynb_checkpoints" / "0.png")
    index = scan_image_folder(root)
    assert index.classes == ["cat", "dog"]
    assert index.skipped_hidden == 2


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b", "a\0b", ".hidden", "", "tab\there"])
def test_unsafe_class_name_refused(name: str) -> None:
    with pytest.raises(UserError, match="unsafe") as info:
        validate_class_name(name, root="/data/x")
    assert repr(name) in str(info.value) and "/data/x" in str(info.value)


def test_backslash_class_folder_refused_by_scan(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    _save_rgb(root / "a\\b" / "0.png")  # a legal folder name on POSIX, a path on Windows
    with pytest.raises(UserError, match="path separator") as info:
        scan_image_folder(root)
    assert repr("a\\b") in str(info.value)


@pytest.mark.parametrize("name", ["cat", "golden_retriever", "n01440764", "Großer Hund", "a.b", "x..y"])
def test_safe_class_names_accepted(name: str, tmp_path: Path) -> None:
    assert validate_class_name(name, root=tmp_path) is None  # refused names raise UserError
    image = _save_rgb(tmp_path / "ds" / name / "0.png")
    _save_rgb(tmp_path / "ds" / "zzz" / "0.png")  # distillation needs two classes
    index = scan_image_folder(tmp_path / "ds")  # a folder of that name is a class, with its image
    assert index.classes == [name, "zzz"] and index.files[0] == [image] and index.skipped_hidden == 0


# --- accepted inputs -------------------------------------------------------------------------------------------------


def _write_mode_zoo(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    paths = {}
    paths["gray"] = folder / "gray.png"
    Image.new("L", (30, 20), 128).save(paths["gray"])
    paths["rgba"] = folder / "rgba.png"
    Image.new("RGBA", (20, 30), (255, 0, 0, 0)).save(paths["rgba"])  # fully transparent red -> white
    paths["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(paths["cmyk"])
    paths["palette"] = folder / "palette.png"
    pal = Image.new("P", (12, 12), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(paths["palette"], transparency=0)
    paths["gray16"] = folder / "gray16.png"
    Image.fromarray(np.full((10, 14), 65535, dtype=np.uint16)).save(paths["gray16"])
    paths["upper"] = folder / "UPPER.JPG"
    Image.new("RGB", (25, 25), (0, 0, 255)).save(paths["upper"], format="JPEG")
    paths["odd"] = folder / "odd.png"
    Image.new("RGB", (37, 53), (0, 128, 0)).save(paths["odd"])
    paths["la"] = folder / "la.png"
    Image.new("LA", (9, 9), (0, 0)).save(paths["la"])
    return paths


def test_accepted_modes_load_to_rgb_tensors(tmp_path: Path) -> None:
    paths = _write_mode_zoo(tmp_path / "ds" / "zoo")
    _dataset(tmp_path / "ds", classes=("other",))
    index = scan_image_folder(tmp_path / "ds")
    assert index.classes == ["other", "zoo"]
    assert {p.name for p in index.files[1]} == {p.name for p in paths.values()}
    for path in paths.values():
        img = load_image(path)
        assert img.mode == "RGB", path
        t = to_tensor(resize_center_crop(img, 16))
        assert t.shape == (3, 16, 16) and t.dtype == torch.float32, path
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert load_image(paths["gray16"]).getpixel((0, 0)) == (255, 255, 255)  # scaled from 16 bits, not clipped
    assert load_image(paths["rgba"]).getpixel((0, 0)) == (255, 255, 255)  # transparent composited on white
    assert load_image(paths["palette"]).getpixel((0, 0)) == (0, 255, 0)
    assert load_image(paths["la"]).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(paths["gray"]).getpixel((0, 0)) == (128, 128, 128)
    r, g, b = load_image(paths["cmyk"]).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60  # C=0 M=Y=255 is red
    batch = load_class_images(index, 1, 24)
    assert batch.shape == (len(paths), 3, 24, 24) and batch.dtype == torch.float32


def test_hidden_and_non_image_files_skipped(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    (root / "cat" / "notes.txt").write_text("hi")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    _save_rgb(root / "dog" / "._0000.png")  # macOS resource fork twin
    (root / "dog" / "nested").mkdir()
    (root / "README.md").write_text("dataset")
    index = scan_image_folder(root)
    assert index.num_classes == 2 and index.num_images == 4
    assert index.skipped_hidden == 2
    assert index.skipped_non_image == 3  # notes.txt, nested/, README.md
    assert index.root == root.absolute()
    assert index.files[0] == sorted(index.files[0], key=lambda p: p.name)


def test_extensions_lower_case() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS


# --- index operations ------------------------------------------------------------------------------------------------


def test_subset_and_split_hash(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", per_class=5)
    index = scan_image_folder(root, check_headers=False)
    first, second = index.subset(0, 2), index.subset(2, 5)
    assert [len(p) for p in first.files] == [2, 2] and [len(p) for p in second.files] == [3, 3]
    assert [p.name for p in second.files[0]] == ["0002.png", "0003.png", "0004.png"]
    assert first.classes == index.classes and isinstance(first, ImageFolderIndex)
    assert len({index.split_hash(), first.split_hash(), second.split_hash()}) == 3
    assert index.split_hash() == scan_image_folder(root).split_hash()

    before = index.split_hash()
    target = root / "cat" / "0001.png"
    target.write_bytes(target.read_bytes() + b"\0")  # same name, one byte longer
    assert index.split_hash() != before

    with pytest.raises(UserError, match="leaves it empty") as info:
        index.subset(5, 10)
    assert "'cat'" in str(info.value)
    with pytest.raises(ValueError):
        index.subset(3, 3)


# --- conversions -----------------------------------------------------------------------------------------------------


def test_tensor_round_trip_and_resize() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 53, 37) and t.dtype == torch.float32
    assert np.array_equal(np.asarray(to_pil(t)), np.asarray(img))
    assert to_pil(torch.full((3, 2, 2), 2.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped
    cropped = resize_center_crop(img, 32)
    assert cropped.size == (32, 32)
    assert resize_center_crop(Image.new("RGB", (100, 10)), 20).size == (20, 20)
    with pytest.raises(ValueError):
        to_tensor(Image.new("L", (4, 4)))
    with pytest.raises(ValueError):
        to_pil(torch.zeros(4, 4))


def test_display_name() -> None:
    assert display_name("golden_retriever") == "golden retriever"
    assert display_name("Great-White_Shark") == "great white shark"
    assert display_name("cat") == "cat"
