"""Reading ImageFolder datasets (one subfolder per class) safely: validated up front, decoded to RGB tensors.

Bad input (a single class, corrupt or bomb images, unsafe class names) becomes a `UserError` naming the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from promptset.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
"""Lower-case file extensions read as images; matching is case-insensitive (`.JPG` counts)."""

MAX_IMAGE_PIXELS = 89_478_485
"""Decompression-bomb limit: images whose header claims more pixels (width * height) are refused before decoding.

Same value as PIL's default; override it per call with `max_pixels`.
"""

# Errors PIL raises for files it cannot identify or decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
_PIL_LIMIT_LOCK = threading.RLock()
_LAYOUT_HINT = "one subfolder per class with the images inside, e.g. {root}/cat/0001.png"
_MAX_LISTED_CLASSES = 5


@dataclass(frozen=True)
class ImageFolderIndex:
    """The classes and image files of an ImageFolder dataset, as found by `scan_image_folder`.

    Attributes:
        root: The dataset folder.
        classes: Class folder names, sorted.
        files: Per class, the image paths sorted by file name.
        skipped_hidden: Hidden entries (names starting with `.`) that were skipped.
        skipped_non_image: Skipped entries that are not images: other extensions, subfolders inside class folders,
            and loose files in the root.
    """

    root: Path
    classes: list[str]
    files: list[list[Path]]
    skipped_hidden: int = 0
    skipped_non_image: int = 0

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.files):
            raise ValueError(f"{len(self.classes)} classes but {len(self.files)} file lists")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def num_images(self) -> int:
        """Number of images over all classes."""
        return sum(len(paths) for paths in self.files)

    def split_hash(self) -> str:
        """A cheap fingerprint of the split: sha256 hex over the sorted relative paths and file sizes."""
        entries = sorted(
            (path.relative_to(self.root).as_posix(), path.stat().st_size) for paths in self.files for path in paths
        )
        digest = hashlib.sha256()
        for rel, size in entries:
            digest.update(f"{rel}\0{size}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def subset(self, start: int, stop: int) -> ImageFolderIndex:
        """Keep, per class, the files whose position in the sorted list is in `[start, stop)`.

        Used to split one folder into disjoint parts by file index (e.g. CIFAR-10: 0-2499 and 2500-4999).

        Raises:
            ValueError: If the range is negative or empty.
            UserError: If the range leaves a class with no images.
        """
        if not 0 <= start < stop:
            raise ValueError(f"subset needs 0 <= start < stop, got [{start}, {stop})")
        files = [paths[start:stop] for paths in self.files]
        for name, paths, kept in zip(self.classes, self.files, files):
            if not kept:
                raise UserError(
                    f"{self.root}: class folder '{name}' has {len(paths)} images, so the file-index range "
                    f"[{start}, {stop}) leaves it empty; add images or choose a range below {len(paths)}."
                )
        return ImageFolderIndex(self.root, list(self.classes), files, self.skipped_hidden, self.skipped_non_image)


def validate_class_name(name: str, *, flag: str = "--data", root: str | Path | None = None) -> None:
    """Refuse a class name that could escape a run folder or is unsafe as a file name.

    Class names become file and folder names in run outputs, so `..`, `.`, path separators, NUL and other control
    characters, a leading `.` and names that are not valid UTF-8 are refused.

    Raises:
        UserError: Naming the class and saying to rename its folder.
    """
    reason = None
    if not name:
        reason = "it is empty"
    elif name in (".", ".."):
        reason = "it refers to a folder itself, not a class"
    elif "/" in name or "\\" in name:
        reason = "it contains a path separator"
    elif "\0" in name:
        reason = "it contains a NUL character"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        reason = "it contains a control character"
    elif name.startswith("."):
        reason = "it starts with '.' (hidden)"
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            reason = "it is not valid UTF-8"
    if reason is not None:
        where = f"{flag} {root}" if root is not None else flag
        raise UserError(
            f"{where}: class folder name {name!r} is unsafe ({reason}); rename the folder to a plain name such as "
            "'golden_retriever' (class names become file names in the run folder)."
        )


def scan_image_folder(
    root: str | Path,
    *,
    flag: str = "--data",
    min_classes: int = 2,
    min_per_class: int = 1,
    check_headers: bool = True,
    max_pixels: int | None = None,
) -> ImageFolderIndex:
    """Index an ImageFolder dataset (`root/<class>/<image>`) and validate it before any compute is spent.

    Hidden entries and files with non-image extensions are skipped and counted. With `check_headers`, every image is
    opened to read its size (no decode): zero-byte files, files PIL cannot identify, and images over the
    decompression-bomb limit are refused. Truncated files can pass this check; `load_image` catches them.

    Args:
        root: The dataset folder, one subfolder per class.
        flag: The CLI flag or argument that named `root`, quoted in error messages.
        min_classes: Fewest class folders accepted.
        min_per_class: Fewest images accepted in each class folder.
        check_headers: Open every image to check that it is readable and within `max_pixels`.
        max_pixels: Decompression-bomb limit in pixels; `None` means `MAX_IMAGE_PIXELS`.

    Returns:
        The index of classes and files.

    Raises:
        UserError: Naming the flag and the offending path, and saying what to do.
    """
    root = Path(root).expanduser().absolute()
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    hint = _LAYOUT_HINT.format(root=root)
    if not root.exists():
        raise UserError(f"{flag} {root}: folder not found; pass the path of an ImageFolder dataset ({hint}).")
    if not root.is_dir():
        raise UserError(f"{flag} {root}: is a file, not a folder; pass the dataset folder ({hint}).")

    skipped_hidden = 0
    skipped_non_image = 0
    loose_images = 0
    class_names: list[str] = []
    for entry in _list_dir(root, flag):
        if entry.name.startswith("."):
            skipped_hidden += 1
        elif entry.is_dir():
            class_names.append(entry.name)
        else:
            skipped_non_image += 1
            loose_images += _has_image_extension(entry.name)
    class_names.sort()

    if not class_names:
        if loose_images:
            raise UserError(
                f"{flag} {root}: found {loose_images} images directly in the folder but no class subfolders; "
                f"move them into {hint}."
            )
        found = "folder is empty" if skipped_hidden + skipped_non_image == 0 else "no class subfolders found"
        raise UserError(f"{flag} {root}: {found}; an ImageFolder dataset has {hint}.")
    for name in class_names:
        validate_class_name(name, flag=flag, root=root)
    if len(class_names) < min_classes:
        listed = ", ".join(repr(n) for n in class_names[:_MAX_LISTED_CLASSES])
        if len(class_names) == 1:
            raise UserError(
                f"{flag} {root}: found a single class folder ({listed}); distillation needs at least "
                f"{max(min_classes, 2)} classes, so add {hint}."
            )
        raise UserError(
            f"{flag} {root}: found {len(class_names)} class folders ({listed}); at least {min_classes} are needed."
        )

    files: list[list[Path]] = []
    for name in class_names:
        folder = root / name
        paths: list[Path] = []
        for entry in _list_dir(folder, flag):
            if entry.name.startswith("."):
                skipped_hidden += 1
            elif entry.is_file() and _has_image_extension(entry.name):
                paths.append(folder / entry.name)
            else:
                skipped_non_image += 1
        if not paths:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(
                f"{flag} {folder}: class folder '{name}' contains no images (looked for {exts}); "
                "add images or remove the folder."
            )
        if len(paths) < min_per_class:
            raise UserError(
                f"{flag} {folder}: class folder '{name}' has {len(paths)} images but at least {min_per_class} "
                "are needed per class; add images or lower the requirement."
            )
        paths.sort(key=lambda p: p.name)
        files.append(paths)

    if check_headers:
        problems = [problem for paths in files for path in paths if (problem := _header_problem(path, limit))]
        if problems:
            message = f"{flag} {problems[0][1]}"
            if len(problems) > 1:
                others = len(problems) - 1
                message = f"{message[:-1]}; {others} more bad image file{'s' * (others > 1)}, e.g. {problems[1][0]}."
            raise UserError(message)

    return ImageFolderIndex(root, class_names, files, skipped_hidden, skipped_non_image)


def common_image_side(index: ImageFolderIndex, *, max_pixels: int | None = None) -> int | None:
    """The side every image of the folder shares when all are square and of one size (e.g. 32 for raw CIFAR-10),
    else None. Reads headers only: the resolution of the data, which the stored set keeps by default."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    sizes = set()
    for paths in index.files:
        for path in paths:
            with _pil_limit_at_least(limit), Image.open(path) as img:
                sizes.add(img.size)
            if len(sizes) > 1:
                return None
    (width, height), = sizes
    return width if width == height else None


