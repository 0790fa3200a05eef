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
