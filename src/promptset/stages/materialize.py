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
included; seed selection needs no teacher here, the chosen seeds are stored), and their sha256 is compared
with the one recorded when the set was made: on CPU at the same torch thread count they are equal bit for bit, so
the PNGs equal generate's files byte for byte (another device, dtype or torch version is reported, not refused). With
modes, image i of class c is drawn from the mode the stored mode weights spread it to, as generate drew it.
Everything is written under a temporary name and moved into place at the end: bad input, or a crash, leaves nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import PromptSet, images_sha256, save_tensors
from ..atomic import save_image, staged_dir, write_json
from ..backends import sampling
from ..backends.diversity import Diversity
from ..backends.sampling import Job, PromptConditioner
from ..config import make_config, opt
from ..data import quantize_pixels, to_pil
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
    with torch.no_grad():
        uncond = backend.encode_prompts([""]) if float(gen["guidance"]) != 1.0 else None
    report = {"file": str(packed.path), "content_sha256": packed.raw_meta["content_sha256"],
              "generator": packed.meta["generator"], "model": cfg.model, "model_hash": backend.model_hash,
              "fingerprint_matches": not mismatch, "forced": bool(mismatch), "device": str(backend.device),
              "rounds": []}
    if prompts.has_modes:  # each class's images were drawn from its modes by the stored weights (`modes.mode_of`)
        report["modes"] = {"prompts": prompts.num_prompts, "per_class": prompts.modes_per_class(),
                           "rule": gen.get("mode_rule")}
    with staged_dir(out) as tmp:
        for r in range(packed.rounds):
            seeds = packed.tensors["seeds"][r].tolist()
            jobs = [Job(k, i, int(seeds[k * per_class + i])) for k in range(c) for i in range(per_class)]
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
                                     "expected_sha256": want, "equal": got == want})
        write_json(tmp / "materialize.json", report)
    _say(report, out)
    return report


def _prepare(cfg: MaterializeConfig) -> tuple[PackedSet, object, PromptSet, Path, bool]:
    """Read and verify the file, the folder and the model; writes nothing."""
    from ..backends import create_backend

    if not cfg.file:
        raise UserError("FILE is required: promptset materialize FILE --model MODEL --out DIR")
    if not cfg.model:
        raise UserError("--model is required: the generator the set was made with (see the packed file's generator)")
    if not cfg.out:
        raise UserError("--out is required: a new (or empty) folder for the ImageFolder and its labels")
    if cfg.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; pass a new folder")
    packed = read_pack(cfg.file)
    expected = packed.meta["generator"]
    gen = packed.meta["generation"]
    Diversity.from_settings(gen)  # a guidance interval or CADS it cannot read is refused before anything is written
    backend = create_backend(expected["backend"], cfg.model, device=cfg.device, dtype=gen["dtype"],
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


def _say(report: dict, out: Path) -> None:
    lines = [f"materialize: wrote {out}"]
    for r in report["rounds"]:
        same = ("bit for bit equal to the images the set was made with" if r["equal"] else
                "NOT equal to the images the set was made with (expected off CPU, with another dtype or torch "
                "version, or with --force)")
        lines.append(f"  round {r['round']}: {r['images']} images in {out / r['folder']}, labels in "
                     f"{out / r['labels']}; {same}")
    if report["forced"]:
        lines.append("  --force: the model's fingerprint differs from the packed one")
    print("\n".join(lines), flush=True)
