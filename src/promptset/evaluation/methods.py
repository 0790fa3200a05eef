"""The methods evaluate compares, each a builder of the set a student trains on plus its stored bytes.

`d3m` (the run's prompts), `class-prompt` (the engineered "a photo of a {name}" through the same generator), `rded`
(the run's selected collages, stored as images), `random-real` (ipc real images per class drawn with each student
seed) and `full` (all of --train). Generated images depend only on (gen seed, round, class, index), never on the
student seed: they are what a user would store (prompts + seeds), so every student seed trains on the same set.
Under DDP the ranks split the generation of every round and the teacher's labels and exchange them.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import threads
from ..accounting import SEED_BYTES, check_stored_bytes, class_list_bytes, compressed_size, tensor_data
from ..artifacts import PromptSet, image_digests, images_sha256, load_tensors, made_with, save_tensors, sha256_bytes
from ..atomic import read_jsonl
from ..backends import sampling
from ..backends.diversity import Diversity
from ..backends.sampling import Job, PromptConditioner, TextConditioner, class_prompts, generation_settings, jobs_for
from ..data import ImageFolderIndex, cut_patches, load_class_images, load_image, scan_image_folder, to_tensor
from ..dist import all_gather_rows, ddp_world, span
from ..errors import UserError
from ..labelcodec import LabelCodec, decode_soft_labels, encode_labels, parse_codec, planned_bytes
from ..modes import MODE_RULE
from ..progress import progress_bar
from ..runfolder import ClassInfo, check_same_classes
from ..seeding import derive_seed
from .results import GENERATIVE
from .rounds import generate_rounds, to_uint8
from .student import TrainSet


@dataclass
class RealFolder:
    """A real ImageFolder loaded at one resolution: its index, images (N, 3, S, S) uint8 and labels (N,)."""

    index: ImageFolderIndex
    images: torch.Tensor
    labels: torch.Tensor
    split_hash: str


REAL_CACHE_SIZE = 4  # real splits kept loaded per process (a test and a train split, at two sizes)
_FOLDERS: OrderedDict[tuple[str, int, int, str], RealFolder] = OrderedDict()  # least recently used first


def load_real_folder(
    root: str | Path, size: int, flag: str, classes: list[ClassInfo], limit: int = 0, progress: bool = True
) -> RealFolder:
    """Scan `root`, check its classes against classes.json, and load it at `size` px.

    The last `REAL_CACHE_SIZE` splits loaded stay in memory, so evaluating many runs in one process reads the test
    split once; the least recently used is dropped first.
    """
    index = scan_image_folder(root, flag=flag, check_headers=False)
    check_same_classes(
        [c.folder for c in classes],
        index.classes,
        f"{flag} {root}",
        f"pass a folder with exactly these class subfolders: {[c.folder for c in classes][:10]}",
    )
    if limit:
        index = index.subset(0, limit)
    split_hash = index.split_hash()
    key = (str(index.root), size, limit, split_hash)
    if key in _FOLDERS:
        _FOLDERS.move_to_end(key)
    else:
        images, labels = [], []
        classes_bar = progress_bar(range(index.num_classes), desc=f"load {flag}", unit="class", disable=not progress,
                                   leave=False)
        for c in classes_bar:
            x = load_class_images(index, c, size)  # (n_c, 3, S, S) in [0, 1], exact multiples of 1/255
            images.append(to_uint8(x))
            labels.append(torch.full((len(x),), c, dtype=torch.long))
        _FOLDERS[key] = RealFolder(index, torch.cat(images), torch.cat(labels), split_hash)
        while len(_FOLDERS) > REAL_CACHE_SIZE:
            _FOLDERS.popitem(last=False)
    return _FOLDERS[key]


@dataclass
class Distilled:
    """What one method trains on: rounds of samples, and what storing it costs."""

    rounds: list[TrainSet]
    components: dict[str, int]  # stored bytes per component
    ipc: int | None
    info: dict = field(default_factory=dict)
    png_bytes: int | None = None
    compressed: dict[str, int] = field(default_factory=dict)  # per component, after accounting.COMPRESSOR

    @property
    def stored_bytes(self) -> int:
        return sum(self.components.values())


@dataclass
class Context:
    """Resolved inputs shared by every method of one evaluate call (built by the evaluate stage)."""

    cfg: object  # the EvaluateConfig
    run: Path
    classes: list[ClassInfo]
    device: torch.device
    image_size: int
    ipc: int
    factor: int
    gen: dict  # backend, model, resolution, steps, guidance, sampler, seed, sampler_batch, dtype (resolved),
    # model_config, prediction_type; guidance_interval, cads, selection only when on (`Diversity.settings`)
    teacher: torch.nn.Module | None
    needs_soft: bool  # P1: the teacher's logits are stored with every sample
    rounds: int
    train: RealFolder | None = None  # --train, for random-real and full
    planned_prompt_bytes: int | None = None  # d3m's prompt bytes before prompts.safetensors exists (run --plan)
    _backend: object = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def backend(self):
        if self._backend is None:
            from ..backends import create_backend

            if not self.gen["backend"] or not self.gen["model"]:
                raise UserError(
                    f"{self.run} does not say which generator made it (no invert section in config.yaml); "
                    "pass --backend and --model"
                )
            self._backend = create_backend(
                self.gen["backend"], self.gen["model"], device=self.cfg.device, dtype=self.gen["dtype"],
                sampler=self.gen["sampler"], model_config=self.gen["model_config"],
                prediction_type=self.gen["prediction_type"],
            )
            if self.gen["resolution"]:
                self._backend.resolution = int(self.gen["resolution"])
        return self._backend

    def generation_settings(self, prompts: PromptSet) -> dict:
        """What changes a pixel of the d3m images evaluate makes, in the form `generate` records them."""
        explicit = self.cfg.backend or self.cfg.model  # another model than the prompts were learned on
        return self.generation_settings_for(
            self.backend().model_hash if explicit else prompts.model_hash, prompts.content_hash(), prompts.template,
            MODE_RULE if prompts.has_modes else "",
        )

    def generation_settings_for(self, model_hash: str, prompts_hash: str = "", template: str = "",
                                mode_rule: str = "") -> dict:
        return generation_settings(
            prompts_hash=prompts_hash, template=template, model_hash=model_hash, steps=self.gen["steps"],
            guidance=self.gen["guidance"], sampler=self.gen["sampler"], seed=self.gen["seed"],
            resolution=self.gen["resolution"] or self.backend().resolution, factor=self.factor,
            image_size=self.image_size, dtype=self.gen["dtype"], sampler_batch=self.gen["sampler_batch"],
            compile=False, mode_rule=mode_rule, diversity=Diversity.from_settings(self.gen),
            cpu_threads=threads.current() if self.device.type == "cpu" else None,
        ) | self.selection()

    def selection(self) -> dict:
        """Seed selection's part of the generation settings, as generate records it ({} without selection)."""
        g = int(getattr(self.cfg, "candidates", 1) or 1)
        return {} if g == 1 else {"candidates": g, "selection_teacher": self.teacher.weights_sha256}


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The teacher's logits on uint8 images (N, 3, S, S), computed on the images' device: (N, C) fp32."""
    out = [teacher(images[s : s + batch_size].float().div_(255)).float() for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def shared_teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`teacher_logits` of every image, each rank labelling its `span` slice; every rank gets them all."""
    rank, world = ddp_world()
    if world == 1:
        return teacher_logits(teacher, images)
    lo, hi = span(len(images), rank, world)
    part = teacher_logits(teacher, images[lo:hi]) if hi > lo else torch.zeros(0, num_classes, device=images.device)
    return all_gather_rows(part, len(images))


