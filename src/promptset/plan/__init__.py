"""`promptset run --config R --plan`: what a recipe will cost, before any of it runs and without the model's weights.

Per stage it counts the work exactly as the stages will do it (images the teacher scores, inversion steps x batch,
images generated per round x rounds x candidates padded to the sampler's micro-batch, student steps = epochs x
ceil(images / batch) x seeds x methods x IPCs x protocols), every network's FLOPs on the meta device (`ops.py`),
the stored bytes per IPC of every method (`Method.planned_bytes`, `labelcodec.planned_bytes`: array bytes, and after
zlib estimated on same-shape stand-ins), and the time: on the device at hand from calls timed there (when the model
folder is here and a call is cheap) or from its measured FLOP rate, or on a named GPU from its peak at a stated
utilisation. Every time is an estimate. Nothing is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..flops import GPU_PEAKS, gpu_peak, measure_rate
from .ops import MEASURE_BUDGET_S, Op, Work, _padded, generator_timing, network_ops, sd_configs, sd_flops


@dataclass
class Dataset:
    classes: int
    per_class: list[int]  # training images per class
    test: int
    folders: list[str] | None  # class folder names when the data is here
    source: str
    train_dir: str


def make_plan(config_path: str, run: str | None = None, sets: list[str] | None = None, *, device: str = "",
              utilization: float = 0.4, measure: bool = True) -> dict:
    """The plan of a recipe as a dict: work lines per stage, FLOPs, seconds, stored bytes per IPC, notes."""
    from ..pipeline import STAGE_ORDER, resolved_sections
    from ..runconfig import load_recipe

    if not 0 < utilization <= 1:
        raise UserError(f"--plan-utilization {utilization}: give a fraction of peak in (0, 1], e.g. 0.4")
    recipe = load_recipe(config_path, sets, STAGE_ORDER)
    cfgs: dict[str, list] = {}
    for name, cfg, _ in resolved_sections(recipe, config_path, run):
        cfgs.setdefault(name, []).append(cfg)
    teacher_cfg, select_cfg, invert_cfg, gen_cfg = (cfgs.get(n, [None])[0] for n in ("teacher", "select", "invert",
                                                                                       "generate"))
    evals = cfgs.get("evaluate", [])
    if invert_cfg is None:
        raise UserError(f"--plan: {config_path} has no invert: section; the plan counts a D3M recipe")
    if invert_cfg.backend != "sd":
        raise UserError(f"--plan counts Stable Diffusion recipes (invert.backend sd); {config_path} uses "
                        f"{invert_cfg.backend!r}")
    data = _dataset(recipe, config_path, select_cfg, teacher_cfg, evals)
    p = _Planner(data, teacher_cfg, select_cfg, invert_cfg, gen_cfg, evals, device, utilization, measure)
    return p.plan(config_path, recipe["run"] if run is None else run)


def print_plan(config_path: str, run: str | None = None, sets: list[str] | None = None, *, device: str = "",
               utilization: float = 0.4) -> dict:
    """Print the plan of a recipe (see `make_plan`) and return it."""
    from .render import render

    result = make_plan(config_path, run, sets, device=device, utilization=utilization)
    print(render(result), flush=True)
    return result


def _dataset(recipe: dict, config_path: str, select_cfg, teacher_cfg, evals) -> Dataset:
    """Class and image counts: counted in the data folders when they are here, else the recipe's `dataset:`."""
    from ..data import scan_image_folder

    train_dir = (select_cfg.data if select_cfg else "") or (teacher_cfg.data if teacher_cfg else "")
    test_dir = (evals[0].test if evals else "") or (teacher_cfg.test if teacher_cfg else "")
    info = recipe["dataset"]
    if train_dir and Path(train_dir).expanduser().is_dir():
        index = scan_image_folder(train_dir, flag="paths.train", check_headers=False)
        folders, per_class = index.classes, [len(f) for f in index.files]
        source = f"counted in {train_dir}"
    elif info.get("classes") and info.get("train_images_per_class"):
        folders, per_class = None, [int(info["train_images_per_class"])] * int(info["classes"])
        source = f"the recipe's dataset: block ({train_dir or 'the training folder'} is not on this machine)"
    else:
        raise UserError(f"--plan: {train_dir or 'the training folder'} is not on this machine and {config_path} has "
                        "no 'dataset:' block (classes, train_images_per_class, test_images); add one or pass "
                        "--set paths.train=FOLDER")
    if test_dir and Path(test_dir).expanduser().is_dir():
        test = scan_image_folder(test_dir, flag="paths.test", check_headers=False).num_images
    else:
        test = int(info.get("test_images") or 0)
    name = info.get("name") or Path(train_dir).name
    return Dataset(len(per_class), per_class, test, folders, f"{name}: {source}", train_dir)


