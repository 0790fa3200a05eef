"""Images/s of promptset's `generate_batch` vs. diffusers' `StableDiffusionPipeline.__call__` at equal settings.

Both use one model loaded through `promptset.backends.create_backend` (the pipeline is built from the backend's own
components), DDIM with the same steps, guidance and batch size, the same conditioning (`PromptConditioner` on
prompts initialised from the class names, or `TextConditioner` on class prompts), computed per batch inside the timed
region for both and handed to the pipeline as `prompt_embeds`; the empty prompt's states are encoded once and given
as `negative_prompt_embeds` (promptset's `generate` also encodes them once). Initial noise comes from per-image
generators in both (`generator=[torch.Generator().manual_seed(s) for s in seeds]` for the pipeline). The two run
in the same process in alternating timed rounds (median), so drifting load on a shared machine hits both alike.
Peak memory of one batch: GPU `max_memory_allocated`; CPU peak RSS from `getrusage`, reset in between through
/proc/self/clear_refs. The images are compared for the same seeds (max abs diff; identical expected in fp32).

A thin driver: it times promptset's own `generate_batch` and `--compile` path and patches nothing in promptset.

    python benchmarks/bench_generate.py --quick --json bench_generate.json
    python benchmarks/bench_generate.py --quick --profile          # + a torch.profiler table of one batch
    python benchmarks/bench_generate.py --device cuda --json bench_generate_gpu.json   # SD-1.5 shapes, 512 px
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import promptset  # noqa: F401, E402  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch  # noqa: E402

torch.set_flush_denormal(True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_common  # noqa: E402
import common  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# the two batch functions, timed in the same process
def setup(spec: dict):
    """Backend, conditioner, uncond states and the job batches (shared by promptset and the pipeline)."""
    from promptset.artifacts import PromptSet
    from promptset.backends import create_backend
    from promptset.backends.sampling import PromptConditioner, TextConditioner, class_prompts, jobs_for

    backend = create_backend("sd", spec["model"], device=spec["device"], dtype=spec["dtype"], sampler="ddim")
    if spec.get("resolution"):
        backend.resolution = int(spec["resolution"])  # as `promptset generate --resolution` does
    names = spec["names"]
    if spec["conditioner"] == "prompt":
        # learned prompts stand-in: each class's vector starts at its name's embedding row (as invert initialises it)
        vectors = torch.stack([backend.initializer_vector(n) for n in names]).unsqueeze(1)  # (C, 1, D)
        prompts = PromptSet(
            embeddings=vectors,
            token_names=[f"<{n}>" for n in names],
            class_folders=names,
            template="a photo of {token}",
            backend=backend.kind,
            model_id=backend.model_id,
            model_hash=backend.model_hash,
        )
        conditioner = PromptConditioner(backend, prompts)
    else:
        conditioner = TextConditioner(backend, class_prompts(names))
    with torch.no_grad():
        uncond = backend.encode_prompts([""]) if spec["guidance"] != 1.0 else None  # (1, L, D_text)
    jobs = jobs_for(list(range(len(names))), spec["images_per_class"], seed=0)
    b = spec["batch_size"]
    batches = [jobs[i : i + b] for i in range(0, len(jobs), b)]
    return backend, conditioner, uncond, batches


def run_all(fn, batches) -> list[torch.Tensor]:
    return [fn(batch) for batch in batches]


def timed(fn, batches, device) -> tuple[float, list[torch.Tensor]]:
    """Seconds to run `fn` over every batch (synchronised on GPU), and the outputs."""
    common.sync(device)
    t0 = time.perf_counter()
    outs = run_all(fn, batches)
    common.sync(device)
    return time.perf_counter() - t0, outs


def peak_memory(fn, batch, device) -> dict:
    """Peak memory of one batch: GPU max_memory_allocated (weights included); CPU peak RSS (getrusage, reset first)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn(batch)
        common.sync(device)
        return {"peak_gpu_bytes": torch.cuda.max_memory_allocated(device), "max_rss_mb": None}
    reset = common.reset_peak_rss()
    fn(batch)
    return {"peak_gpu_bytes": None, "max_rss_mb": common.max_rss_mb(), "rss_peak_reset": reset}


def interleaved(fns: dict, batches, rounds: int, device) -> tuple[dict, dict]:
    """Time every fn over all batches `rounds` times, alternating the order each round (load on a shared machine
    drifts; back-to-back rounds see the same load). Returns per-fn round times and per-fn last-round outputs."""
    times = {k: [] for k in fns}
    outs = {}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            seconds, outs[k] = timed(fns[k], batches, device)
            times[k].append(seconds)
    return times, outs


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


DEFAULT = object()  # "call generate_batch as `promptset generate` does" (its own micro_batch default)


def supports_micro_batch() -> bool:
    import inspect

    from promptset.backends.sampling import generate_batch

    return "micro_batch" in inspect.signature(generate_batch).parameters


