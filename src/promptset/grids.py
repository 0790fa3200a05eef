"""Sample grids a person can read: one row per class with its name on the left, small images enlarged (nearest
neighbour, so pixels stay pixels) until the grid is at least `MIN_WIDTH` pixels wide.
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

from .data import to_pil

MIN_WIDTH = 256  # pixels of images, not counting the label column
_PAD = 4


def labeled_grid(rows: list[torch.Tensor], names: list[str], min_width: int = MIN_WIDTH) -> Image.Image:
    """rows[c]: (n, 3, H, W) images in [0, 1] of class `names[c]` -> one RGB image, a labelled row per class."""
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    scale = max(1, math.ceil(min_width / (n * w)))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(draw.textlength(name, font=font)) for name in names) + 2 * _PAD
    row_h = max(h * scale, 14)
    grid = Image.new("RGB", (label_w + n * w * scale, row_h * len(rows)), "white")
    pen = ImageDraw.Draw(grid)
    for c, (images, name) in enumerate(zip(rows, names)):
        top = c * row_h
        pen.text((_PAD, top + row_h // 2), name, fill="black", font=font, anchor="lm")
        for i, image in enumerate(images):
            tile = to_pil(image).resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (label_w + i * w * scale, top))
    return grid


def captioned_grid(images: list[torch.Tensor], captions: list[str], columns: int = 2, scale: int = 3,
                   text_width: int = 300) -> Image.Image:  # fmt: skip
    """Images (3, H, W) in [0, 1], each enlarged `scale` times with its caption wrapped beside it, in `columns`."""
    import textwrap

    font = ImageFont.load_default()
    h, w = images[0].shape[-2:]
    chars = max(10, text_width // 6)
    cell_w, cell_h = w * scale + text_width + 3 * _PAD, max(h * scale, 14) + 2 * _PAD
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    pen = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        left, top = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(to_pil(image).resize((w * scale, h * scale), Image.NEAREST), (left + _PAD, top + _PAD))
        pen.multiline_text((left + w * scale + 2 * _PAD, top + _PAD), textwrap.fill(caption, chars), fill="black",
                           font=font, spacing=2)  # fmt: skip
    return grid