def load_image(path: str | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Fully decode an image file to RGB.

    Grayscale (L, I;16, I, F) is replicated to three channels (16-bit and float data scaled from their range),
    transparency (LA, RGBA, palette with transparency) is composited on white, CMYK and YCbCr are converted, and the
    EXIF orientation is applied. The pixel count is checked against the limit from the header, before decoding.

    Args:
        path: The image file.
        max_pixels: Decompression-bomb limit in pixels; `None` means `MAX_IMAGE_PIXELS`.

    Returns:
        The decoded image, mode RGB.

    Raises:
        UserError: If the file is truncated, corrupt, not an image, over the limit, or in a color mode that cannot be
            converted; the message names the file and says to remove or replace it.
    """
    path = Path(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with _pil_limit_at_least(limit), Image.open(path) as img:
            if img.width * img.height > limit:
                raise UserError(_bomb_message(path, img.width, img.height, limit))
            img.load()
            img = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as err:
        if isinstance(err, Image.DecompressionBombError):
            raise UserError(_bomb_message(path, None, None, limit)) from err
        raise UserError(
            f"{path}: cannot decode image ({err}); the file is truncated or corrupt, remove or replace it."
        ) from err
    try:
        return _to_rgb(img)
    except ValueError as err:
        raise UserError(
            f"{path}: color mode {img.mode} cannot be converted to RGB ({err}); re-save the image as RGB "
            "(e.g. PNG or JPEG) or remove it."
        ) from err


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an RGB image to a float32 tensor of shape (3, H, W) in [0, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode}; load it with load_image")
    array = np.array(img, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)


def quantize_pixels(t: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] (any shape) to the uint8 values an image file stores: NaN as 0, clamped, rounded (on the CPU).

    `to_tensor` of the saved file gives back exactly `quantize_pixels(t).float() / 255`."""
    values = torch.nan_to_num(t.detach().to("cpu", torch.float32), nan=0.0)
    return values.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def to_pil(t: torch.Tensor) -> Image.Image:
    """Convert a (3, H, W) tensor in [0, 1] (or uint8 pixels) to an RGB image (rounded, clamped, uint8); inverse of
    `to_tensor`."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3, H, W) tensor, got shape {tuple(t.shape)}")
    pixels = t.detach().cpu() if t.dtype == torch.uint8 else quantize_pixels(t)
    array = pixels.permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(np.ascontiguousarray(array))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic), then center-crop to `size` x `size`."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def cut_patches(images: torch.Tensor, factor: int, size: int) -> torch.Tensor:
    """(B, 3, H, W) collages -> (B, k*k, 3, size, size): row-major patches, each resized to `size`."""
    b, c, h, w = images.shape
    ph, pw = h // factor, w // factor
    patches = images[:, :, : ph * factor, : pw * factor].unfold(2, ph, ph).unfold(3, pw, pw)  # (B, 3, k, k, ph, pw)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * factor * factor, c, ph, pw)
    if (ph, pw) != (size, size):
        patches = torch.nn.functional.interpolate(
            patches, size=(size, size), mode="bicubic", align_corners=False, antialias=True
        )
    return patches.clamp(0, 1).view(b, factor * factor, c, size, size)


def display_name(folder: str) -> str:
    """Human name of a class folder for prompts: underscores and hyphens become spaces, lower-case."""
    return " ".join(folder.replace("_", " ").replace("-", " ").split()).lower()


def load_class_images(
    index: ImageFolderIndex, class_idx: int, size: int, *, max_pixels: int | None = None
) -> torch.Tensor:
    """Load every image of one class as a (N, 3, size, size) float32 tensor in [0, 1]."""
    if not 0 <= class_idx < index.num_classes:
        raise IndexError(f"class_idx {class_idx} out of range for {index.num_classes} classes")
    images = [
        to_tensor(resize_center_crop(load_image(path, max_pixels=max_pixels), size)) for path in index.files[class_idx]
    ]
    return torch.stack(images)  # (N, 3, size, size)


def _list_dir(folder: Path, flag: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot list the folder ({err.strerror}); check its permissions.") from err


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _header_problem(path: Path, limit: int) -> tuple[Path, str] | None:
    """Open the file lazily (header only) and describe what is wrong with it, if anything."""
    try:
        if path.stat().st_size == 0:
            return path, f"{path}: empty file (0 bytes); remove or replace it."
        with _pil_limit_at_least(limit), Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        return path, _bomb_message(path, None, None, limit)
    except _DECODE_ERRORS as err:
        return path, f"{path}: not an image PIL can read ({err}); remove or replace it."
    if width * height > limit:
        return path, _bomb_message(path, width, height, limit)
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: high-bit-depth gray scaled to 8 bits, transparency composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # PIL's own I;16 -> RGB conversion clips at 255 instead of scaling, turning most pixels white.
        gray = np.asarray(img, dtype=np.float64)  # (H, W)
        peak = float(gray.max(initial=0.0))
        if img.mode == "F" and peak <= 1.0:
            full_scale = 1.0
        elif img.mode.startswith("I;16") or peak > 255.0:
            full_scale = 65535.0 if peak <= 65535.0 else peak
        else:
            full_scale = 255.0
        gray8 = np.clip(np.rint(gray * (255.0 / full_scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.repeat(gray8[:, :, None], 3, axis=2)))  # (H, W, 3)
    if img.mode[-1] in "Aa" or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _bomb_message(path: Path, width: int | None, height: int | None, limit: int) -> str:
    claimed = f"is {width}x{height} = {width * height:,} pixels" if width and height else "is too large"
    return (
        f"{path}: image {claimed}, over the decompression-bomb limit of {limit:,} pixels; if the file is trusted, "
        "raise the limit (max_pixels), otherwise remove it."
    )


@contextlib.contextmanager
def _pil_limit_at_least(limit: int) -> Iterator[None]:
    """Let PIL's own bomb check allow `limit` pixels for the duration, when the caller raised it above PIL's.

    PIL checks `Image.MAX_IMAGE_PIXELS` on open and in some decoders; we enforce our limit from the header ourselves,
    so PIL's global is only lifted (never lowered or disabled), under a lock, and restored afterwards.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or limit <= current:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def verify_images(
    index: ImageFolderIndex, *, max_pixels: int | None = None, progress: bool = True, flag: str = "--data"
) -> None:
    """Fully decode every image once, so a truncated file fails before any output is written.

    Raises:
        UserError: For the first bad file, its message prefixed with `flag` (the option that named the dataset).
    """
    from .progress import progress_bar

    paths = [p for files in index.files for p in files]
    for path in progress_bar(paths, desc="verify images", disable=not progress, unit="img", leave=False):
        try:
            load_image(path, max_pixels=max_pixels).close()
        except UserError as err:
            raise UserError(f"{flag} {err}") from err
