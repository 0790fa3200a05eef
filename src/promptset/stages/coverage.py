"""`promptset coverage`: how much of each class's real images a set of images covers, beside a random real set of the
same size, in a teacher's penultimate features (docs/DESIGN.md section 9): a cheap signal before any student is
trained.

Per class c, with m_c the set's images of c (all, or the first `--per-class` in file-name order):

    reference   m_c real images of c drawn at random (`--seed`) from `--real`
    real side   the other real images of c: both the set and the reference are measured against it, so the two rows
                share the same real balls, and a drawn image is never compared with itself
    metrics     precision, recall, density, coverage (k-NN balls, `--k`), the mean pairwise cosine distance within
                the set, and the teacher's top-1 on it (see `evaluation.coverage` for the exact definitions)

"overall" is the mean over classes. These metrics depend on the number of images, so the output states the counts,
and the reference always has the set's count per class. Writes `coverage.json` (default `RUN/coverage.json`, or
beside the `--images` folder) and `coverage.md` next to it, atomically, after everything was read and measured;
`report.md` shows the overall rows of a run's `coverage.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..atomic import write_json, write_text
from ..config import make_config, opt
from ..data import ImageFolderIndex, load_image, quantize_pixels, resize_center_crop, scan_image_folder, to_tensor
from ..devices import resolve_device
from ..errors import UserError
from ..evaluation.coverage import (
    FORMAT,
    FORMAT_VERSION,
    METRICS,
    count_text,
    markdown_table,
    mean_over_classes,
    pairwise_cosine_distance,
    prdc,
)
from ..evaluation.results import now, versions
from ..progress import progress_bar
from ..runfolder import artifact_metadata, check_same_classes, require_classes, select_info, stage_config
from ..seeding import derive_seed

if TYPE_CHECKING:
    from ..models.teachers import Teacher


@dataclass
class CoverageConfig:
    run: str = opt("", "run folder: measures RUN/generated (unless --images), takes the class order from its "
                   "classes.json and writes RUN/coverage.json", positional=True)
    images: str = opt("", "ImageFolder of the set to measure (default: RUN/generated), e.g. a materialized round's "
                      "DIR/round00/images; one subfolder per class")
    real: str = opt("", "ImageFolder of real images of the same classes (e.g. the test split): a random part per "
                    "class is the reference, the rest the real side both are measured against")
    teacher: str = opt("", "teacher whose penultimate features are compared: NAME[@SIZE]:PATH.safetensors or the PATH "
                       "of a `promptset teacher` file (default: the run's teacher)")
    k: int = opt(5, "k of the k-NN balls (a set of n <= k images uses k = n - 1)")
    per_class: int = opt(0, "measure only the first N images per class of --images, in file-name order (0 = all)")
    seed: int = opt(0, "seed of the random real reference (which real images of each class are drawn)")
    out: str = opt("", "the JSON file to write, coverage.md beside it (default: RUN/coverage.json, else "
                   "coverage.json beside the --images folder)")
    device: str = opt("auto", "torch device of the teacher")
    batch_size: int = opt(256, "images per teacher forward pass (an image's features never depend on the others "
                          "in its batch)")
    progress: bool = opt(True, "show progress bars")


@dataclass
class _Plan:
    images: ImageFolderIndex
    real: ImageFolderIndex
    classes: list[str]  # class folders in the teacher's order
    files: list[list[Path]]  # per class, the set's images measured
    reference: list[list[int]]  # per class, indices into real.files[c] of the random real reference
    rest: list[list[int]]  # per class, indices of the real side
    teacher: Teacher
    teacher_from: str
    size: int
    out: Path
    run: Path | None


def coverage(cfg: CoverageConfig | None = None, **overrides) -> dict:
    """Measure the set against the real images, write coverage.json and coverage.md, print the table; returns the
    JSON dict."""
    cfg = make_config(CoverageConfig, cfg, overrides, "coverage")
    plan = _prepare(cfg)
    total = sum(len(f) for f in plan.files) + sum(len(f) for f in plan.real.files)
    bar = progress_bar(total=total, desc="coverage: teacher features", unit="img", disable=not cfg.progress)
    rows, dim = [], 0
    for c, folder in enumerate(plan.classes):
        feats, top1 = _features(plan, plan.files[c], c, cfg.batch_size, bar)  # (m, D), (m,) bool
        real, real_top1 = _features(plan, plan.real.files[c], c, cfg.batch_size, bar)  # (n, D), (n,) bool
        dim = feats.shape[1]
        side = real[plan.rest[c]]  # (n - m, D)
        ref = plan.reference[c]
        measured = {"set": (feats, top1), "reference": (real[ref], real_top1[ref])}
        row = {"class": folder, "index": c, "images": len(feats), "real": len(side),
               "reference_files": [plan.real.files[c][i].name for i in ref]}
        for key, (x, correct) in measured.items():
            m = prdc(side, x, cfg.k)
            row["k_real"], row["k_images"] = m["k_real"], m["k_fake"]
            row[key] = {**{name: m[name] for name in ("precision", "recall", "density", "coverage")},
                        "pairwise_cosine": pairwise_cosine_distance(x),
                        "teacher_top1": correct.double().mean().item()}
        rows.append(row)
    bar.close()
    result = _result(cfg, plan, rows, dim)
    text = _markdown(result)
    md = plan.out.with_suffix(".md")
    write_json(plan.out, result)
    write_text(md, text)
    print(text + f"\ncoverage: wrote {plan.out} and {md}", flush=True)
    return result


def _features(plan: _Plan, paths: list[Path], c: int, chunk: int, bar) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (N, D), the teacher names class c (N,) bool) of image files, read at its input size."""
    from ..models.teachers import teacher_features

    feats, correct = [], []
    for s in range(0, len(paths), chunk):
        part = paths[s : s + chunk]
        pixels = torch.stack([quantize_pixels(to_tensor(resize_center_crop(load_image(p), plan.size)))
                              for p in part])  # (B, 3, S, S) uint8, what an image file holds
        f, logits = teacher_features(plan.teacher, pixels, chunk)  # (B, D), (B, C)
        feats.append(f)
        correct.append(logits.argmax(dim=1) == c)
        bar.update(len(part))
    return torch.cat(feats), torch.cat(correct)


