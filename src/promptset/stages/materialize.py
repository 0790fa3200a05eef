"""`promptset materialize FILE --model MODEL --out DIR`: a packed set back into training data, with the same generator.

Writes, per round r of the packed set (generate's set has one; an evaluate entry with fresh images has several):

    DIR/round{r:02d}/images/<class>/<index>.png   an ImageFolder (classes in the packed order, files by index)
    DIR/round{r:02d}/labels.safetensors           `targets` (N,) int64 and, for soft labels, `soft_labels` (N, C)
                                                  fp32: the decoded logits of every image in ImageFolder order, as
                                                  DD-Ranking's `compute_metrics(image_path=..., soft_labels=...)`
                                                  takes them
    DIR/materialize.json                          what was checked and whether the images are the packed ones

The generator's fingerprint is checked first (a different model is refused, naming the one expected, unless
`--force`), the images are regenerated from the stored seeds with the stored settings (a guidance interval and CADS
included; seed selection needs no teacher here, the chosen seeds are stored), the CPU thread count they were made with
replayed (it can change the last bits; `threads.py`), and their sha256 is compared with the one recorded when the set
was made: on the same CPU model and torch they are equal bit for bit, so the PNGs equal generate's files byte for
byte. When they are not, the report says how far (how many images differ, from each image's recorded short hash;
with `--reference` the set's own images, the largest difference in uint8 levels and the share of pixels) and why
(each recorded condition that differs now: model forced, dtype, device or CPU model, torch version, thread count), in
the printed line and in `materialize.json`; another device, dtype or torch version is reported, not refused. With
modes, image i of class c is drawn from the mode the stored mode weights spread it to, as generate drew it.
Everything is written under a temporary name and moved into place at the end: bad input, or a crash, leaves nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import threads
from ..artifacts import PromptSet, image_digests, images_sha256, made_with, save_tensors
from ..atomic import save_image, staged_dir, write_json
from ..backends import sampling
from ..backends.diversity import Diversity
from ..backends.sampling import Job, PromptConditioner
from ..config import make_config, opt, require
from ..data import load_image, quantize_pixels, to_pil
from ..errors import UserError
from ..labelcodec import decode_soft_labels
from ..packfile import PackedSet, read_pack
from ..progress import progress_bar


@dataclass
class MaterializeConfig:
    file: str = opt("", "the packed set (a .safetensors file from `promptset pack`)", positional=True)
    model: str = opt("", "the generator the set was made with (a mini model folder; for sd a diffusers folder, "
                     ".safetensors checkpoint or Hub id)")
    out: str = opt("", "folder to write the ImageFolder(s) and labels into (must not exist, or be empty)")
    force: bool = opt(False, "regenerate even when --model's fingerprint differs from the packed one (the images "
                      "then differ from the set's)")
    device: str = opt("auto", "torch device (images match the packed ones bit for bit on CPU)")
    dtype: str = opt("", "regenerate in this dtype instead of the packed one (fp32, fp16, bf16; the images then "
                     "differ, and the report says by how much)")
    reference: str = opt("", "the set's own images to measure any difference against: generate's folder "
                         "(RUN/generated, for round 0) or an earlier materialize --out (every round)")
    batch_size: int = opt(32, "images per progress step (never changes the images)")
    progress: bool = opt(True, "show progress bars")


def materialize(cfg: MaterializeConfig | None = None, **overrides) -> dict:
    """Regenerate the packed set's images and write them with their decoded labels; returns materialize.json."""
    cfg = make_config(MaterializeConfig, cfg, overrides, "materialize")
    packed, backend, prompts, out, mismatch = _prepare(cfg)
    gen = packed.meta["generation"]
    classes = packed.meta["classes"]
    c, ipc, per_class, factor = len(classes), int(gen["ipc"]), int(gen["images_per_class"]), int(gen["factor"])
    soft = decode_soft_labels(packed.tensors, packed.raw_meta)  # (R, C*ipc, C) or None: the one decoder
    targets = torch.arange(c).repeat_interleave(ipc)  # (C*ipc,)
    conditioner = PromptConditioner(backend, prompts)
    recorded_threads = gen.get("cpu_threads") if backend.device.type == "cpu" else None
    causes = _causes(packed, backend, mismatch, cfg)
    with torch.no_grad():
        uncond = backend.encode_prompts([""]) if float(gen["guidance"]) != 1.0 else None
    report = {"file": str(packed.path), "content_sha256": packed.raw_meta["content_sha256"],
              "generator": packed.meta["generator"], "model": cfg.model, "model_hash": backend.model_hash,
              "fingerprint_matches": not mismatch, "forced": bool(mismatch), "device": str(backend.device),
              "dtype": cfg.dtype or gen["dtype"], "made_with": packed.meta.get("made_with"),
              "regenerated_with": made_with(backend.device) | {"cpu_threads": recorded_threads or threads.current()}
              if backend.device.type == "cpu" else made_with(backend.device), "differences": causes, "rounds": []}
    if prompts.has_modes:  # each class's images were drawn from its modes by the stored weights (`modes.mode_of`)
        report["modes"] = {"prompts": prompts.num_prompts, "per_class": prompts.modes_per_class(),
                           "rule": gen.get("mode_rule")}
    with staged_dir(out) as tmp:
        for r in range(packed.rounds):
            seeds = packed.tensors["seeds"][r].tolist()
            jobs = [Job(k, i, int(seeds[k * per_class + i])) for k in range(c) for i in range(per_class)]
            with threads.replay(recorded_threads):  # the thread count the images were made with
                patches = _regenerate(backend, conditioner, uncond, jobs, gen, cfg, desc=f"materialize round {r}")
            images = patches.view(c, per_class * factor**2, *patches.shape[2:])[:, :ipc].flatten(0, 1)  # (C*ipc, ...)
            folder = tmp / f"round{r:02d}"
            for n, (image, k) in enumerate(zip(images, targets.tolist())):
                save_image(folder / "images" / classes[k]["folder"] / f"{n - k * ipc:05d}.png", to_pil(image))
            tensors = {"targets": targets}
            if soft is not None:
                tensors["soft_labels"] = soft[r].contiguous()  # (C*ipc, C) fp32, ImageFolder order
            save_tensors(folder / "labels.safetensors", tensors,
                         {"format": "promptset.materialized-labels", "order": "ImageFolder order of images/",
                          "label_codec": packed.raw_meta.get("label_codec", "none"),
                          "class_folders": json.dumps([x["folder"] for x in classes])})
            got, want = images_sha256(images), packed.meta["image_sha256"][r]
            report["rounds"].append({"round": r, "images": len(images), "folder": f"round{r:02d}/images",
                                     "labels": f"round{r:02d}/labels.safetensors", "sha256": got,
                                     "expected_sha256": want, "equal": got == want,
                                     **_how_far(images, r, packed, classes, ipc, cfg)})
        write_json(tmp / "materialize.json", report)
    _say(report, out)
    return report


