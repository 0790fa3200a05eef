"""Time to distill C classes by textual inversion: promptset's one multi-class run vs. a diffusers-style run per class.

(a) promptset: `promptset.invert(...)` in one fresh process (one model load, latents encoded once and cached,
    `--classes-per-batch` classes mixed in every batch, only the (G, V, D) placeholder vectors train).
(b) baseline: `benchmarks/baseline_textual_inversion.py`, one fresh process and model load per class, doing per step
    what diffusers' textual-inversion example does (see that file).

Equal work: every class sees S * B training samples in both. The baseline runs S steps of B samples of one class per
class; promptset runs S * G steps per group of G classes with B / G samples of each class per step. Both make C * S
optimizer steps of batch B in total. Wall times run from spawning the process(es) to their exit, as a shell loop
over classes would wait for them, so they include interpreter start-up, imports, model loads and interpreter
teardown (about 1 s per process once diffusers is imported); the time to the learned vectors on disk is reported
beside it. The time-to-distill ratio grows with C (the baseline pays its fixed cost per class, promptset once):
the script also prints the ratio projected to more classes from this run's fixed and per-class costs. The steady
per-step throughput is reported twice: from the runs themselves (warm-up excluded), and from both step functions
timed in one process in alternating blocks (median of rounds; robust to other jobs on a shared machine). FLOPs of
one step of each come from FlopCounterMode; MFU divides the achieved FLOP/s by the GPU's dense peak for the dtype
(table in common.py).

    python benchmarks/bench_invert.py --quick --json bench_invert.json          # CPU, tiny model, 8 classes, < 1 min
    python benchmarks/bench_invert.py --device cuda --json bench_invert_gpu.json  # SD-1.5 shapes, 512 px, bf16
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
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

TEMPLATE = "a photo of {token}"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What both methods distill, and where they write: the model folder, the ImageFolder of the classes, the class
    folder names, the training resolution (0: the model's native) and the scratch folder."""

    model: str
    data: Path
    names: list[str]
    resolution: int
    work: Path


