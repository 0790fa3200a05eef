"""Per-image captions: what `promptset caption` measures in an image's pixels, and the captions file pretrain reads.

A caption describes an image beyond its class, from its pixels alone (no captioning model is needed offline):

    "a photo of a distant white airplane at the top on a plain blue background, bright, looks like a vessel"

Pixel attributes (`pixel_attributes`, all on the image at its stored size):
    background  the per-channel median of a border ring (2 px at 32 px): its colour name
    object      pixels farther than a per-image threshold from the background colour (the central box when
                fewer than 4% are): the colour name of their distance-weighted mean
    size        the object's share of the image; brightness: the mean luminance; texture: the mean gradient
                magnitude outside the object; height: the object's vertical centroid (left and right are never
                described: pretrain also trains on mirror images, which share their image's caption)
Size, brightness and texture are named only at the ends of their distribution over the captioned set (the lowest
and highest third, quarter for brightness), so a word says "unusually so" for this dataset.

The captions file is JSONL (`{"path": "cat/0001.jpg", "caption": "..."}` per line, path relative to the data
folder) or CSV with a `path,caption` header; `read_captions` checks it against an ImageFolder.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

MAX_CAPTION_CHARS = 1000
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "grey", "black")
# `--describe random`: each attribute's words, one drawn uniformly per image ("" = the attribute is not named); the
# same words `promptset caption` writes. The version is recorded in the generation settings: another vocabulary or
# rule is another name, and a reader refuses a name it does not know.
DESCRIBE_VERSION = "pixel-words-1"
DESCRIBE_WORDS = {
    "size": ("", "distant", "close-up"), "object": COLOURS, "height": ("", "at the top", "at the bottom"),
    "texture": ("", "plain", "busy"), "background": COLOURS, "brightness": ("", "", "dark", "bright"),
}  # fmt: skip

# (name, hue range in degrees) for saturated colours; brown, white, grey and black are decided first
_HUES = (("red", 0, 15), ("orange", 15, 40), ("yellow", 40, 70), ("green", 70, 170), ("blue", 170, 260),
         ("purple", 260, 300), ("pink", 300, 340), ("red", 340, 361))  # fmt: skip


def colour_name(rgb: torch.Tensor) -> str:
    """A plain colour word for one RGB colour (3,) in [0, 1]."""
    r, g, b = (float(v) for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    sat = 0.0 if hi <= 1e-6 else (hi - lo) / hi
    if hi < 0.2:
        return "black"
    if sat < 0.18:
        return "white" if hi > 0.78 else ("grey" if hi > 0.35 else "black")
    d = hi - lo
    if hi == r:
        hue = 60 * (((g - b) / d) % 6)
    elif hi == g:
        hue = 60 * ((b - r) / d + 2)
    else:
        hue = 60 * ((r - g) / d + 4)
    if (hue < 50 or hue >= 340) and hi < 0.62:
        return "brown"
    return next(name for name, a, z in _HUES if a <= hue < z)


@dataclass
class PixelAttributes:
    """Per image (N,): background and object colours (N, 3) in [0, 1] and scalar measurements."""

    background: torch.Tensor  # (N, 3)
    object: torch.Tensor  # (N, 3)
    size: torch.Tensor  # (N,) object share of the image, in [0, 1]
    brightness: torch.Tensor  # (N,) mean luminance, in [0, 1]
    texture: torch.Tensor  # (N,) mean gradient magnitude outside the object
    height: torch.Tensor  # (N,) the object's vertical centroid, 0 = top, 1 = bottom


def pixel_attributes(images: torch.Tensor) -> PixelAttributes:
    """Measure `PixelAttributes` of images (N, 3, S, S) in [0, 1]."""
    n, _, s, _ = images.shape
    ring = max(1, s // 16)
    border = torch.ones(s, s, dtype=torch.bool)
    border[ring : s - ring, ring : s - ring] = False
    background = images[:, :, border].median(dim=2).values  # (N, 3)
    dist = (images - background[:, :, None, None]).norm(dim=1)  # (N, S, S)
    threshold = torch.clamp(0.5 * dist.flatten(1).quantile(0.9, dim=1), min=0.12)  # (N,)
    mask = dist > threshold[:, None, None]  # (N, S, S)
    box = torch.zeros(s, s, dtype=torch.bool)
    box[s // 4 : s - s // 4, s // 4 : s - s // 4] = True
    small = mask.flatten(1).float().mean(1) < 0.04  # (N,)
    mask = torch.where(small[:, None, None], box, mask)
    weight = mask.float() * dist.clamp_min(1e-3)  # (N, S, S)
    obj = (images * weight[:, None]).sum((2, 3)) / weight.sum((1, 2))[:, None]  # (N, 3)
    lum = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])  # (N, S, S)
    gy = (lum[:, 1:, :] - lum[:, :-1, :]).abs()[:, :, :-1]  # (N, S-1, S-1)
    gx = (lum[:, :, 1:] - lum[:, :, :-1]).abs()[:, :-1, :]
    outside = (~mask[:, :-1, :-1]).float()
    texture = ((gx + gy) * outside).sum((1, 2)) / outside.sum((1, 2)).clamp_min(1.0)
    rows = torch.linspace(0, 1, s)[None, :, None]  # (1, S, 1)
    height = (mask.float() * rows).sum((1, 2)) / mask.float().sum((1, 2)).clamp_min(1.0)
    return PixelAttributes(background, obj, mask.flatten(1).float().mean(1), lum.flatten(1).mean(1), texture, height)


def tercile_words(values: torch.Tensor, low: str, high: str, share: float = 1 / 3) -> list[str]:
    """`low` for the lowest `share` of values, `high` for the highest, "" between (ties broken by position)."""
    n = len(values)
    order = torch.sort(values, stable=True).indices
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    k = int(n * share)
    return [low if r < k else (high if r >= n - k else "") for r in rank.tolist()]


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def compose_caption(word: str, attrs: dict[str, str]) -> str:
    """One caption from the class's caption word and the attribute words (each may be "")."""
    noun = " ".join(w for w in (attrs.get("size", ""), attrs.get("object", ""), word) if w)
    text = f"a photo of {article(noun)} {noun}"
    if attrs.get("height"):
        text += f" {attrs['height']}"
    bg = " ".join(w for w in (attrs.get("texture", ""), attrs.get("background", "")) if w)
    if bg:
        text += f" on {article(bg)} {bg} background"
    if attrs.get("brightness"):
        text += f", {attrs['brightness']}"
    if attrs.get("looks_like"):
        text += f", looks like {article(attrs['looks_like'])} {attrs['looks_like']}"
    return text