def _prepare(cfg: MaterializeConfig) -> tuple[PackedSet, object, PromptSet, Path, bool]:
    """Read and verify the file, the folder and the model; writes nothing."""
    from ..backends import create_backend

    if not cfg.file:
        raise UserError("FILE is required: promptset materialize FILE --model MODEL --out DIR")
    require(cfg, model="the generator the set was made with (see the packed file's generator)",
            out="a new (or empty) folder for the ImageFolder and its labels")
    if cfg.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; pass a new folder")
    packed = read_pack(cfg.file)
    expected = packed.meta["generator"]
    gen = packed.meta["generation"]
    if cfg.reference and not Path(cfg.reference).is_dir():
        raise UserError(f"--reference {cfg.reference} is not a folder; pass RUN/generated or an earlier materialize "
                        "--out")
    Diversity.from_settings(gen)  # a guidance interval or CADS it cannot read is refused before anything is written
    backend = create_backend(expected["backend"], cfg.model, device=cfg.device, dtype=cfg.dtype or gen["dtype"],
                             sampler=gen["sampler"])
    mismatch = backend.model_hash != expected["model_hash"]
    if mismatch and not cfg.force:
        raise UserError(
            f"{cfg.file} was made with {expected['backend']} model {expected['model_id']} (fingerprint "
            f"{expected['model_hash'][:12]}), but --model {cfg.model} has fingerprint {backend.model_hash[:12]}; pass "
            "that model, or --force to regenerate with this one anyway (the images will differ)"
        )
    backend.resolution = int(gen["resolution"])
    prompts = PromptSet.from_stored(packed.prompt_tensors(), packed.meta["prompts"], cfg.file)
    if [x["folder"] for x in packed.meta["classes"]] != prompts.class_folders:
        raise UserError(f"{cfg.file}: its class list and its prompts' classes differ; pack the run again")
    if backend.token_dim != prompts.embeddings.shape[-1]:
        raise UserError(f"{cfg.file} holds {prompts.embeddings.shape[-1]}-d prompt vectors; --model {cfg.model} "
                        f"takes {backend.token_dim}-d ones: pass the model the set was made with")
    return packed, backend, prompts, out, mismatch


def _regenerate(backend, conditioner, uncond, jobs: list[Job], gen: dict, cfg: MaterializeConfig,
                desc: str) -> torch.Tensor:
    """Patches of every job, (B, P, 3, S, S) uint8, exactly as generate and evaluate make them."""
    out = []
    bar = progress_bar(total=len(jobs), desc=desc, unit="img", disable=not cfg.progress, leave=False)
    for s in range(0, len(jobs), cfg.batch_size):
        batch = jobs[s : s + cfg.batch_size]
        patches = sampling.generate_batch(backend, conditioner, batch, steps=int(gen["steps"]),
                                          guidance=float(gen["guidance"]), factor=int(gen["factor"]),
                                          image_size=int(gen["image_size"]), uncond=uncond,
                                          micro_batch=int(gen["sampler_batch"]),
                                          diversity=Diversity.from_settings(gen))  # (B, P, 3, S, S) in [0, 1]
        out.append(quantize_pixels(patches))  # what generate's PNGs and evaluate's rounds hold
        bar.update(len(batch))
    bar.close()
    return torch.cat(out)