def ours_fn(spec, backend, conditioner, uncond, micro_batch=DEFAULT):
    """promptset's `generate_batch` on one batch of jobs -> (B, 3, H, W) on CPU."""
    from promptset.backends.sampling import generate_batch

    res = backend.resolution
    extra = {} if micro_batch is DEFAULT else {"micro_batch": micro_batch}

    def fn(batch):
        patches = generate_batch(
            backend,
            conditioner,
            batch,
            steps=spec["steps"],
            guidance=spec["guidance"],
            factor=1,
            image_size=res,
            uncond=uncond,
            **extra,
        )  # (B, 1, 3, H, W)
        return patches[:, 0]

    return fn


def diffusers_fn(spec, backend, conditioner, uncond, per_image: bool = False):
    """`StableDiffusionPipeline.__call__` on one batch (or image by image) -> (B, 3, H, W) on CPU."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=backend.autoencoder.vae,
        text_encoder=backend.text_encoder,
        tokenizer=backend.tokenizer,
        unet=backend.unet,
        scheduler=DDIMScheduler.from_config(backend.sample_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    res = backend.resolution

    def call(jobs):
        classes = torch.tensor([j.cls for j in jobs])
        with torch.no_grad():
            cond = conditioner(classes)  # (B, L, D_text): the same conditioning promptset samples from
        neg = uncond.expand(len(jobs), -1, -1) if uncond is not None else None
        out = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=neg,
            num_inference_steps=spec["steps"],
            guidance_scale=spec["guidance"],
            height=res,
            width=res,
            output_type="pt",
            generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
        )
        return out.images.float().cpu()  # (B, 3, H, W) in [0, 1]

    if per_image:
        return lambda batch: torch.cat([call([job]) for job in batch])
    return call


def profile_ours(fn, batch, device) -> list[dict]:
    """torch.profiler over one promptset batch: the ops that take the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn(batch)
        common.sync(device)
    rows = []
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    for e in events[:12]:
        rows.append(
            {"op": e.key, "calls": e.count, "self_ms": getattr(e, key, 0) / 1e3, "share": getattr(e, key, 0) / total}
        )
    return rows


METHODS = {
    "promptset": "generate_batch as `promptset generate` calls it (src default micro_batch)",
    "promptset_batched": "generate_batch(micro_batch=None): the whole batch in each UNet call",
    "diffusers": "StableDiffusionPipeline.__call__ on the batch",
    "diffusers_per_image": "StableDiffusionPipeline.__call__ image by image (batch 1, like micro_batch=1)",
    "promptset_compiled": "`promptset generate --compile`: the same, UNet through torch.compile (compile excluded)",
}


def measure(args, model: str, dtype: str, names: list[str]) -> dict:
    """promptset vs diffusers for one dtype, in this process: warm-up, peak memory, interleaved timed rounds."""
    spec = {
        "model": model,
        "device": args.device,
        "dtype": dtype,
        "names": names,
        "conditioner": args.conditioner,
        "images_per_class": args.images_per_class,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "guidance": args.guidance,
        "compile": args.compile,
        "resolution": args.resolution,
    }
    backend, conditioner, uncond, batches = setup(spec)
    device = backend.device
    fns = {
        "promptset": ours_fn(spec, backend, conditioner, uncond),
        "diffusers": diffusers_fn(spec, backend, conditioner, uncond),
    }
    if supports_micro_batch():
        fns["promptset_batched"] = ours_fn(spec, backend, conditioner, uncond, micro_batch=None)
    if not args.no_per_image:
        fns["diffusers_per_image"] = diffusers_fn(spec, backend, conditioner, uncond, per_image=True)
    compile_s = None
    if args.compile:  # a second backend: compile_denoiser replaces its UNet in place
        backend_c, conditioner_c, uncond_c, _ = setup(spec)
        backend_c.compile_denoiser()
        fns["promptset_compiled"] = ours_fn(spec, backend_c, conditioner_c, uncond_c)
        t0 = time.perf_counter()
        fns["promptset_compiled"](batches[0])  # compiles (one shape: the fixed micro-batch)
        common.sync(device)
        compile_s = time.perf_counter() - t0
    for fn in fns.values():
        run_all(fn, batches[: args.warmup])
    memory = {k: peak_memory(fn, batches[0], device) for k, fn in fns.items()}
    times, outs = interleaved(fns, batches, args.rounds, device)
    images = {k: torch.cat(v).float().cpu() for k, v in outs.items()}
    n = images["promptset"].shape[0]
    methods = []
    for k in fns:
        ref = "diffusers_per_image" if k == "promptset" and "diffusers_per_image" in images else "diffusers"
        methods.append(
            {
                "method": k,
                "what": METHODS[k],
                "seconds": times[k],
                "images_per_s": n / median(times[k]),
                "speedup_vs_diffusers": median([d / o for o, d in zip(times[k], times["diffusers"])]),
                "max_abs_diff_vs_diffusers": float((images[k] - images["diffusers"]).abs().max()),
                "max_abs_diff_vs_diffusers_per_image": (
                    float((images[k] - images["diffusers_per_image"]).abs().max())
                    if "diffusers_per_image" in images
                    else None
                ),
                "identical_to": ref if float((images[k] - images[ref]).abs().max()) == 0.0 else None,
                "peak_gpu_bytes": memory[k]["peak_gpu_bytes"],
                "max_rss_mb": memory[k]["max_rss_mb"],
                "compile_s": compile_s if k == "promptset_compiled" else None,
            }
        )
    by = {m["method"]: m for m in methods}
    row = {
        "dtype": dtype,
        "images": n,
        "rounds": args.rounds,
        "methods": methods,
        "speedup": by["promptset"]["speedup_vs_diffusers"],
        "speedup_batched": by.get("promptset_batched", {}).get("speedup_vs_diffusers"),
        "speedup_compiled": by.get("promptset_compiled", {}).get("speedup_vs_diffusers"),
        "compile_s": compile_s,
        "max_abs_diff": by["promptset"]["max_abs_diff_vs_diffusers"],
        "rss_peak_reset_between": memory["promptset"].get("rss_peak_reset"),
        "profile": profile_ours(fns["promptset"], batches[0], device) if args.profile else None,
    }
    row["resolution"] = backend.resolution
    del backend, conditioner, fns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------------------
# parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli_common.add_common_flags(p, quick="CPU, tiny model, 4 classes x 4 images, 25 DDIM steps")
    p.add_argument(
        "--conditioner",
        default="prompt",
        choices=["prompt", "text"],
        help="PromptConditioner (learned-prompt path) or TextConditioner (class-prompt baseline)",
    )
    p.add_argument("--classes", type=int, default=4, help="classes")
    p.add_argument("--images-per-class", type=int, default=0, help="images per class in each timed round")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampler batch (both)")
    cli_common.add_sampling_flags(p, steps_flag="--steps")
    p.add_argument("--no-per-image", action="store_true", help="skip the image-by-image pipeline row")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per method")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per method, alternating order (median)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time `promptset generate --compile` (compile time reported apart)",
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one promptset batch")
    args = p.parse_args(argv)
    gpu = cli_common.finish_common(p, args)
    args.images_per_class = args.images_per_class or (4 if gpu or args.quick else 8)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = cli_common.start(args)
    gpu = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, build_s = cli_common.model_folder(args, work)
        names = common.cifar_names(args.classes)
        print(
            f"generate benchmark: {args.classes} classes x {args.images_per_class} images, batch {args.batch_size}, "
            f"DDIM {args.steps} steps, guidance {args.guidance}, {common.model_label(args.size, args.model)}, "
            f"{args.device}, {torch.get_num_threads()} threads"
        )
        if args.compile:  # a cold compile, as on a first run: inductor's on-disk cache starts empty in `work`
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")
        rows = [measure(args, model, dtype, names) for dtype in args.dtypes]
    settings = {
        **cli_common.model_settings(args, model),
        "device": args.device,
        "resolution": rows[0]["resolution"],
        "dtypes": args.dtypes,
        "sampler": "ddim",
        "steps": args.steps,
        "guidance": args.guidance,
        "batch_size": args.batch_size,
        "classes": args.classes,
        "images_per_class": args.images_per_class,
        "conditioner": args.conditioner,
        "warmup_batches": args.warmup,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "model_build_s": build_s,
    }
    for r in rows:
        print(
            f"{r['dtype']}: {r['images']} images at {r['resolution']} px, median of {r['rounds']} alternating rounds"
        )
        for m in r["methods"]:
            m["peak"] = common.fmt_bytes(m["peak_gpu_bytes"]) if gpu else f"{m['max_rss_mb']:.0f} MiB RSS"
        print(
            common.table(
                r["methods"],
                [
                    ("method", "method", ""),
                    ("img/s", "images_per_s", ".2f"),
                    ("x diffusers", "speedup_vs_diffusers", ".3f"),
                    ("max|diff| vs diffusers", "max_abs_diff_vs_diffusers", ".3g"),
                    ("max|diff| vs per-image", "max_abs_diff_vs_diffusers_per_image", ".3g"),
                    ("peak", "peak", ""),
                    ("compile s", "compile_s", ".1f"),
                ],
            )
        )
    for r in rows:
        if r["profile"]:
            print(f"\ntop ops of one promptset batch ({r['dtype']}):")
            print(
                common.table(
                    r["profile"],
                    [
                        ("op", "op", ""),
                        ("calls", "calls", "d"),
                        ("self ms", "self_ms", ".1f"),
                        ("share", "share", ".1%"),
                    ],
                )
            )
    notes = []
    if not args.model:
        notes.append("random-weight model: timings are representative, the images are noise")
    if gpu and "bf16" in args.dtypes:
        notes.append("bf16: diffusers keeps latents in bf16 between steps, promptset in fp32, so bf16 images differ")
    for n in notes:
        print("note:", n)
    return cli_common.write_payload(
        args, "generate", rows[0]["speedup"], "diffusers seconds / promptset seconds for the same images, median over "
        "alternating rounds (first dtype)", machine=info, settings=settings, rows=rows, t_start=T_START, notes=notes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