def label_codec(ctx: Context) -> LabelCodec:
    """The `--label-codec` soft labels are stored with (checked against the class count)."""
    return parse_codec(ctx.cfg.label_codec, ctx.num_classes)


def label_bytes(ctx: Context, samples: int) -> dict[str, int]:
    """Stored bytes of the soft labels of `samples` patches, per stored tensor of the codec (P1 only)."""
    if not ctx.needs_soft:
        return {}
    return planned_bytes(label_codec(ctx), samples, ctx.num_classes)


def stored_soft_labels(ctx: Context, logits: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """Encode logits (..., C) with the codec and decode them again: (stored tensors, their metadata, the logits the
    student trains on), so what evaluate trains on is exactly what a receiver of the stored set decodes."""
    encoded, meta = encode_labels(logits, label_codec(ctx))
    return encoded, meta, decode_soft_labels(encoded, meta)


def plan_generative(ctx: Context, method: str) -> dict[str, int]:
    """Stored bytes of d3m / class-prompt, known before any image is generated."""
    c, per_class = ctx.num_classes, math.ceil(ctx.ipc / ctx.factor**2)
    if method == "d3m":
        stored = ctx.planned_prompt_bytes
        parts = {
            "prompts": PromptSet.load(ctx.run / "prompts.safetensors").stored_bytes() if stored is None else stored,
            "class_list": class_list_bytes([x.folder for x in ctx.classes]),
        }
    else:
        parts = {"prompt_strings": sum(len(p.encode("utf-8")) for p in class_prompt_strings(ctx))}
    parts["seeds"] = ctx.rounds * c * per_class * SEED_BYTES  # int32 per generated image per round
    parts.update(label_bytes(ctx, ctx.rounds * c * ctx.ipc))
    return parts


def class_prompt_strings(ctx: Context) -> list[str]:
    return class_prompts([x.name for x in ctx.classes], ctx.cfg.class_prompt)


def build_generative(ctx: Context, method: str) -> Distilled:
    """Rounds of images regenerated from the prompts (images stay on the device, never written as PNG)."""
    c, p = ctx.num_classes, ctx.factor**2
    per_class = math.ceil(ctx.ipc / p)
    labels = torch.arange(c).repeat_interleave(ctx.ipc)  # (C*K,)
    rounds, seeds, logits, hashes, top1, entropy, reused = [], [], [], [], [], [], False
    made: list = []  # (conditioner, uncond), built on first use: a fully cached evaluate never loads the model
    cache_stats = {"generated": 0, "reused": 0}

    def conditioning():
        if not made:
            made.append(_conditioning(ctx, method))
        return made[0]

    show = ctx.cfg.progress and ddp_world()[0] == 0
    plan = []  # per round: [stage, jobs, images or None (to generate), memo key]
    for r in range(ctx.rounds):
        stage = "generate" if r == 0 else f"eval-round{r}"
        jobs = jobs_for(list(range(c)), per_class, ctx.gen["seed"], stage)
        images = None
        if r == 0 and method == "d3m":
            images, chosen = _reuse_generated(ctx)
            reused = images is not None
            jobs = chosen or jobs
        memo = _round_key(ctx, method, r)
        if images is None and memo in _ROUNDS:  # made by an earlier evaluate call in this process (other protocol)
            _ROUNDS.move_to_end(memo)
            images, jobs = _ROUNDS[memo]
        plan.append([stage, jobs, images, memo])
    todo = [entry for entry in plan if entry[2] is None]
    generated = generate_rounds(ctx, [(stage, jobs) for stage, jobs, _, _ in todo], conditioning,
                                lambda stage: _cache_key(ctx, method, stage), cache_stats, show, f"{method}: images")
    for entry, (images, jobs) in zip(todo, generated):
        entry[1:3] = jobs, images
        _remember_round(entry[3], images, jobs)
    for _, jobs, images, _ in plan:
        hashes.append((images_sha256(images), image_digests(images)))  # the round's, and each image's
        images = images.to(ctx.device)
        if ctx.teacher is not None and (ctx.needs_soft or ctx.teacher.image_size):  # only at the size it expects
            round_logits = shared_teacher_logits(ctx.teacher, images, c).cpu()  # (C*K, C) fp32
            top1.append(float((round_logits.argmax(1) == labels).float().mean()))
            entropy.append(float(torch.distributions.Categorical(logits=round_logits).entropy().mean()))
            if ctx.needs_soft:
                logits.append(round_logits)
        seeds.append(torch.tensor([j.seed for j in jobs], dtype=torch.int32))
        rounds.append(TrainSet(images, labels.to(ctx.device)))
    tensors = {"seeds": torch.stack(seeds)}  # (R, C*per_class)
    label_meta = {}
    if logits:
        encoded, label_meta, decoded = stored_soft_labels(ctx, torch.stack(logits))  # (R, C*K, C)
        tensors.update(encoded)
        for r, train_set in enumerate(rounds):
            train_set.logits = decoded[r].to(ctx.device)  # the student sees the decoded labels, nothing finer
    components = plan_generative(ctx, method)
    actual = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    check_stored_bytes(components, actual, f"evaluate {method}")
    labels_file = _write_labels(ctx, method, tensors, label_meta, hashes)
    info = {
        "rounds": ctx.rounds,
        "regen_every": ctx.cfg.regen_every,
        "images_per_class_per_round": per_class,
        "round0_reused_generated": reused,
        "labels_file": labels_file,
        "generation": dict(ctx.gen),
    }
    if label_meta:
        info["label_codec"] = label_meta["label_codec"]
    if top1:  # how class-typical the stored images are, to the teacher (what seed selection raises)
        info["teacher_top1_on_images"] = 100 * sum(top1) / len(top1)
        info["teacher_top1_per_round"] = [round(100 * t, 2) for t in top1]
        info["teacher_entropy_per_round"] = [round(h, 4) for h in entropy]  # nats, mean over the round's images
    info["candidates"] = int(ctx.cfg.candidates)
    if ctx.cfg.round_cache:
        info["round_cache"] = cache_stats  # images denoised in this call vs taken from <run>/eval/rounds/
    if method == "class-prompt":
        info["prompts"] = class_prompt_strings(ctx)
    elif (prompts := PromptSet.load(ctx.run / "prompts.safetensors")).has_modes:  # several prompts per class
        info["modes"] = {"prompts": prompts.num_prompts, "per_class": prompts.modes_per_class()}
    return Distilled(rounds, components, ctx.ipc, info, compressed=_compressed_generative(ctx, method, tensors))


def _compressed_generative(ctx: Context, method: str, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each stored component of a generated set after `accounting.COMPRESSOR`, as `promptset budget` counts it."""
    data = {name: [tensor_data(t)] for name, t in tensors.items()}
    if method == "d3m":
        stored = PromptSet.load(ctx.run / "prompts.safetensors").stored_tensors()
        data["prompts"] = [tensor_data(stored[k]) for k in sorted(stored)]
        data["class_list"] = ["\n".join(x.folder for x in ctx.classes).encode("utf-8")]
    else:
        data["prompt_strings"] = [p.encode("utf-8") for p in class_prompt_strings(ctx)]
    return {name: compressed_size(chunks) for name, chunks in data.items()}


def _conditioning(ctx: Context, method: str):
    """(conditioner, unconditional states or None) of d3m's prompts or class-prompt's strings."""
    backend = ctx.backend()
    if method == "d3m":
        prompts = PromptSet.load(ctx.run / "prompts.safetensors")
        prompts.check_backend(backend, ctx.run / "prompts.safetensors")
        conditioner = PromptConditioner(backend, prompts)
    else:
        conditioner = TextConditioner(backend, class_prompt_strings(ctx), names=[x.name for x in ctx.classes])
    with torch.no_grad():
        uncond = backend.encode_prompts([""]) if ctx.gen["guidance"] != 1.0 else None
    return conditioner, uncond


def _cache_key(ctx: Context, method: str, stage: str) -> dict:
    """Everything that changes a pixel of a job's patches in this round (see round_cache.py)."""
    path = ctx.run / "prompts.safetensors"
    if path.is_file():
        settings = ctx.generation_settings(PromptSet.load(path))
    else:  # class-prompt on a run without prompts: the model's own fingerprint
        settings = ctx.generation_settings_for(ctx.backend().model_hash)
    if method != "d3m":
        settings |= {"prompts": class_prompt_strings(ctx), "template": ""}
    return {"method": method, "stage": stage, "settings": settings,
            "classes": [x.folder for x in ctx.classes]}  # fmt: skip


ROUNDS_CACHE_BYTES = 256 << 20  # generated rounds kept per process, so P1 and P2 of one run generate them once
_ROUNDS: OrderedDict[str, tuple[torch.Tensor, list]] = OrderedDict()


def _round_key(ctx: Context, method: str, r: int) -> str:
    """Everything that changes the pixels of round r (the prompts file by size and time: a new invert changes it)."""
    prompts = ctx.run / "prompts.safetensors"
    stat = prompts.stat() if prompts.is_file() else None
    what = [str(ctx.run.resolve()), method, ctx.gen, ctx.factor, ctx.image_size, ctx.ipc, r,
            ctx.cfg.class_prompt if method == "class-prompt" else "", stat and (stat.st_size, stat.st_mtime_ns),
            ctx.selection() if ctx.cfg.candidates > 1 else {}]
    return json.dumps(what, sort_keys=True, default=str)


def _remember_round(key: str, images: torch.Tensor, jobs: list) -> None:
    _ROUNDS[key] = (images.cpu(), jobs)
    while sum(x.numel() for x, _ in _ROUNDS.values()) > ROUNDS_CACHE_BYTES:
        _ROUNDS.popitem(last=False)


def _write_labels(ctx: Context, method: str, tensors: dict[str, torch.Tensor], label_meta: dict[str, str],
                  hashes: list[tuple[str, str]]) -> str:
    """Store the seeds (and P1 soft labels, encoded) of every round in `<run>/eval/labels/`, as the budget counts
    them, with the sha256 of every round's images and a short hash of each image (what materialize compares)."""
    teacher = getattr(ctx.teacher, "weights_sha256", "none") if ctx.needs_soft else "onehot"
    codec = str(label_codec(ctx)) if ctx.needs_soft else "none"
    # one file per distinct stored set: the name hashes everything that changes its tensors
    what = json.dumps([ctx.gen, ctx.factor, ctx.image_size, ctx.cfg.regen_every, codec, teacher])
    name = f"{method}-ipc{ctx.ipc}-r{ctx.rounds}-{sha256_bytes(what.encode())[:12]}.safetensors"
    meta = {
        "format": "promptset.eval-labels",
        "method": method,
        "ipc": str(ctx.ipc),
        "rounds": str(ctx.rounds),
        "regen_every": str(ctx.cfg.regen_every),
        "factor": str(ctx.factor),
        "image_size": str(ctx.image_size),
        "class_folders": json.dumps([c.folder for c in ctx.classes]),
        "generation": json.dumps(ctx.gen),
        "label_kind": "none",
        "teacher": getattr(ctx.teacher, "spec", "none") if ctx.needs_soft else "none",
        "teacher_sha256": teacher if ctx.needs_soft else "none",
        "seed_stages": "round 0: 'generate', round r: 'eval-round{r}'",
        "image_sha256": json.dumps([h for h, _ in hashes]), "image_digests": json.dumps([d for _, d in hashes]),
        "made_with": json.dumps(made_with(ctx.device)), **label_meta,
    }
    if method == "d3m":  # everything that changes a pixel, as generate records it: what `pack` needs
        prompts = PromptSet.load(ctx.run / "prompts.safetensors")
        meta["generation_settings"] = json.dumps(ctx.generation_settings(prompts))
    path = ctx.run / "eval" / "labels" / name
    if ddp_world()[0] == 0:
        save_tensors(path, tensors, meta)
    return str(path.relative_to(ctx.run))


def _reuse_generated(ctx: Context) -> tuple[torch.Tensor | None, list | None]:
    """Round 0 of d3m from `generate`'s PNGs (the teacher labels them again here: cheap, and the labels then come
    from the one codec path evaluate stores).

    Returns (images, the jobs as stored) or (None, None). Only when generate recorded exactly the settings evaluate
    would generate with (prompts, model, steps, guidance, sampler, seed, resolution, factor, image size, dtype,
    compile, sampler batch, seed selection; a different CPU thread count is replayable, so those images are the set's
    own) and its manifest lists every file with that key; file times are never trusted. Anything else is regenerated,
    and the settings that differ are printed.
    """
    gen_dir, labels_path = ctx.run / "generated", ctx.run / "labels.safetensors"
    if not (labels_path.is_file() and (gen_dir / "manifest.jsonl").is_file()):
        return None, None
    if any(gen_dir.glob(".manifest.rank*.jsonl")):
        return None, None  # a later generate is under way or was killed: its PNGs may be half replaced
    tensors, meta = load_tensors(labels_path, "labels file")
    prompts = PromptSet.load(ctx.run / "prompts.safetensors")
    if "generation" not in meta:
        return None, None  # a labels file from before generate recorded its settings
    differ = sampling.settings_differences(json.loads(meta["generation"]), ctx.generation_settings(prompts))
    if set(differ) - set(sampling.REPLAYABLE):  # the thread count alone is replayed: these are the set's images
        if ddp_world()[0] == 0:
            said = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in differ.items())
            print(f"evaluate: generate's images were made with other settings ({said}); round 0 is generated again",
                  flush=True)
        return None, None
    if json.loads(meta.get("class_folders", "[]")) != [c.folder for c in ctx.classes] or int(meta["ipc"]) < ctx.ipc:
        return None, None
    listed = {row.get("file"): row.get("key") for row in read_jsonl(gen_dir / "manifest.jsonl")}
    files = [f"{c.folder}/{i:05d}.png" for c in ctx.classes for i in range(ctx.ipc)]
    if any(listed.get(f) != meta.get("generation_key") or not (gen_dir / f).is_file() for f in files):
        return None, None
    images = to_uint8(torch.stack([to_tensor(load_image(gen_dir / f)) for f in files]))  # (C*K, 3, S, S)
    if tuple(images.shape[-2:]) != (ctx.image_size, ctx.image_size):
        return None, None
    # the seeds generate stored (with --candidates, the chosen ones): the first images of every class
    gen_per_class, per_class = int(meta["images_per_class"]), math.ceil(ctx.ipc / ctx.factor**2)
    seeds = tensors["seeds"].view(ctx.num_classes, gen_per_class)[:, :per_class].tolist()
    jobs = [Job(c, i, int(seeds[c][i])) for c in range(ctx.num_classes) for i in range(per_class)]
    return images, jobs


def build_rded(ctx: Context, seed: int | None = None) -> Distilled:
    """The run's selected collages (RDED's distilled set), cut into patches; the first ipc per class (lowest CE)."""
    folder = ctx.run / "collages"
    index = scan_image_folder(folder, flag="rded collages", check_headers=False)
    check_same_classes([c.folder for c in ctx.classes], index.classes, f"{folder}", "run select again in this run")
    chosen = []
    for c, files in enumerate(index.files):
        patches = []
        for f in files:
            patches.append(cut_patches(to_tensor(load_image(f))[None], ctx.factor, ctx.image_size)[0])  # (P, 3, S, S)
            if sum(len(x) for x in patches) >= ctx.ipc:
                break
        got = torch.cat(patches) if patches else torch.zeros(0, 3, ctx.image_size, ctx.image_size)
        if len(got) < ctx.ipc:
            raise UserError(
                f"rded: class {index.classes[c]!r} has {len(got)} selected patches in {folder}, fewer "
                f"than --ipc {ctx.ipc}; lower --ipc or select more images"
            )
        chosen.append(to_uint8(got[: ctx.ipc]))
    images = torch.cat(chosen)
    return _real_distilled(
        ctx, images, torch.arange(ctx.num_classes).repeat_interleave(ctx.ipc), ctx.ipc, {"source": str(folder)}
    )


def build_random_real(ctx: Context, seed: int) -> Distilled:
    """ipc real images per class from --train, drawn with the student seed (the baseline's own randomness)."""
    train = ctx.train
    picks = []
    for c in range(ctx.num_classes):
        where = (train.labels == c).nonzero().squeeze(1)
        if len(where) < ctx.ipc:
            raise UserError(
                f"random-real: class {ctx.classes[c].folder!r} has {len(where)} training images, fewer "
                f"than --ipc {ctx.ipc}"
            )
        g = torch.Generator().manual_seed(derive_seed(seed, "random-real", c))
        picks.append(where[torch.randperm(len(where), generator=g)[: ctx.ipc]])
    idx = torch.cat(picks)
    return _real_distilled(
        ctx, train.images[idx], train.labels[idx], ctx.ipc, {"source": str(train.index.root), "indices": idx.tolist()}
    )


def build_full(ctx: Context, seed: int | None = None) -> Distilled:
    """All of --train."""
    train = ctx.train
    return _real_distilled(
        ctx, train.images, train.labels, None, {"source": str(train.index.root), "images": len(train.labels)}
    )


def _real_distilled(
    ctx: Context, images: torch.Tensor, labels: torch.Tensor, ipc: int | None, info: dict
) -> Distilled:
    images = images.to(ctx.device)
    stored = None
    components = {"images_raw": len(images) * 3 * ctx.image_size**2}
    compressed = {"images_raw": compressed_size([tensor_data(images)])}  # the raw pixels, as every component
    if ctx.needs_soft:
        encoded, meta, decoded = stored_soft_labels(ctx, shared_teacher_logits(ctx.teacher, images, ctx.num_classes))
        stored = decoded.to(ctx.device)
        components.update({name: t.numel() * t.element_size() for name, t in encoded.items()})
        compressed.update({name: compressed_size([tensor_data(t)]) for name, t in encoded.items()})
        check_stored_bytes(label_bytes(ctx, len(images)), {k: v for k, v in components.items() if k != "images_raw"},
                           "evaluate (real images)")
        info = {**info, "label_codec": meta["label_codec"]}
    return Distilled([TrainSet(images, labels.to(ctx.device), stored)], components, ipc, info, compressed=compressed)


# ------------------------------------------------------------------------------------------------------------
# the registry: a new method is a builder (ctx, seed) -> Distilled and a row here


@dataclass(frozen=True)
class Method:
    """How one method makes its distilled set and what it stores."""

    build: Callable[[Context, int | None], Distilled]
    per_seed: bool = False  # drawn again for every student seed (random-real)
    stores_images: bool = False  # its stored set is images: report their PNG size too

    def planned_bytes(self, ctx: Context, name: str) -> dict[str, int]:
        """Stored bytes per component, known before any compute."""
        if name in GENERATIVE:
            return plan_generative(ctx, name)
        n = len(ctx.train.labels) if name == "full" else ctx.ipc * ctx.num_classes
        return {"images_raw": n * 3 * ctx.image_size**2, **label_bytes(ctx, n)}


METHODS: dict[str, Method] = {
    "d3m": Method(lambda ctx, seed: build_generative(ctx, "d3m")),
    "class-prompt": Method(lambda ctx, seed: build_generative(ctx, "class-prompt")),
    "rded": Method(build_rded, stores_images=True),
    "random-real": Method(build_random_real, per_seed=True, stores_images=True),
    "full": Method(build_full, stores_images=True),
}
NEEDS_TRAIN = ("random-real", "full")  # methods that read --train