# ---------------------------------------------------------------------------------------------------------------
# worker: promptset's run, in its own process (so its wall time includes start-up like the baseline's)
def ours_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    common.quiet_libraries()
    from promptset.stages.invert import invert

    t_imported = time.perf_counter()
    invert(**spec["invert"])
    t_trained = time.perf_counter()
    device = torch.device(spec["device"])
    result = {
        "t_start": T_START,
        "t_imported": t_imported,
        "t_trained": t_trained,
        "metrics": [json.loads(line) for line in (Path(spec["invert"]["out"]) / "invert" / "metrics.jsonl").open()],
        "max_rss_kb": common.max_rss_mb() * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# interleaved steady-state steps: both methods in one process, alternating, so drifting load hits both alike
def ours_step_fn(backend, group: int, repeats: int, words: list[str], resolution: int, lr: float):
    """One promptset inversion step: the loop body of `promptset.stages.invert._train_group` on cached latents."""
    layout = backend.layout(TEMPLATE, 1)
    init = torch.stack([backend.initializer_vector(w) for w in words[:group]]).unsqueeze(1)  # (G, 1, D)
    vectors = torch.nn.Parameter(init.to(backend.device))
    optimizer = torch.optim.AdamW([vectors], lr=lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    side = resolution // backend.autoencoder.downscale
    cache = torch.randn(group, 16, 2, backend.autoencoder.latent_channels, side, side, device=backend.device)
    generator = torch.Generator().manual_seed(0)
    sample_class = torch.arange(group).repeat(repeats)  # (B,)

    def step():
        pick = torch.randint(0, 16, (len(sample_class),), generator=generator)
        view = torch.randint(0, 2, (len(sample_class),), generator=generator)
        latents = cache[sample_class, pick, view]  # (B, c, h, w)
        states = backend.encode_placeholder_prompts(layout, vectors).repeat(repeats, 1, 1)  # (B, L, D_text)
        loss = backend.denoising_loss(latents, states, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def baseline_argv(model: str, data: Path, name: str, output_dir: str, args, dtype: str, resolution: int) -> list[str]:
    """The baseline's command-line flags for one class (shared by the in-process step and the subprocess run)."""
    return [
        "--pretrained_model_name_or_path", model,
        "--train_data_dir", str(data / name),
        "--placeholder_token", f"<{name}>",
        "--initializer_token", name,
        "--output_dir", output_dir,
        "--resolution", str(resolution),
        "--train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.lr),
        "--mixed_precision", "bf16" if dtype == "bf16" else "no",
        "--device", args.device,
    ]  # fmt: skip


def baseline_step_fn(model: str, data: Path, name: str, args, dtype: str, resolution: int):
    """One step of the diffusers-style baseline, drawing its batch from its Dataset as the example does."""
    import baseline_textual_inversion as bl

    bargs = bl.parse_args(baseline_argv(model, data, name, "-", args, dtype, resolution))
    m = bl.load(bargs)
    m["text_encoder"].train()
    dataset = bl.TextualInversionDataset(
        bargs.train_data_dir,
        m["tokenizer"],
        resolution,
        bargs.placeholder_token,
        bargs.repeats,
        bl.TEMPLATES[bargs.templates],
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    state = {"it": iter(loader)}

    def next_batch():
        batch = next(state["it"], None)
        if batch is None:
            state["it"] = iter(loader)
            batch = next(state["it"])
        return batch

    def step(batch=None):
        loss = bl.train_step(m, batch if batch is not None else next_batch())
        loss.detach().item()  # the example logs loss.item() every step
        return loss

    return step, next_batch


def interleaved_steps(args, inputs: Inputs, dtype: str) -> dict:
    """Steady seconds per step of both methods, timed in blocks that alternate between them; FLOPs of one step."""
    import gc

    from torch.utils.flop_counter import FlopCounterMode

    from promptset.backends import create_backend

    device = torch.device(args.device)
    model, data, names, resolution = inputs.model, inputs.data, inputs.names, inputs.resolution
    backend = create_backend("sd", model, device=args.device, dtype=dtype)
    g = args.classes_per_batch
    steps = {"promptset": ours_step_fn(backend, g, args.batch_size // g, names, resolution, args.lr)}
    steps["baseline"], next_batch = baseline_step_fn(model, data, names[0], args, dtype, resolution)
    flops = {}
    for k, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step(next_batch()) if k == "baseline" else step()
        flops[k] = int(counter.get_total_flops())
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    common.sync(device)
    times = {k: [] for k in steps}
    for r in range(args.interleave_rounds):
        for k in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            common.sync(device)
            t0 = time.perf_counter()
            for _ in range(args.interleave_steps):
                steps[k]()
            common.sync(device)
            times[k].append((time.perf_counter() - t0) / args.interleave_steps)
    del steps, backend
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ratios = sorted(b / o for o, b in zip(times["promptset"], times["baseline"]))
    return {
        "step_s": {k: sorted(v)[len(v) // 2] for k, v in times.items()},
        "rounds": times,
        "flops": flops,
        "ratio": ratios[len(ratios) // 2],
    }


# ---------------------------------------------------------------------------------------------------------------
# parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli_common.add_common_flags(p, quick="CPU, tiny model, 8 classes x 8 steps of batch 8 (under a minute)",
                                resolution="training resolution (default: the model's)",
                                threads="torch threads in every process (0: torch's default)",
                                work="scratch folder (default: a temporary one, deleted afterwards)")  # fmt: skip
    p.add_argument(
        "--mini-model", default="", help="also time promptset alone on this `mini` model folder (no baseline)"
    )
    p.add_argument("--classes", type=int, default=0, help="number of classes C")
    p.add_argument("--steps", type=int, default=0, help="steps per class S of the one-class baseline")
    p.add_argument("--batch-size", type=int, default=0, help="batch size B (both)")
    p.add_argument("--classes-per-batch", type=int, default=0, help="promptset's G (default min(C, B))")
    p.add_argument("--images-per-class", type=int, default=0, help="training images per class")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps excluded from the steady per-step figures")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate (both)")
    p.add_argument("--interleave-rounds", type=int, default=3, help="alternating timed blocks per method (median)")
    p.add_argument("--interleave-steps", type=int, default=0, help="steps per timed block (default 10 CPU, 5 GPU)")
    args = p.parse_args(argv)
    gpu = cli_common.finish_common(p, args)
    if args.quick:
        # as many classes as fit in a minute on 2 cores: the ratio grows with C (see the projection it prints)
        args.classes, args.steps, args.batch_size = args.classes or 8, args.steps or 8, args.batch_size or 8
        args.warmup = min(args.warmup, 3)
    args.classes = args.classes or (4 if gpu else 10)
    args.steps = args.steps or (10 if gpu else 50)  # GPU: the run fits a 10-minute call (benchmarks/README.md)
    args.batch_size = args.batch_size or (8 if gpu else 10)  # a multiple of the default G = min(C, B)
    args.images_per_class = args.images_per_class or (8 if gpu else 10)
    args.interleave_steps = args.interleave_steps or (5 if gpu else 10)
    args.classes_per_batch = args.classes_per_batch or min(args.classes, args.batch_size)
    if args.batch_size % args.classes_per_batch:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --classes-per-batch {args.classes_per_batch}")
    if args.classes % args.classes_per_batch:
        p.error("--classes must be a multiple of --classes-per-batch, so every class sees the same samples")
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    return args


def run_ours(args, inputs: Inputs, dtype: str, backend: str = "sd", gradient_checkpointing: bool = False) -> dict:
    g, work = args.classes_per_batch, inputs.work
    tag = f"ours-{backend}-{dtype}{'-gc' if gradient_checkpointing else ''}"
    invert_cfg = {
        "out": str(work / tag),
        "backend": backend,
        "model": inputs.model,
        "data": str(inputs.data),
        "steps": args.steps * g,
        "batch_size": args.batch_size,
        "classes_per_batch": g,
        "lr": args.lr,
        "resolution": inputs.resolution,
        "initializers": ",".join(inputs.names),
        "device": args.device,
        "dtype": dtype,
        "log_every": args.warmup,
        "progress": False,
        "overwrite": True,
        "seed": 0,
    }
    if gradient_checkpointing:
        invert_cfg["gradient_checkpointing"] = True
    spec = {"invert": invert_cfg, "device": args.device, "result": str(work / f"{tag}.json")}
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    t_spawn, t_exit = common.run_subprocess(
        [sys.executable, __file__, "--_worker", str(spec_path)], env=common.quiet_env(args.threads)
    )
    r = json.loads(Path(spec["result"]).read_text())
    # steady state: per group, from the end of the first log interval (= warm-up) to its last row
    steady_s = steady_n = loop_s = 0.0
    for grp in sorted({m["group"] for m in r["metrics"]}):
        rows = sorted((m for m in r["metrics"] if m["group"] == grp), key=lambda m: m["step"])
        loop_s += rows[-1]["seconds"]
        steady_s += rows[-1]["seconds"] - rows[0]["seconds"]
        steady_n += rows[-1]["step"] - rows[0]["step"]
    step_s = steady_s / steady_n
    wall = t_exit - t_spawn
    return {
        "method": "promptset",
        "backend": backend,
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "wall_s": wall,
        "to_vectors_s": r["t_trained"] - t_spawn,
        "startup_s": r["t_imported"] - t_spawn,
        "setup_s": r["t_trained"] - r["t_imported"] - loop_s,
        "loop_s": loop_s,
        "teardown_s": t_exit - r["t_trained"],
        "optimizer_steps": args.steps * args.classes,
        "in_run_step_s": step_s,
        "in_run_samples_per_s": args.batch_size / step_s,
        "distill_samples_per_s": args.classes * args.steps * args.batch_size / wall,
        "peak_gpu_bytes": r["peak_gpu_bytes"],
        "max_rss_mb": r["max_rss_kb"] / 1024,
        "processes": 1,
    }


def run_baseline(args, inputs: Inputs, dtype: str, gradient_checkpointing: bool = False) -> dict:
    tag = f"baseline-{dtype}{'-gc' if gradient_checkpointing else ''}"
    model, data, work, resolution = inputs.model, inputs.data, inputs.work, inputs.resolution
    per_class, wall = [], 0.0
    for name in inputs.names:
        result = work / f"{tag}-{name}.json"
        cmd = [
            sys.executable,
            str(common.BENCH_DIR / "baseline_textual_inversion.py"),
            *baseline_argv(model, data, name, str(work / tag / name), args, dtype, resolution),
            "--max_train_steps",
            str(args.steps),
            "--result_json",
            str(result),
        ]
        if gradient_checkpointing:
            cmd.append("--gradient_checkpointing")
        t_spawn, t_exit = common.run_subprocess(cmd, env=common.quiet_env(args.threads))
        r = json.loads(result.read_text())
        r["t_spawn"], r["t_exit"] = t_spawn, t_exit
        per_class.append(r)
        wall += t_exit - t_spawn
    steady = [s for r in per_class for s in r["step_seconds"][args.warmup :]]
    step_s = sum(steady) / len(steady)
    n = len(per_class)
    peaks = [r["peak_gpu_bytes"] for r in per_class if r["peak_gpu_bytes"] is not None]
    return {
        "method": "baseline",
        "backend": "sd",
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "wall_s": wall,
        "to_vectors_s": sum(r["t_saved"] - r["t_spawn"] for r in per_class),
        "startup_s": sum(r["t_imported"] - r["t_spawn"] for r in per_class),
        "setup_s": sum(r["t_loaded"] - r["t_imported"] + r["t_saved"] - r["t_trained"] for r in per_class),
        "loop_s": sum(sum(r["step_seconds"]) for r in per_class),
        "teardown_s": sum(r["t_exit"] - r["t_saved"] for r in per_class),
        "optimizer_steps": args.steps * n,
        "in_run_step_s": step_s,
        "in_run_samples_per_s": args.batch_size / step_s,
        "distill_samples_per_s": n * args.steps * args.batch_size / wall,
        "peak_gpu_bytes": max(peaks) if peaks else None,
        "max_rss_mb": max(r["max_rss_kb"] for r in per_class) / 1024,
        "processes": n,
        "per_class_wall_s": [r["t_exit"] - r["t_spawn"] for r in per_class],
    }


PROJECT_TO = (10, 100, 1000)  # CIFAR-10, CIFAR-100, ImageNet-1K


def project(ours: dict, base: dict, classes: int) -> dict:
    """Time-to-distill ratio extrapolated to more classes from this run's costs (a projection, not a measurement).

    Baseline: C times its mean per-class wall time. promptset: its fixed cost (wall minus training loop) plus C times
    its loop time per class (latent encoding, which also grows with C, is inside the fixed part: a small
    underestimate of promptset's time)."""
    per_class_base = base["wall_s"] / classes
    per_class_ours = ours["loop_s"] / classes
    fixed_ours = ours["wall_s"] - ours["loop_s"]
    return {str(c): c * per_class_base / (fixed_ours + c * per_class_ours) for c in PROJECT_TO}


def finish_row(row: dict, device_name: str, interleaved: dict | None = None) -> dict:
    """Add the interleaved steady step, FLOPs and MFU (from the interleaved step time) to a method's row."""
    key = "promptset" if row["method"] == "promptset" else "baseline"
    if interleaved is not None:
        row["steady_step_s"] = interleaved["step_s"][key]
        row["steady_samples_per_s"] = row["batch_size"] / row["steady_step_s"]
        row["flops_per_step"] = interleaved["flops"][key]
    else:
        row["steady_step_s"] = row["steady_samples_per_s"] = row["flops_per_step"] = None
    row.update(common.mfu(row["flops_per_step"], row["steady_step_s"], device_name, row["dtype"]))
    row["peak_gpu"] = common.fmt_bytes(row["peak_gpu_bytes"])
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    gpu = args.device.startswith("cuda")
    info = cli_common.start(args)
    with tempfile.TemporaryDirectory(prefix="bench_invert_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, build_s = cli_common.model_folder(args, work)
        from diffusers import UNet2DConditionModel

        unet_cfg = UNet2DConditionModel.load_config(Path(model) / "unet")
        native = int(unet_cfg["sample_size"]) * 2 ** (
            len(json.loads((Path(model) / "vae" / "config.json").read_text())["block_out_channels"]) - 1
        )
        resolution = args.resolution or native
        names = common.cifar_names(args.classes)
        data = common.make_image_folder(work / "data", names, args.images_per_class, resolution)
        inputs = Inputs(model, data, names, resolution, work)
        settings = {
            **cli_common.model_settings(args, model),
            "device": args.device,
            "dtypes": args.dtypes,
            "resolution": resolution,
            "classes": args.classes,
            "steps_per_class_baseline": args.steps,
            "steps_per_group_promptset": args.steps * args.classes_per_batch,
            "batch_size": args.batch_size,
            "classes_per_batch": args.classes_per_batch,
            "samples_per_class": args.steps * args.batch_size,
            "total_optimizer_steps": args.steps * args.classes,
            "images_per_class": args.images_per_class,
            "warmup_steps": args.warmup,
            "lr": args.lr,
            "model_build_s": build_s,
            "threads": args.threads or torch.get_num_threads(),
            "equal_work": "every class sees S*B samples: baseline S steps of B samples of one class; promptset "
            "S*G steps per group of G classes with B/G samples per class per step",
        }
        print(
            f"invert benchmark: {args.classes} classes x {args.steps * args.batch_size} samples each, batch "
            f"{args.batch_size}, {resolution} px, {common.model_label(args.size, args.model)}, {args.device}"
        )
        rows, notes = [], []
        from promptset.stages.invert import InvertConfig

        gc_supported = "gradient_checkpointing" in InvertConfig.__dataclass_fields__
        if not gc_supported:
            notes.append("gradient checkpointing: skipped, promptset.invert has no gradient_checkpointing option")
        variants = [False, True] if gc_supported and gpu else [False]
        for dtype in args.dtypes:
            for gc in variants:
                ours = run_ours(args, inputs, dtype, gradient_checkpointing=gc)
                base = run_baseline(args, inputs, dtype, gradient_checkpointing=gc)
                inter = None if gc else interleaved_steps(args, inputs, dtype)
                for row in (ours, base):
                    row["batch_size"] = args.batch_size
                    finish_row(row, info["device_name"], inter)
                ours["time_to_distill_speedup"] = base["wall_s"] / ours["wall_s"]
                ours["projected_time_to_distill_speedup"] = project(ours, base, args.classes)
                ours["in_run_throughput_speedup"] = ours["in_run_samples_per_s"] / base["in_run_samples_per_s"]
                ours["steady_throughput_speedup"] = inter["ratio"] if inter else None
                ours["interleaved_rounds_s"] = inter["rounds"] if inter else None
                rows += [ours, base]
        if args.mini_model:
            from importlib.util import find_spec

            if find_spec("promptset.backends.mini") is None:
                notes.append("mini: skipped, promptset.backends.mini does not exist")
            else:
                mini = dataclasses.replace(inputs, model=args.mini_model, resolution=0)
                row = run_ours(args, mini, args.dtypes[0], "mini")
                row["batch_size"] = args.batch_size
                rows.append(finish_row(row, info["device_name"]))
        else:
            notes.append("mini: not run (pass --mini-model FOLDER; the baseline is SD-only)")

    headline = rows[0]
    print(common.table(rows, _columns(rows)))
    for r in rows:
        if "time_to_distill_speedup" in r:
            print(
                f"{r['dtype']}{' +gc' if r['gradient_checkpointing'] else ''}: time to distill {r['wall_s']:.2f} s "
                f"vs {next(b for b in rows if b['method'] == 'baseline' and b['dtype'] == r['dtype'])['wall_s']:.2f} s"
                f" -> {r['time_to_distill_speedup']:.2f}x; steady per-step throughput "
                f"{r['steady_throughput_speedup'] or float('nan'):.2f}x"
                f" (interleaved in one process; {r['in_run_throughput_speedup']:.2f}x from the runs themselves)"
            )
            proj = ", ".join(f"{c} classes {x:.1f}x" for c, x in r["projected_time_to_distill_speedup"].items())
            print(f"  projected from this run's fixed and per-class costs (not measured): {proj}")
    for n in notes:
        print("note:", n)
    if not args.model:
        print("note: random-weight model (SD-1.5 shapes)" if args.size == "sd15" else "note: random-weight tiny model")
    return cli_common.write_payload(
        args, "invert", headline["time_to_distill_speedup"], "baseline time to distill / promptset time to distill "
        "(first dtype)", head={"steady_throughput_speedup": headline["steady_throughput_speedup"]}, machine=info,
        settings=settings, rows=rows, t_start=T_START, notes=notes,
    )  # fmt: skip


def _columns(rows):
    for r in rows:
        r["flops_gflop"] = r["flops_per_step"] / 1e9 if r.get("flops_per_step") else None
        r["step_ms"] = r["steady_step_s"] * 1e3 if r.get("steady_step_s") else None
        r["in_run_step_ms"] = r["in_run_step_s"] * 1e3
    return [
        ("method", "method", ""),
        ("dtype", "dtype", ""),
        ("procs", "processes", "d"),
        ("wall s", "wall_s", ".2f"),
        ("start-up s", "startup_s", ".2f"),
        ("setup s", "setup_s", ".2f"),
        ("loop s", "loop_s", ".2f"),
        ("exit s", "teardown_s", ".2f"),
        ("run step ms", "in_run_step_ms", ".3g"),
        ("step ms", "step_ms", ".3g"),
        ("steady samp/s", "steady_samples_per_s", ".1f"),
        ("distill samp/s", "distill_samples_per_s", ".1f"),
        ("GFLOP/step", "flops_gflop", ".3g"),
        ("TFLOP/s", "achieved_tflops", ".3g"),
        ("MFU", "mfu", ".1%"),
        ("peak GPU", "peak_gpu", ""),
        ("max RSS MiB", "max_rss_mb", ".0f"),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        ours_worker(sys.argv[2])
    else:
        main()