class _Planner:
    """Walks the recipe's stages in order, counting what each will do (as the stage's own code does it)."""

    def __init__(self, data: Dataset, teacher_cfg, select_cfg, invert_cfg, gen_cfg, evals: list, device: str,
                 utilization: float, measure: bool):
        from ..devices import resolve_device, resolve_dtype_name

        self.data, self.teacher_cfg, self.select_cfg, self.invert_cfg = data, teacher_cfg, select_cfg, invert_cfg
        self.gen_cfg, self.evals, self.notes, self.work = gen_cfg, evals, [], []
        self.configs, self.config_source = sd_configs(invert_cfg.model)
        unet = self.configs["unet"]
        self.down = 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)
        self.native = int(unet["sample_size"]) * self.down
        self.named = device.lower() not in ("", "cpu")
        self.device_name = device.lower() or "here"
        here = torch.device("cpu") if device.lower() == "cpu" else resolve_device("auto")
        self.here = None if self.named else here
        if self.named:
            gen_peak, gen_dtype = gpu_peak(device, invert_cfg.dtype)
            net_peak, net_dtype = gpu_peak(device, "fp32")
            self.rates = {"generator": gen_peak * utilization, "teacher": net_peak * utilization,
                          "student": net_peak * utilization}
            self.gen_dtype = gen_dtype
            self.timing = (f"{GPU_PEAKS[device.lower()]['name']}: the generator in {gen_dtype} at "
                           f"{utilization:.0%} of {gen_peak / 1e12:,.1f} TFLOP/s, teacher and students in {net_dtype} "
                           f"at {utilization:.0%} of {net_peak / 1e12:,.1f} TFLOP/s (dense peaks, vendor datasheets)")
        else:
            from ..devices import DTYPES, resolve_dtype

            self.gen_dtype = resolve_dtype_name(invert_cfg.dtype, here)
            resolve_dtype("fp32", here)  # TF32 on CUDA, as the stages set it up
            net_rate = measure_rate(here)
            gen_rate = net_rate if self.gen_dtype == "fp32" else measure_rate(here, DTYPES[self.gen_dtype])
            self.rates = {"generator": gen_rate, "teacher": net_rate, "student": net_rate}
            self.timing = (f"{_device_label(here)}, measured here: a matmul and a 3x3 convolution run at "
                           f"{gen_rate / 1e9:,.1f} GFLOP/s ({self.gen_dtype})"
                           + ("" if gen_rate == net_rate else f" and {net_rate / 1e9:,.1f} GFLOP/s (fp32)"))
        self.measure = measure and not self.named

    # ------------------------------------------------------------------------------------------------------------
    def plan(self, config_path: str, run: str | None) -> dict:
        self._teacher_ops()
        self._generator_ops()
        self._teacher_stage()
        self._select_stage()
        self._invert_stage()
        self._generate_stage()
        self._evaluate_stage()
        from ..accounting import fmt_bytes
        from .stored import stored_bytes

        held = getattr(self, "held_bytes", 0)
        if held:
            room = ""
            if self.named and held > GPU_PEAKS[self.device_name]["memory_gb"] * 1e9:
                room = f": more than the {GPU_PEAKS[self.device_name]['memory_gb']} GB of the {self.device_name}"
            self.notes.append(f"evaluate keeps every round's images on the device while a student trains: up to "
                              f"{fmt_bytes(held)} ({self.held_what}){room}")
        self.notes.append("not counted: reading and decoding images, writing files, Python start-up; one process "
                          "(under torchrun the stages share their work over the processes)")
        if self.named:
            self.notes.append("on a named GPU every time is FLOPs at the stated share of its peak: small networks at "
                              "small batches (ConvNet students, teachers) reach far less, so those lines are lower "
                              "bounds; --plan on the GPU itself times them there")
        rates = self.rates
        lines = [{"stage": w.stage, "text": w.text, "flops": w.flops, "seconds": w.seconds(rates),
                  "measured": w.op.timing is not None, "calls": w.calls, "samples": w.samples, "group": w.group,
                  "counts": w.counts or {}} for w in self.work]
        return {
            "config": config_path, "run": run, "device": self.device_name, "timing": self.timing,
            "data": self.data.source, "classes": self.data.classes, "train_images": sum(self.data.per_class),
            "test_images": self.data.test, "generator": self.config_source, "flops": self.flops_summary,
            "lines": lines, "counts": self.counts, "bytes": stored_bytes(self), "notes": self.notes,
            "prompts": self.prompts_summary(),
            "total_flops": sum(x["flops"] for x in lines), "total_seconds": sum(x["seconds"] for x in lines),
        }

    # ------------------------------------------------------------------------------------------------------------
    def _teacher_ops(self) -> None:
        """Which teacher the stages use, its architecture and input side, and whether the teacher step trains it."""
        from ..models.teachers import read_teacher_metadata

        t = self.teacher_cfg
        spec = (t.out if t else "") or (self.select_cfg.teacher if self.select_cfg else "") or \
            (self.gen_cfg.teacher if self.gen_cfg else "") or next((e.teacher for e in self.evals if e.teacher), "")
        self.teacher_spec, self.teacher_trains = spec, False
        self.teacher_arch, self.teacher_size = None, None
        if not spec or spec == "none":
            self.teacher = None
            return
        named = ":" in spec and not Path(spec).expanduser().is_file()
        if named:
            name, _, path = spec.partition(":")
            arch, _, size = name.partition("@")
            self.teacher_arch, self.teacher_size = arch, int(size) if size.isdigit() else None
        elif Path(spec).expanduser().is_file():
            meta = read_teacher_metadata(Path(spec).expanduser())
            self.teacher_arch, self.teacher_size = meta.get("arch"), int(meta.get("image_size") or 0) or None
        elif t is not None:
            self.teacher_arch, self.teacher_size, self.teacher_trains = t.arch, t.image_size, True
        size = self.teacher_size or (self.select_cfg.resolution if self.select_cfg else 32)
        self.teacher_size = size
        batch = t.batch_size if (t is not None and self.teacher_trains) else 64
        ops = network_ops(self.teacher_arch or "", self.data.classes, size, "teacher", device=self._device(),
                          rate=self.rates["teacher"], batch=batch, budget=MEASURE_BUDGET_S)
        if ops is None:
            self.notes.append(f"teacher {spec}: promptset cannot build {self.teacher_arch!r} to count it; its "
                              "FLOPs are left out")
            ops = (Op(f"{self.teacher_arch} forward", 0.0, "teacher"), Op(f"{self.teacher_arch} step", 0.0, "teacher"))
        self.teacher = ops

    def _device(self):
        return self.here if self.measure else None

    def _generator_ops(self) -> None:
        """FLOPs of the SD parts at the recipe's resolutions, and their times measured on the model folder when it is
        here and a call is cheap on this device."""
        inv, gen = self.invert_cfg, self.gen_cfg
        self.invert_res = inv.resolution or self.native
        self.gen_res = (gen.resolution if gen else 0) or self.invert_res
        self.prompts_per_class = self._prompts_per_class()
        self.num_prompts = sum(self.prompts_per_class)  # invert's rows: classes, or (class, mode) pairs
        self.per_group = inv.classes_per_batch or min(self.num_prompts, inv.batch_size)
        f = sd_flops(self.configs, self.invert_res, self.gen_res)
        cfg_factor = 2 if (gen.guidance if gen else 7.5) != 1.0 else 1
        step_flops = inv.batch_size * f["unet_fb_invert"] + self.per_group * f["text_fb"]
        self.ops = {
            "invert_step": Op("UNet forward + backward and text encoder (inversion)", step_flops / inv.batch_size,
                              "generator"),
            "vae_encode": Op(f"VAE encode at {self.invert_res} px", f["vae_encode"], "generator"),
            "unet_sample": Op(f"UNet forward at {self.gen_res} px (x2 for guidance)", f["unet_fwd_gen"] * cfg_factor,
                              "generator"),
            "vae_decode": Op(f"VAE decode at {self.gen_res} px", f["vae_decode"], "generator"),
            "load": Op("load the generator", 0.0, "generator"),
        }
        steps = gen.steps if gen else 25
        self.flops_summary = {
            "unet_forward": f["unet_fwd_gen"], "unet_forward_backward": f["unet_fb_invert"], "text_fb": f["text_fb"],
            "vae_encode": f["vae_encode"], "vae_decode": f["vae_decode"], "invert_step": step_flops,
            "invert_batch": inv.batch_size, "invert_prompts": self.per_group, "invert_latent": self.invert_res //
            self.down, "gen_latent": self.gen_res // self.down, "gen_steps": steps, "guidance_factor": cfg_factor,
            "generated_image": steps * cfg_factor * f["unet_fwd_gen"] + f["vae_decode"],
        }
        sb = gen.sampler_batch if gen else 8
        predicted = max(step_flops, sb * f["unet_fwd_gen"] * cfg_factor + sb * f["vae_decode"]) / \
            self.rates["generator"]
        folder = Path(inv.model).expanduser()
        if not self.measure or not (folder / "unet" / "config.json").is_file() or predicted > MEASURE_BUDGET_S:
            why = ("a named device" if self.named else "measuring was off" if not self.measure else
                   "the model folder is not here" if not (folder / "unet" / "config.json").is_file() else
                   f"one call would take about {predicted:.0f} s here")
            self.notes.append(f"generator times: from its FLOPs at the rate above ({why}); loading the model is not "
                              "counted")
            return
        t = generator_timing(str(folder), self.here, self.gen_dtype, invert_res=self.invert_res,
                             batch=inv.batch_size, prompts=self.per_group, template=inv.template,
                             vectors=inv.num_vectors, gen_res=self.gen_res, sampler_batch=sb,
                             guidance=gen.guidance if gen else 7.5, sampler=gen.sampler if gen else "ddim")
        self.ops["invert_step"].timing = (0.0, t["invert_step"] / inv.batch_size)
        self.ops["vae_encode"].timing = (0.0, t["vae_encode"])
        self.ops["unet_sample"].timing = (0.0, t["unet_sample"])
        self.ops["vae_decode"].timing = (0.0, t["vae_decode"])
        self.ops["load"].timing = (t["load"], 0.0)
        self.notes.append(f"generator times: measured on {folder} on this device ({t['load']:.1f} s to load; one "
                          f"inversion step {t['invert_step']:.3f} s)")

    def _add(self, stage: str, text: str, op: Op, calls: int, samples: int, group: str = "",
             counts: dict | None = None) -> None:
        if op.sample_flops == 0 and op.timing is None:
            return  # nothing to count (loading a model whose load was not timed)
        if calls or samples:
            self.work.append(Work(stage, text, op, calls, samples, group, counts))

    # ------------------------------------------------------------------------------------------------------------
    def _teacher_stage(self) -> None:
        self.counts = {"teacher_steps": 0, "invert_steps": 0, "invert_samples": 0, "generated_images": 0,
                       "sampled_images": 0, "student_steps": 0, "eval_generated_images": 0, "eval_sampled_images": 0}
        t = self.teacher_cfg
        if t is None or not self.teacher_trains:
            if t is not None:
                how = "is given" if ":" in self.teacher_spec else "exists"
                self.notes.append(f"teacher: {self.teacher_spec} {how}: the teacher step trains nothing")
            return
        n = sum(min(k, t.max_images_per_class or k) for k in self.data.per_class)
        steps = t.epochs * math.ceil(n / min(t.batch_size, n))
        tests = (t.epochs // t.eval_every + (1 if t.epochs % t.eval_every else 0)) if t.test else 0
        _, train = self.teacher
        self.counts["teacher_steps"] = steps
        batch = min(t.batch_size, n)
        self._add("teacher", f"{t.arch} at {t.image_size} px: {t.epochs} epochs x {math.ceil(n / batch):,} steps of "
                  f"{batch} images = {steps:,} steps", train, steps, t.epochs * n)
        self._add("teacher", f"{tests} tests x {self.data.test:,} test images", self.teacher[0],
                  tests * math.ceil(self.data.test / 512), tests * self.data.test)

    def _select_stage(self) -> None:
        s = self.select_cfg
        if s is None:
            return
        kept, self.collages = self._collages()
        if self.teacher is None or s.teacher == "none":
            self.notes.append("select: no teacher, resize + center crop (no network runs)")
            return
        crops = sum(kept) * s.num_crops
        calls = sum(math.ceil(k * s.num_crops / s.batch_size) for k in kept)
        self._add("select", f"{sum(kept):,} images x {s.num_crops} crops = {crops:,} teacher forwards "
                  f"({self.teacher_arch} at {self.teacher_size} px)", self.teacher[0], calls, crops)

    def _collages(self) -> tuple[list[int], list[int]]:
        """Per class: the images select keeps and the collages it makes of them (select's counting)."""
        s = self.select_cfg
        kept = [min(k, s.max_images_per_class or k) for k in self.data.per_class]
        return kept, [k // s.factor**2 if not s.num_collages else min(s.num_collages, k // s.factor**2) for k in kept]

    def _invert_images(self) -> list[int]:
        """Training images per class invert learns from: select's collages, or the data's images without select."""
        return self._collages()[1] if self.select_cfg is not None else self.data.per_class

    def _prompts_per_class(self) -> list[int]:
        """Prompts invert learns per class, as it counts them: min(--modes, the class's training images)."""
        from ..modes import check_mode_flags

        inv = self.invert_cfg
        inv.modes = check_mode_flags(inv.modes, inv.mode_features, inv.teacher)  # refused as invert refuses it
        return [min(inv.modes, k) for k in self._invert_images()]

    def prompts_summary(self) -> dict:
        """What the plan says of the prompts: --modes, how many in all, fewest and most per class."""
        return {"modes": self.invert_cfg.modes, "total": self.num_prompts,
                "per_class_min": min(self.prompts_per_class, default=0),
                "per_class_max": max(self.prompts_per_class, default=0)}

    def _invert_stage(self) -> None:
        from ..stages.invert import _group_batch, _groups
        from .render import prompts_per_class_text

        inv = self.invert_cfg
        collages = self._invert_images()
        views = 2 if inv.flip else 1
        encodes = sum(collages) * views
        self._add("invert", f"{sum(collages):,} training images x {views} (flip) VAE encodes at {self.invert_res} px "
                  "(once, cached)", self.ops["vae_encode"], sum(math.ceil(views * k / 32) for k in collages), encodes)
        groups = _groups(self.num_prompts, self.per_group)
        samples = sum(inv.steps * _group_batch(inv.batch_size, self.per_group, len(g)) for g in groups)
        self.counts["invert_steps"] = len(groups) * inv.steps
        self.counts["invert_samples"] = samples
        unit = "classes" if inv.modes == 1 else \
            f"prompts (--modes {inv.modes}: {prompts_per_class_text(self.prompts_summary())})"
        self._add("invert", f"{len(groups):,} groups of {self.per_group} {unit} x {inv.steps:,} steps x batch "
                  f"{inv.batch_size} = {samples:,} UNet forward+backward at {self.invert_res} px",
                  self.ops["invert_step"], len(groups) * inv.steps, samples)
        self._add("invert", "load the generator", self.ops["load"], 1, 0)

    def _generated(self, stage: str, jobs: int, chunk: int, micro: int, candidates: int, steps: int,
                   what: str) -> int:
        """Work lines of generating `jobs` images (x candidates), taken `chunk` jobs at a time; returns the images
        the sampler computes (padded)."""
        images = _padded(jobs, chunk, micro, candidates)
        calls = images // micro
        self._add(stage, f"{what}: {jobs:,} images x {candidates} candidate(s), {images:,} with the sampler's "
                  f"padding, x {steps} steps", self.ops["unet_sample"], calls * steps, images * steps)
        self._add(stage, f"{images:,} VAE decodes at {self.gen_res} px", self.ops["vae_decode"], calls, images)
        return images

    def _generate_stage(self) -> None:
        from ..backends.selection import AUTO_CANDIDATES

        g = self.gen_cfg
        self.generated_ipc = 0
        if g is None:
            return
        self.factor = g.factor or (self.select_cfg.factor if self.select_cfg else 1)
        per_class = math.ceil(g.ipc / self.factor**2)
        self.gen_candidates = g.candidates or (AUTO_CANDIDATES if self.teacher is not None and g.teacher else 1)
        jobs = self.data.classes * per_class
        images = self._generated("generate", jobs, g.batch_size, g.sampler_batch, self.gen_candidates, g.steps,
                                 f"{self.data.classes:,} classes x {per_class}")
        self.counts["generated_images"] = jobs
        self.counts["sampled_images"] = images
        self._add("generate", "load the generator", self.ops["load"], 1, 0)
        patches = jobs * self.factor**2
        scored = patches * self.gen_candidates if self.gen_candidates > 1 else (patches if g.soft_labels else 0)
        if scored and self.teacher is not None:
            chunk = g.sampler_batch * self.factor**2
            why = "candidates scored and labelled" if self.gen_candidates > 1 else "soft labels"
            self._add("generate", f"{scored:,} patches ({self.factor}x{self.factor} per image) through the teacher "
                      f"({why})", self.teacher[0], math.ceil(scored / chunk), _padded(scored, chunk, chunk))
        self.generated_ipc = g.ipc

    def _evaluate_stage(self) -> None:
        from .evaluate import evaluate_work

        evaluate_work(self)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