def _prepare(cfg: CoverageConfig) -> _Plan:
    """Check every input and draw the reference; reads only, so bad input leaves nothing written."""
    from ..models import load_teacher
    from ..models.teachers import require_input_size, teacher_features

    if cfg.k < 1:
        raise UserError(f"--k {cfg.k}: the k-NN balls need k of at least 1 (5 is usual)")
    if cfg.per_class < 0:
        raise UserError(f"--per-class {cfg.per_class}: pass a positive number of images per class, or 0 for all")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: must be positive")
    if not cfg.real:
        raise UserError("--real is required: an ImageFolder of real images of the same classes (e.g. the test split)")
    run = Path(cfg.run) if cfg.run else None
    if run is None and not cfg.images:
        raise UserError("pass --run RUN (its generated/ images) or --images DIR (an ImageFolder of the set)")
    order = [c.folder for c in require_classes(run)] if run is not None else None
    if cfg.images:
        images_root, flag = Path(cfg.images), "--images"
    else:
        images_root, flag = run / "generated", "--run"
        if not images_root.is_dir():
            raise UserError(f"--run {run}: {images_root} not found; run `promptset generate --run {run}` first, or "
                            "pass --images DIR")
    images = scan_image_folder(images_root, flag=flag, min_classes=1)
    if order is not None:
        check_same_classes(order, images.classes, f"{flag} {images_root}",
                           "pass the images of this run's classes, one subfolder per class")
    classes = order or images.classes
    real = scan_image_folder(cfg.real, flag="--real", min_classes=1)
    if real.classes != classes:
        missing = [c for c in classes if c not in real.classes]
        extra = [c for c in real.classes if c not in classes]
        raise UserError(f"--real {real.root}: its class folders differ from those of {flag} {images_root} (missing "
                        f"{missing[:10]}, not in {flag}: {extra[:10]}); pass a real ImageFolder with exactly these "
                        f"class subfolders: {classes[:10]}{' ...' if len(classes) > 10 else ''}")
    files = [f[: cfg.per_class] if cfg.per_class else f for f in images.files]
    reference, rest = [], []
    for c, folder in enumerate(classes):
        n, m = len(real.files[c]), len(files[c])
        if n < m + 2:
            raise UserError(f"--real {real.root / folder}: {n} real images, but the reference draws {m} (as many as "
                            f"the set has) and at least 2 must remain to measure against; pass a larger real folder "
                            f"or fewer images with --per-class (at most {max(n - 2, 0)})")
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "coverage-reference", folder))
        perm = torch.randperm(n, generator=g).tolist()
        reference.append(sorted(perm[:m]))
        rest.append(sorted(perm[m:]))
    spec, teacher_from = cfg.teacher, "--teacher"
    if not spec and run is not None:
        spec, teacher_from = _run_teacher(run)
    if not spec or spec.strip().lower() == "none":
        raise UserError("--teacher is required: NAME[@SIZE]:PATH.safetensors (e.g. resnet20:cifar10_resnet20."
                        "safetensors) or a `promptset teacher` file, trained on these classes"
                        + (f" ({run} names no teacher)" if run is not None else ""))
    teacher = load_teacher(spec, num_classes=len(classes), device=resolve_device(cfg.device), class_folders=classes)
    size = require_input_size(teacher, "coverage")
    try:
        teacher_features(teacher, torch.zeros(1, 3, size, size, dtype=torch.uint8), 1)
    except RuntimeError as err:
        raise UserError(f"teacher {spec} does not take {size} px images ({str(err).splitlines()[0]}); name its "
                        "input size as NAME@SIZE:PATH") from None
    if cfg.out:
        out = Path(cfg.out)
    else:
        out = run / "coverage.json" if run is not None else images.root.parent / "coverage.json"
    if out.suffix.lower() == ".md":
        raise UserError(f"--out {out}: pass the JSON file's path (e.g. {out.with_suffix('.json')}); the table goes "
                        "beside it as .md")
    if out.is_dir() or out.with_suffix(".md").is_dir():
        raise UserError(f"--out {out}: a folder is in the way; pass the path of a JSON file, e.g. "
                        f"{out / 'coverage.json'}")
    return _Plan(images, real, classes, files, reference, rest, teacher, teacher_from, size, out, run)


