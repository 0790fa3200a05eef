"""Stored bytes per IPC, before anything exists: every method's components from `Method.planned_bytes` (the numbers
evaluate prints and checks against what it stores), and each component after `accounting.COMPRESSOR` estimated:
seeds exactly (they are a pure function of (seed, stage, class, index)), class names and prompt strings exactly when
the data folder is here, prompts and soft labels on stand-ins of the same shape and dtype (normal draws, encoded by
the same codec), raw images from a sample of the data folder (none without it).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from ..accounting import compressed_size, prompt_bytes, real_bytes, tensor_data
from ..evaluation.methods import METHODS, Context
from ..runfolder import ClassInfo
from ..seeding import derive_seed

STAND_IN_ROWS = 2048  # soft-label rows compressed to estimate a codec's ratio


def context(p, e, ipc: int) -> Context:
    """A `Context` as evaluate would build it for section `e` at `ipc`, without a run folder or a model."""
    c = p.data.classes
    folders = p.data.folders or [f"class{i:04d}" for i in range(c)]
    inv = p.invert_cfg
    dim = p.configs["text_encoder"]["hidden_size"]
    factor = e.factor or getattr(p, "factor", 0) or (p.select_cfg.factor if p.select_cfg else 1)
    rounds = math.ceil(e.epochs / e.regen_every) if e.regen_every else 1
    ctx = Context(cfg=e, run=Path("."), classes=[ClassInfo(i, f, f) for i, f in enumerate(folders)],
                  device=torch.device("cpu"), image_size=student_size(p, e), ipc=ipc, factor=factor, gen={},
                  teacher=None, needs_soft=e.protocol == "p1", rounds=rounds,
                  planned_prompt_bytes=prompt_bytes(p.num_prompts, inv.num_vectors, dim, inv.prompt_dtype,
                                                    inv.modes > 1))  # every mode's prompt, its class and weight
    ctx.train = SimpleNamespace(labels=range(sum(p.data.per_class)))  # `full` counts its images
    return ctx


def student_size(p, e) -> int:
    """Side of the student's images: --image-size, else the data the prompts were learned from (select's)."""
    return e.image_size or (p.select_cfg.resolution if p.select_cfg else 0) or 32


def _available(p, e) -> int:
    """Real training images per class random-real can draw from (select's --max-images-per-class without --train)."""
    limit = 0 if e.train or p.select_cfg is None else p.select_cfg.max_images_per_class
    return min(min(k, limit or k) for k in p.data.per_class)


def equal_bytes_ipc(p, e, target: str, ipc: int) -> int:
    """random-real@target's IPC as evaluate picks it: the largest whose stored bytes fit in target's, at least 1,
    at most the real images per class there are."""
    ctx = context(p, e, ipc)
    budget = sum(METHODS[target].planned_bytes(ctx, target).values())
    per_ipc = sum(METHODS["random-real"].planned_bytes(dataclasses.replace(ctx, ipc=1), "random-real").values())
    return min(max(1, budget // per_ipc), _available(p, e))


def stored_bytes(p) -> dict:
    """{"rows": [per protocol, IPC and method: array bytes and zlib estimate per component], "real": [...]}."""
    from ..stages.evaluate import parse_ipcs

    est = _Estimates(p)
    rows, real = [], []
    for e in p.evals:
        for ipc in parse_ipcs(e.ipc) or [p.gen_cfg.ipc if p.gen_cfg else 10]:
            ctx = context(p, e, ipc)
            for method in dict.fromkeys(m.strip() for m in e.method.split(",") if m.strip()):
                base, _, target = method.partition("@")
                at = dataclasses.replace(ctx, ipc=equal_bytes_ipc(p, e, target, ipc)) if target else ctx
                parts = METHODS[base].planned_bytes(at, base)
                packed = {k: est.compressed(k, v, at, base) for k, v in parts.items()}
                rows.append({"protocol": e.protocol, "ipc": ipc, "method": method, "method_ipc": at.ipc,
                             "components": parts, "bytes": sum(parts.values()),
                             "zlib": None if None in packed.values() else sum(packed.values())})
    size = context(p, p.evals[0], 1).image_size if p.evals else 32
    for ipc in sorted({r["ipc"] for r in rows}):
        raw = real_bytes(ipc, p.data.classes, size)
        ratio = est.image_ratio(size)
        real.append({"ipc": ipc, "raw": raw, "zlib": None if ratio is None else int(raw * ratio)})
    return {"rows": rows, "real": real, "image_size": size, "stand_ins": est.used}


class _Estimates:
    """Compressed sizes of components that do not exist yet (see the module docstring), cached per shape."""

    def __init__(self, p):
        self.p, self.cache, self.used = p, {}, set()

    def compressed(self, name: str, array_bytes: int, ctx: Context, method: str) -> int | None:
        if array_bytes == 0:
            return 0
        if name == "class_list":
            return compressed_size(["\n".join(c.folder for c in ctx.classes).encode()])
        if name == "prompt_strings":
            from ..evaluation.methods import class_prompt_strings

            return compressed_size([s.encode() for s in class_prompt_strings(ctx)])
        if name == "seeds":
            return self._seeds(ctx, method)
        if name == "images_raw":
            ratio = self.image_ratio(ctx.image_size)
            return None if ratio is None else int(array_bytes * ratio)
        key = (name, str(ctx.cfg.label_codec) if name.startswith("soft_labels") else self.p.invert_cfg.prompt_dtype,
               ctx.num_classes)
        if key not in self.cache:
            self.cache[key] = self._stand_in_ratio(name, ctx)
            self.used.add(name.split(".")[0])
        return int(array_bytes * self.cache[key])

    def _seeds(self, ctx: Context, method: str) -> int:
        per_class = math.ceil(ctx.ipc / ctx.factor**2)
        seed = self.p.gen_cfg.seed if self.p.gen_cfg else 0
        seeds = [derive_seed(seed, "generate" if r == 0 else f"eval-round{r}", c, i)
                 for r in range(ctx.rounds) for c in range(ctx.num_classes) for i in range(per_class)]
        return compressed_size([tensor_data(torch.tensor(seeds, dtype=torch.int32))])

    def _stand_in_ratio(self, name: str, ctx: Context) -> float:
        gen = torch.Generator().manual_seed(0)
        if name == "prompts":
            inv = self.p.invert_cfg
            dim = self.p.configs["text_encoder"]["hidden_size"]
            # one row per class (with modes too: the ratio per byte is what counts, and it stays quick)
            x = 0.015 * torch.randn(ctx.num_classes, inv.num_vectors, dim, generator=gen)  # CLIP token rows' scale
            if inv.prompt_dtype == "int8":
                data = tensor_data((x / x.abs().amax() * 127).round().to(torch.int8))
            else:
                data = tensor_data(x.to(torch.float16 if inv.prompt_dtype == "fp16" else torch.float32))
            return compressed_size([data]) / len(data)
        from ..labelcodec import encode_labels, parse_codec

        rows = STAND_IN_ROWS
        logits = 2.0 * torch.randn(rows, ctx.num_classes, generator=gen)  # (rows, C)
        parts, _ = encode_labels(logits, parse_codec(ctx.cfg.label_codec, ctx.num_classes))
        data = tensor_data(parts[name])
        return compressed_size([data]) / max(len(data), 1)

    def image_ratio(self, size: int) -> float | None:
        """zlib ratio of raw pixels at `size`, from the first image of up to 32 classes of the data folder."""
        if ("images", size) in self.cache:
            return self.cache[("images", size)]
        ratio = None
        if self.p.data.folders is not None:
            from ..data import load_image, resize_center_crop, scan_image_folder

            index = scan_image_folder(self.p.data.train_dir, flag="paths.train", check_headers=False)
            chunks = [resize_center_crop(load_image(files[0]), size).tobytes() for files in index.files[:32]]
            ratio = compressed_size(chunks) / sum(len(x) for x in chunks)
        self.cache[("images", size)] = ratio
        return ratio