def _causes(packed: PackedSet, backend, mismatch: bool, cfg: MaterializeConfig) -> list[str]:
    """Every recorded condition of the set's making that differs in this regeneration (what can change a pixel)."""
    gen, made = packed.meta["generation"], packed.meta.get("made_with") or {}
    now = made_with(backend.device)
    causes = []
    if mismatch:
        causes.append(f"model: --force with fingerprint {backend.model_hash[:12]}, the set was made with "
                      f"{packed.meta['generator']['model_hash'][:12]}")
    if cfg.dtype and cfg.dtype != gen["dtype"]:
        causes.append(f"dtype: made in {gen['dtype']}, regenerated in {cfg.dtype} (--dtype)")
    if not made:
        causes.append("device and torch version: not recorded (a set packed by an older promptset)")
    for key, what in (("device", "device"), ("torch", "torch version")):
        if made.get(key) and made[key] != now[key]:
            causes.append(f"{what}: made with {made[key]}, regenerated with {now[key]}")
    if backend.device.type == "cpu" and "cpu_threads" not in gen and str(made.get("device", "cpu")).startswith("cpu"):
        causes.append(f"CPU threads: not recorded (a set made by an older promptset); regenerated with "
                      f"{threads.current()}")
    return causes


def _reference_images(cfg: MaterializeConfig, r: int, classes: list[dict], ipc: int) -> torch.Tensor | None:
    """The set's own round-r images from --reference, (C*ipc, 3, S, S) uint8 in ImageFolder order, or None."""
    if not cfg.reference:
        return None
    root = Path(cfg.reference)
    folder = root / f"round{r:02d}" / "images" if (root / "round00").is_dir() else (root if r == 0 else None)
    if folder is None or not folder.is_dir():
        return None
    images = []
    for c in classes:
        files = sorted((folder / c["folder"]).glob("*.png"))[:ipc]
        if len(files) < ipc:
            raise UserError(f"--reference {cfg.reference}: {folder / c['folder']} holds {len(files)} PNGs, the set "
                            f"has {ipc} per class; pass the folder the set's images are in")
        images += [torch.from_numpy(np.array(load_image(f), dtype=np.uint8)).permute(2, 0, 1) for f in files]
    return torch.stack(images)


def _how_far(images: torch.Tensor, r: int, packed: PackedSet, classes: list[dict], ipc: int,
             cfg: MaterializeConfig) -> dict:
    """How many images differ from the set's (each image's recorded short hash), and by how much (--reference)."""
    out: dict = {}
    recorded = (packed.meta.get("image_digests") or [None] * (r + 1))[r]
    if recorded:
        ours = image_digests(images)
        differ = sum(ours[8 * i : 8 * i + 8] != recorded[8 * i : 8 * i + 8] for i in range(len(images)))
        out["images_differing"] = int(differ)
    reference = _reference_images(cfg, r, classes, ipc)
    if reference is not None:
        if reference.shape != images.shape:
            raise UserError(f"--reference {cfg.reference}: images of shape {tuple(reference.shape[1:])}, the set's "
                            f"are {tuple(images.shape[1:])}; pass the folder the set's images are in")
        diff = (images.to(torch.int16) - reference.to(torch.int16)).abs()  # (N, 3, S, S)
        out.update(reference_images_differing=int((diff.flatten(1).amax(1) > 0).sum()),
                   max_level_difference=int(diff.max()) if diff.numel() else 0,
                   pixels_differing=float((diff.amax(1) > 0).float().mean()) if diff.numel() else 0.0)
    return out


def _say(report: dict, out: Path) -> None:
    lines = [f"materialize: wrote {out}"]
    for r in report["rounds"]:
        if r["equal"]:
            same = "bit for bit equal to the images the set was made with"
        else:
            n = r["images"]
            how = [f"{r['images_differing']} of {n} images differ" if "images_differing" in r else
                   "the set records no per-image hashes (packed by an older promptset)"]
            if "max_level_difference" in r:
                how.append(f"by at most {r['max_level_difference']} uint8 level(s), in {r['pixels_differing']:.2%} "
                           f"of the pixels (vs --reference)")
            else:
                how.append("pass --reference RUN/generated (or an earlier materialize --out) to measure by how much")
            why = "; ".join(report["differences"]) or ("no recorded condition differs (same model, dtype, device, "
                                                       "torch and thread count): the cause is not one promptset knows")
            same = f"NOT equal to the images the set was made with: {', '.join(how)}. Why: {why}"
        lines.append(f"  round {r['round']}: {r['images']} images in {out / r['folder']}, labels in "
                     f"{out / r['labels']}; {same}")
    print("\n".join(lines), flush=True)
