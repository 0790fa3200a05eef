"""`promptset caption`: a caption per image, measured from its pixels, for `promptset pretrain --captions`.

Each caption keeps the class's caption word (`--class-names`, e.g. a coarse word for a class the generator should
not know by name) and adds what the pixels say: the object's and the background's colours, the object's size and
height, the background's texture, the brightness (see `promptset.captions`), and with `--teacher` the class the
teacher finds the image most like after its own ("looks like a ..."), when it gives that class at least
`--runner-up-min` probability. With a teacher it also measures how informative each attribute is: the share of the
within-class variance of the teacher's penultimate features that the attribute's words explain (eta squared),
beside the same with the words shuffled within each class (the chance level), in the stats file.

Writes the captions file (JSONL, or CSV when --out ends in .csv) and `<out>.stats.json` atomically, after every image
was read. Deterministic: no random draw but the seeded shuffle of the chance level.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_json, write_text
from ..captions import attribute_words, compose_caption, pixel_attributes, write_captions_text
from ..config import make_config, opt
from ..data import common_image_side, load_image, resize_center_crop, scan_image_folder, to_tensor
from ..devices import resolve_device
from ..errors import UserError
from ..progress import progress_bar
from ..runfolder import resolve_class_names
from ..seeding import derive_seed

ATTRIBUTES = ("size", "object", "height", "texture", "background", "brightness", "looks_like")


@dataclass
class CaptionConfig:
    data: str = opt("", "ImageFolder to caption (one folder per class)")
    out: str = opt("", "captions file to write: .jsonl (one {\"path\", \"caption\"} per line) or .csv (path,caption)")
    class_names: str = opt("", "caption word per class (JSON {folder: word} or one per line); default: folder names")
    teacher: str = opt("", "classifier NAME[@SIZE]:PATH.safetensors: adds 'looks like a <runner-up class>' and "
                       "measures how informative each attribute is (optional)")
    runner_up_min: float = opt(0.1, "say 'looks like a ...' only when the teacher gives the runner-up class at least "
                               "this probability")
    size: int = opt(0, "side the pixels are measured at (images are resized and center-cropped); 0 = the data's own "
                    "side when all images share it, else 32")
    batch_size: int = opt(256, "images per teacher forward pass")
    seed: int = opt(0, "seed of the within-class shuffle that gives the chance level of the informativeness")
    device: str = opt("auto", "torch device of the teacher")
    progress: bool = opt(True, "show progress bars")


def caption(cfg: CaptionConfig | None = None, **overrides) -> Path:
    """Caption every image of `cfg.data`; returns the captions file."""
    cfg = make_config(CaptionConfig, cfg, overrides, "caption")
    if not cfg.data:
        raise UserError("--data is required: the ImageFolder to caption")
    if not cfg.out:
        raise UserError("--out is required: the captions file to write (.jsonl or .csv)")
    out = Path(cfg.out)
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise UserError(f"--out {out}: name a .jsonl or .csv file")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name a .jsonl or .csv file")
    if not 0.0 <= cfg.runner_up_min <= 1.0:
        raise UserError(f"--runner-up-min must be in [0, 1], got {cfg.runner_up_min}")
    if cfg.size < 0 or cfg.batch_size < 1:
        raise UserError("--size must be >= 0 and --batch-size positive")
    index = scan_image_folder(cfg.data, flag="--data")
    words = resolve_class_names(index.classes, cfg.class_names)
    size = cfg.size or common_image_side(index) or 32
    teacher = None
    if cfg.teacher:
        from ..models import load_teacher

        teacher = load_teacher(cfg.teacher, num_classes=index.num_classes, device=resolve_device(cfg.device),
                               class_folders=index.classes)  # fmt: skip

    # ---- measure every image --------------------------------------------------------------------------------------
    files = [(c, p) for c, paths in enumerate(index.files) for p in paths]
    bar = progress_bar(total=len(files), desc="caption", unit="img", disable=not cfg.progress)
    images = []
    for _, p in files:
        images.append(to_tensor(resize_center_crop(load_image(p), size)))
        bar.update(1)
    bar.close()
    pixels = torch.stack(images)  # (N, 3, S, S) in [0, 1]
    labels = torch.tensor([c for c, _ in files])  # (N,)
    per_image = attribute_words(pixel_attributes(pixels))
    feats = None
    if teacher is not None:
        from ..models.teachers import teacher_features

        q = (pixels * 255).round().to(torch.uint8)  # (N, 3, S, S): what the files hold, as the teacher reads them
        feats, logits = teacher_features(teacher, q, cfg.batch_size)  # (N, D), (N, C)
        probs = logits.softmax(dim=1)
        probs[torch.arange(len(labels)), labels] = -1.0  # the runner-up: the most likely class but its own
        p2, c2 = probs.max(dim=1)
        for i, attrs in enumerate(per_image):
            attrs["looks_like"] = words[int(c2[i])] if float(p2[i]) >= cfg.runner_up_min else ""
    rows = [(p.relative_to(index.root).as_posix(), compose_caption(words[c], attrs))
            for (c, p), attrs in zip(files, per_image)]  # fmt: skip

    # ---- what the captions say, and how much each attribute tells about an image ----------------------------------
    stats = {
        "images": len(rows), "distinct_captions": len({c for _, c in rows}), "size": size,
        "classes": index.classes, "caption_words": words, "teacher": cfg.teacher or None,
        "runner_up_min": cfg.runner_up_min,
        "words": {a: dict(Counter(x.get(a, "") for x in per_image).most_common()) for a in ATTRIBUTES
                  if any(a in x for x in per_image)},
        "examples": [{"path": p, "caption": c} for p, c in rows[:: max(1, len(rows) // 20)][:20]],
    }  # fmt: skip
    if feats is not None:
        stats["informativeness"] = {
            a: informativeness(feats, labels, [x.get(a, "") for x in per_image], derive_seed(cfg.seed, "caption", a))
            for a in ATTRIBUTES
        }
    fmt = "csv" if out.suffix.lower() == ".csv" else "jsonl"
    write_text(out, write_captions_text(rows, fmt))
    stats_path = out.with_name(out.name + ".stats.json")
    write_json(stats_path, stats)
    print(f"caption: {len(rows)} images, {stats['distinct_captions']} distinct captions -> {out} (stats: "
          f"{stats_path.name})\n  e.g. {rows[0][1]!r}", flush=True)  # fmt: skip
    return out


def informativeness(features: torch.Tensor, labels: torch.Tensor, words: list[str], seed: int) -> dict:
    """eta^2 of the attribute's words on the features within classes, and its chance level (words shuffled)."""

    def eta2(assigned: list[str]) -> float:
        between = total = 0.0
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().flatten()
            x = features[idx].double()  # (n, D)
            centred = x - x.mean(0)
            total += float((centred**2).sum())
            groups: dict[str, list[int]] = {}
            for j, i in enumerate(idx.tolist()):
                groups.setdefault(assigned[i], []).append(j)
            for members in groups.values():
                between += len(members) * float((centred[members].mean(0) ** 2).sum())
        return between / total if total > 0 else 0.0

    g = torch.Generator().manual_seed(seed)
    shuffled = list(words)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten().tolist()
        perm = torch.randperm(len(idx), generator=g).tolist()
        for i, j in zip(idx, perm):
            shuffled[i] = words[idx[j]]
    return {"eta2": round(eta2(words), 5), "chance": round(eta2(shuffled), 5),
            "values": len(set(words))}  # fmt: skip