def described_prompt(noun: str, seed: int) -> str:
    """`--describe random`: the caption pattern around `noun` (a class name, or `{token}`) with attribute words drawn
    from `seed` alone (an image's own seed), e.g. "a photo of a distant grey {token} on a busy blue background"."""
    from .seeding import derive_seed

    g = torch.Generator().manual_seed(derive_seed(seed, "describe"))
    attrs = {k: words[int(torch.randint(len(words), (1,), generator=g))] for k, words in DESCRIBE_WORDS.items()}
    return compose_caption(noun, attrs)


def attribute_words(attrs: PixelAttributes) -> list[dict[str, str]]:
    """Per image, the words of each pixel attribute (size, brightness, texture relative to the whole set)."""
    size = tercile_words(attrs.size, "distant", "close-up")
    bright = tercile_words(attrs.brightness, "dark", "bright", share=0.25)
    texture = tercile_words(attrs.texture, "plain", "busy")
    out = []
    for i in range(len(attrs.size)):
        h = float(attrs.height[i])
        out.append({
            "size": size[i], "object": colour_name(attrs.object[i]), "background": colour_name(attrs.background[i]),
            "texture": texture[i], "brightness": bright[i],
            "height": "at the top" if h < 0.4 else ("at the bottom" if h > 0.6 else ""),
        })  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# the captions file
def write_captions_text(rows: list[tuple[str, str]], fmt: str) -> str:
    """The file's text for (relative path, caption) rows: JSONL or CSV with a header."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
        return buf.getvalue()
    return "".join(json.dumps({"path": p, "caption": c}, ensure_ascii=False) + "\n" for p, c in rows)


def _parse(path: Path, flag: str) -> list[tuple[int, str, str]]:
    """(line number, relative path, caption) rows of a JSONL or CSV captions file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: file not found (JSONL or CSV of image path and caption)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path}: cannot read it as UTF-8 text ({err})") from None
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["path", "caption"]:
            raise UserError(f"{flag} {path}: a CSV captions file starts with the header 'path,caption'")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise UserError(f"{flag} {path}:{line}: {len(row)} columns; each row is path,caption (quote commas)")
            rows.append((line, row[0].strip(), row[1]))
        return rows
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UserError(f"{flag} {path}:{line}: not JSON ({err.msg}); each line is "
                            '{"path": "CLASS/FILE", "caption": "..."} (or pass a .csv with a path,caption '
                            "header)") from None  # fmt: skip
        fields = (obj.get("path"), obj.get("caption")) if isinstance(obj, dict) else (None, None)
        if not all(isinstance(x, str) for x in fields):
            raise UserError(f'{flag} {path}:{line}: needs string fields "path" and "caption"')
        rows.append((line, obj["path"].strip(), obj["caption"]))
    return rows


def read_captions(path: str | Path, data_root: Path, files: list[list[Path]], *, all_files: list[list[Path]],
                  flag: str = "--captions") -> list[list[str]]:  # fmt: skip
    """Per class, the caption of each of `files` (the images trained on), from a captions file.

    Every path must be an image of the data folder (`all_files`, which may hold more than `files`), named once;
    every image of `files` needs a non-empty caption of at most MAX_CAPTION_CHARS characters.
    """
    path = Path(path)
    known = {p.relative_to(data_root).as_posix() for paths in all_files for p in paths}
    captions: dict[str, str] = {}
    for line, rel, caption in _parse(path, flag):
        rel = rel.replace("\\", "/").removeprefix("./")
        if rel not in known:
            raise UserError(f"{flag} {path}:{line}: {rel!r} is not an image of --data {data_root}; paths are "
                            "relative to --data, e.g. CLASS/FILE.jpg")  # fmt: skip
        caption = " ".join(caption.split())
        if not caption:
            raise UserError(f"{flag} {path}:{line}: the caption of {rel} is empty; give every image a caption")
        if len(caption) > MAX_CAPTION_CHARS:
            raise UserError(f"{flag} {path}:{line}: the caption of {rel} is {len(caption)} characters, over "
                            f"{MAX_CAPTION_CHARS}; shorten it")  # fmt: skip
        if rel in captions and captions[rel] != caption:
            raise UserError(f"{flag} {path}:{line}: {rel} has a second, different caption; keep one per image")
        captions[rel] = caption
    out, missing = [], []
    for paths in files:
        row = []
        for p in paths:
            rel = p.relative_to(data_root).as_posix()
            if rel not in captions:
                missing.append(rel)
            row.append(captions.get(rel, ""))
        out.append(row)
    if missing:
        raise UserError(f"{flag} {path}: {len(missing)} training images have no caption (e.g. {missing[:3]}); "
                        "caption every image (`promptset caption --data DIR --out FILE`) or train on fewer "
                        "images")  # fmt: skip
    return out
