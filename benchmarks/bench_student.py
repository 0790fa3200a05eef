"""Student images/s under protocol P1 with fresh variations, split into time regenerating and time training.

P1 (D3M): every `--regen-every` epochs a new round of C x ipc images is drawn from the prompts with new seeds
(`generate_batch`, as `promptset.evaluation.methods.build_generative` does) and labelled once by the teacher (stored
soft labels); the student (`create_student`, ConvNet-3 by default) trains on them with
`promptset.evaluation.student.train_student` at a fixed total number of optimizer steps (epochs x ceil(N / B)).
Regeneration, teacher labelling and training are timed separately. The alternative is the same rounds regenerated with
diffusers' `StableDiffusionPipeline` (same DDIM steps, guidance, conditioning and seeds, and the same number of images
per UNet call: evaluate's `--sampler-batch`, 8 by default). promptset denoises the jobs of all rounds as one list, as
evaluate does (`promptset.evaluation.rounds`), padding its last micro batch so that an image never depends on the
batch; the pipeline runs each round's last call short. `speedup` = (pipeline regen + labels + training) /
(promptset regen + labels + training).

    python benchmarks/bench_student.py --quick --json bench_student.json
    python benchmarks/bench_student.py --device cuda --json bench_student_gpu.json   # SD-1.5 shapes, 512 px
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import promptset  # noqa: F401, E402  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch  # noqa: E402

torch.set_flush_denormal(True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402
import cli_common  # noqa: E402
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli_common.add_common_flags(p, quick="CPU, tiny generator, 10 classes x 5 ipc, 20 epochs, 2 rounds",
                                what="generator", device="cpu or cuda[:i]",
                                dtype="generator dtype (fp32 on CPU, bf16 on GPU)",
                                resolution="generation resolution (default: the model's native)")  # fmt: skip
    p.add_argument("--classes", type=int, default=10, help="classes C")
    p.add_argument("--ipc", type=int, default=0, help="images per class per round")
    p.add_argument("--epochs", type=int, default=0, help="student epochs (default 100; 20 with --quick or on GPU)")
    p.add_argument("--regen-every", type=int, default=10, help="new images every N epochs (P1 fresh variations)")
    p.add_argument("--batch-size", type=int, default=64, help="student batch size")
    p.add_argument("--student", default="convnet3", help="student network")
    p.add_argument("--image-size", type=int, default=32, help="student input side (generated images are resized)")
    cli_common.add_sampling_flags(p)
    p.add_argument("--gen-batch-size", type=int, default=32, help="images per progress step (evaluate's default)")
    p.add_argument(
        "--sampler-batch", type=int, default=8, help="images per UNet call, both generators (evaluate's default)"
    )
    p.add_argument(
        "--teacher",
        default="",
        help="teacher NAME:PATH.safetensors (default: ../shared/weights "
        "resnet20 when present, else a random-init resnet20)",
    )
    p.add_argument("--no-pipeline", action="store_true", help="skip regenerating with the diffusers pipeline")
    p.add_argument(
        "--batched",
        action="store_true",
        help="also regenerate with generate_batch(micro_batch=None) (what batching would buy)",
    )
    args = p.parse_args(argv)
    gpu = cli_common.finish_common(p, args, half_on_cpu=True)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.ipc = args.ipc or (5 if args.quick else 10)
    args.epochs = args.epochs or (20 if args.quick or gpu else 100)  # GPU: 2 rounds of 512 px images, minutes
    if args.regen_every <= 0:
        p.error("--regen-every must be positive (this benchmark measures fresh variations)")
    return args


def load_teacher(spec: str, num_classes: int, device):
    from promptset.models import cifar_resnet, load_teacher

    if not spec:
        shared = common.REPO.parent / "shared" / "weights" / "cifar10_resnet20.safetensors"
        if shared.is_file() and num_classes == 10:
            spec = f"resnet20:{shared}"
    if spec:
        return load_teacher(spec, num_classes=num_classes, device=str(device)), spec
    net = cifar_resnet(20, num_classes=num_classes).to(device).eval()
    return net, "random-init resnet20"


def regenerate(fn, jobs, gen_batch: int, image_size: int, device) -> tuple[float, torch.Tensor]:
    """All images of one round through `fn(batch) -> (B, 3, H, W)`; resized to the student's side, uint8."""
    import torch.nn.functional as F

    common.sync(device)
    t0 = time.perf_counter()
    outs = []
    for s in range(0, len(jobs), gen_batch):
        images = fn(jobs[s : s + gen_batch]).float()  # (B, 3, H, W) in [0, 1] on CPU
        if images.shape[-1] != image_size:
            images = F.interpolate(
                images, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
        outs.append((images * 255).round().to(torch.uint8))
    common.sync(device)
    return time.perf_counter() - t0, torch.cat(outs)


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = cli_common.start(args)
    from promptset.backends.sampling import jobs_for
    from promptset.evaluation.methods import teacher_logits
    from promptset.evaluation.rounds import job_step
    from promptset.evaluation.student import TrainSet, train_student
    from promptset.models import create_student
    from promptset.stages.evaluate import EvaluateConfig, _recipe

    device = torch.device(args.device)
    names = common.cifar_names(args.classes)
    n = args.classes * args.ipc
    rounds = math.ceil(args.epochs / args.regen_every)
    with tempfile.TemporaryDirectory(prefix="bench_student_") as tmp:
        work = Path(args.work or tmp)
        model, build_s = cli_common.model_folder(args, work)
        spec = {
            "model": model,
            "device": args.device,
            "dtype": args.dtype,
            "names": names,
            "conditioner": "prompt",
            "images_per_class": 1,
            "batch_size": args.gen_batch_size,
            "steps": args.gen_steps,
            "guidance": args.guidance,
            "resolution": args.resolution,
        }
        backend, conditioner, uncond, _ = bench_generate.setup(spec)
        teacher, teacher_spec = load_teacher(args.teacher, args.classes, device)
        gens = {
            "promptset": bench_generate.ours_fn(spec, backend, conditioner, uncond, micro_batch=args.sampler_batch)
        }
        if args.batched and bench_generate.supports_micro_batch():
            gens["promptset_batched"] = bench_generate.ours_fn(spec, backend, conditioner, uncond, micro_batch=None)
        if not args.no_pipeline:
            pipe = bench_generate.diffusers_fn(spec, backend, conditioner, uncond)
            gens["diffusers"] = lambda jobs, pipe=pipe, k=args.sampler_batch: torch.cat(
                [pipe(jobs[i : i + k]) for i in range(0, len(jobs), k)]
            )  # the same images per UNet call as promptset
        print(
            f"student benchmark (P1, fresh variations): {args.student} on {args.classes} classes x {args.ipc} ipc "
            f"= {n} images per round, {rounds} rounds ({args.epochs} epochs, new images every {args.regen_every}), "
            f"batch {args.batch_size}; generator: {common.model_label(args.size, args.model)}, "
            f"DDIM {args.gen_steps}, {args.device} {args.dtype}, {torch.get_num_threads()} threads"
        )
        warm = jobs_for([0], 1, seed=123, stage="warmup")
        for fn in gens.values():
            fn(warm)  # one-time costs (allocations, kernel selection) outside the timed rounds

        # ---- regeneration (+ teacher labels) ------------------------------------------------------------------
        # promptset as evaluate does it (`evaluation.rounds`): the jobs of every round in one list, in steps of
        # `job_step` jobs, each padded to whole micro batches (one padded tail for all rounds); the pipeline round
        # by round in calls of `--sampler-batch` images, its last call short. Each is timed twice, alternating, and
        # its faster pass counts.
        round_jobs = [jobs_for(list(range(args.classes)), args.ipc, seed=0, stage="generate" if r == 0 else
                               f"eval-round{r}") for r in range(rounds)]
        all_jobs = [j for jobs in round_jobs for j in jobs]
        step = job_step(args.gen_batch_size, args.sampler_batch, 1)
        passes = {k: [] for k in gens}
        for attempt in range(2):
            for k in (list(gens) if attempt == 0 else list(gens)[::-1]):
                if k == "diffusers":
                    seconds = 0.0
                    for jobs in round_jobs:
                        dt, _ = regenerate(gens[k], jobs, args.gen_batch_size, args.image_size, device)
                        seconds += dt
                else:
                    seconds, images = regenerate(gens[k], all_jobs, step, args.image_size, device)
                    if k == "promptset":
                        ours_images = images
                passes[k].append(seconds)
        gen_s = {k: min(v) for k, v in passes.items()}
        label_s = 0.0
        train_rounds = []
        for r in range(rounds):
            common.sync(device)
            t0 = time.perf_counter()
            images = ours_images[r * n : (r + 1) * n].to(device)
            logits = teacher_logits(teacher, images).to(torch.float16).float()  # P1: stored as fp16
            common.sync(device)
            label_s += time.perf_counter() - t0
            labels = torch.arange(args.classes).repeat_interleave(args.ipc).to(device)
            train_rounds.append(TrainSet(images, labels, logits))

        # ---- student training on the rounds ------------------------------------------------------------------
        cfg = EvaluateConfig(
            protocol="p1",
            epochs=args.epochs,
            batch_size=args.batch_size,
            regen_every=args.regen_every,
            eval_every=args.epochs,
            progress=False,
        )
        recipe = _recipe(cfg)  # the exact P1 recipe evaluate would use
        test = TrainSet(
            torch.randint(
                0, 256, (args.classes * 20, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device
            ),
            torch.arange(args.classes).repeat_interleave(20).to(device),
        )
        warm_recipe = _recipe(
            EvaluateConfig(
                protocol="p1",
                epochs=1,
                batch_size=args.batch_size,
                regen_every=args.regen_every,
                eval_every=1,
                progress=False,
            )
        )
        train_student(
            create_student(args.student, args.classes, args.image_size).to(device),
            train_rounds[:1],
            test,
            warm_recipe,
            seed=1,
            progress=False,
        )  # warm-up
        student = create_student(args.student, args.classes, args.image_size).to(device)
        common.sync(device)
        t0 = time.perf_counter()
        out = train_student(student, train_rounds, test, recipe, seed=0, progress=False)
        common.sync(device)
        train_s = time.perf_counter() - t0

    steps = out["optimizer_steps"]
    samples_seen = args.epochs * n
    generated = rounds * n
    rows = []
    for k in gens:
        total = gen_s[k] + label_s + train_s
        rows.append(
            {
                "generator": k,
                "regen_s": gen_s[k],
                "regen_images_per_s": generated / gen_s[k],
                "label_s": label_s,
                "train_s": train_s,
                "train_samples_per_s": samples_seen / train_s,
                "total_s": total,
                "student_images_per_s": samples_seen / total,
                "regen_share": gen_s[k] / total,
            }
        )
    by = {r["generator"]: r for r in rows}
    speedup = by["diffusers"]["total_s"] / by["promptset"]["total_s"] if "diffusers" in by else None
    print(
        common.table(
            rows,
            [
                ("generator", "generator", ""),
                ("regen s", "regen_s", ".2f"),
                ("regen img/s", "regen_images_per_s", ".2f"),
                ("labels s", "label_s", ".2f"),
                ("train s", "train_s", ".2f"),
                ("train samp/s", "train_samples_per_s", ".0f"),
                ("total s", "total_s", ".2f"),
                ("student samp/s", "student_images_per_s", ".1f"),
                ("regen share", "regen_share", ".1%"),
            ],
        )
    )
    print(
        f"{rounds} rounds x {n} images generated = {generated}; {steps} optimizer steps, {samples_seen} samples "
        f"seen; a fixed set (regen_every 0) would generate {n} images once"
    )
    if speedup is not None:
        print(
            f"end to end: promptset {by['promptset']['total_s']:.2f} s vs diffusers-pipeline regeneration "
            f"{by['diffusers']['total_s']:.2f} s -> {speedup:.3f}x"
        )
    settings = {
        "protocol": "p1",
        "fresh_variations": True,
        "student": args.student,
        "classes": args.classes,
        "ipc": args.ipc,
        "epochs": args.epochs,
        "regen_every": args.regen_every,
        "rounds": rounds,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "generator_size": args.size,
        "random_weights": not args.model,
        "generator_resolution": backend.resolution,
        "gen_steps": args.gen_steps,
        "guidance": args.guidance,
        "gen_batch_size": args.gen_batch_size,
        "sampler_batch": args.sampler_batch,
        "dtype": args.dtype,
        "teacher": teacher_spec,
        "threads": torch.get_num_threads(),
        "model_build_s": build_s,
        "evaluate_api": "promptset.evaluation.student.train_student + stages.evaluate._recipe(p1)",
        "regeneration": "promptset: all rounds' jobs as one list in steps of evaluation.rounds.job_step; "
        "diffusers: round by round; the faster of two alternating passes each",
    }
    return cli_common.write_payload(
        args, "student", speedup, "(diffusers-pipeline regeneration + labels + training) / (promptset regeneration "
        "+ labels + training)", machine=info, settings=settings, rows=rows, t_start=T_START,
        training={"optimizer_steps": steps, "samples_seen": samples_seen, "final_top1_on_noise": out["final_top1"]},
        images_generated=generated,
    )  # fmt: skip


if __name__ == "__main__":
    main()