def _run_teacher(run: Path) -> tuple[str, str]:
    """(spec, where it was found) of the teacher a run used: its soft labels', generate's, else select's."""
    found = [(artifact_metadata(run, "labels.safetensors").get("teacher"), "labels.safetensors"),
             (stage_config(run, "generate").get("teacher"), "generate's config"),
             (select_info(run).get("teacher"), "select.json")]
    return next(((s, f"{w} in {run}") for s, w in found if s and str(s).lower() != "none"), ("", ""))


def _result(cfg: CoverageConfig, plan: _Plan, rows: list[dict], dim: int) -> dict:
    images = [r["images"] for r in rows]
    real = [r["real"] for r in rows]
    overall = {key: mean_over_classes([r[key] for r in rows]) for key in ("set", "reference")}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "images": str(plan.images.root),
        "real": str(plan.real.root),
        "run": str(plan.run.absolute()) if plan.run is not None else None,
        "teacher": {"spec": plan.teacher.spec, "from": plan.teacher_from, "sha256": plan.teacher.weights_sha256,
                    "input_size": plan.size, "feature_dim": dim,
                    "features": "input of the final linear layer (penultimate), raw (not L2-normalised)"},
        "k": cfg.k,
        "seed": cfg.seed,
        "per_class": cfg.per_class,
        "definitions": {
            "distance": "Euclidean on the raw penultimate features, exact in float64",
            "inside": "a point at distance <= a ball's radius is inside it (ties count)",
            "radius": "distance to the k-th nearest other point of the same set; k = n - 1 when a set has n <= k "
                      "points (k_real, k_images per class), none for one point (its metrics are null)",
            "real_side": "the real images of the class not drawn for the reference; the set and the reference are "
                         "both measured against it",
            "reference": "per class, as many real images as the set has, drawn at random with the seed "
                         "(reference_files)",
            "order": "the first per_class images of each class of --images in file-name order (all when 0)",
            "overall": "mean over the classes that define the metric (overall.classes counts them)",
        },
        "counts": {"images": count_text(min(images), max(images)), "real": count_text(min(real), max(real)),
                   "images_total": sum(images), "real_total": sum(real)},
        "classes": rows,
        "overall": {"set": overall["set"]["means"], "reference": overall["reference"]["means"],
                    "classes": {"set": overall["set"]["classes"], "reference": overall["reference"]["classes"]}},
        "metrics": list(METRICS),
        "versions": versions(),
        "finished_at": now(),
    }


def _markdown(result: dict) -> str:
    t, c = result["teacher"], result["counts"]
    source = "" if t["from"] == "--teacher" else f" (from {t['from']})"
    small = [f"{r['class']} (real side k = {r['k_real']}, images k = {r['k_images']})"
             for r in result["classes"] if min(r["k_real"], r["k_images"]) < result["k"]]
    lines = [
        f"# Coverage of {result['images']}",
        "",
        f"Against the real images in {result['real']}, in the penultimate features of teacher {t['spec']}{source} "
        f"({t['feature_dim']}-d, images at {t['input_size']} px; Euclidean on raw features, a point on a ball's "
        f"radius counts as inside), k = {result['k']}. Per class: {c['images']} images of the set and as many random "
        f"real images (seed {result['seed']}), both against the remaining {c['real']} real images of the class. "
        "These metrics depend on the number of images: compare only sets of equal size. Overall = mean over classes.",
    ]
    if small:
        lines += ["", "Too few images for k: " + "; ".join(small) + "."]
    return "\n".join([*lines, "", markdown_table(result)])
