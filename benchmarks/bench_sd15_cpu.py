"""SD-1.5's real shapes on CPU: one inversion step and generated images at 512 px, through the CLI.

Shape and memory bugs at the real size show here without a GPU. The model is the random-weight SD-1.5-shaped
diffusers folder of `promptset.backends.tiny.build_sd(folder, 'sd15')` (860M-parameter UNet, 123M text encoder,
84M VAE: SD-1.5's configs). The data folder holds two classes of one 512 px image each (invert refuses fewer than
two classes). Each stage runs as a user would run it, `python -m promptset ...` in its own process:

1. `invert --steps 1 --batch-size 1 --classes-per-batch 2`: load, VAE-encode the 2 images and their mirror images,
   exactly one optimizer step on one sample, write the prompts;
2. `generate --ipc 1 --sampler-batch 1` (one image per class, each denoised alone) with `--gen-steps` DDIM steps
   (default 25, promptset's default) and guidance 7.5;
3. the same with one DDIM step, and the first command again (every image is then already there, so that run is
   the fixed cost: imports, model load, checks, grid): the seconds per image, per DDIM step and of the rest
   (VAE decode, PNG) follow from the three.

Every child's wall time (spawn to exit) and peak RSS (`os.wait4`'s rusage of that child alone) are recorded, with
the seconds of the inversion step itself from `invert/metrics.jsonl`. The weights are memory-mapped from their
safetensors files and count in a process's RSS once they are touched (the rerun never touches them). A slow
benchmark (about 20 minutes on one thread, 6 GB of RAM): not part of the test suite. `--quick` runs the same on the
`tiny` shape in seconds (the script's own smoke test).

    python benchmarks/bench_sd15_cpu.py --threads 1 --json benchmarks/results/sd15_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_common  # noqa: E402
import common  # noqa: E402


def run_child(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` to completion; its wall seconds and peak RSS (this child alone, via wait4); fail loudly on error."""
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-8000:])
        raise SystemExit(f"benchmark subprocess failed ({proc.returncode}): {' '.join(cmd)}")
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli_common.add_run_flags(p, quick="the tiny shape instead of sd15 (a smoke run, seconds)",
                             model="an existing diffusers SD folder (default: build the random sd15 one)",
                             threads="torch threads in every child (OMP_NUM_THREADS)", threads_default=1,
                             work="scratch folder (default: a temporary one, deleted afterwards)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1, help="samples in the inversion step")
    cli_common.add_sampling_flags(p)
    args = p.parse_args(argv)
    if args.gen_steps < 2:
        p.error("--gen-steps must be at least 2 (a one-step run is measured besides it)")
    return args


CLASSES = ["airplane", "automobile"]  # invert refuses a single class


def main(argv=None) -> dict:
    args = parse_args(argv)
    size = "tiny" if args.quick else "sd15"
    env = common.quiet_env(args.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(common.REPO / "src"), env["PYTHONPATH"]])
    info = common.machine("cpu")
    info["torch_threads"] = args.threads
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_sd15_cpu_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = args.model
        if not model:  # built in a child too, so its memory is measured apart and the parent stays small
            model = str(work / f"model-{size}")
            if not (Path(model) / "model_index.json").is_file():
                build = f"import sys; from promptset.backends.tiny import build_sd; build_sd(sys.argv[1], {size!r})"
                rows["build"] = run_child([sys.executable, "-c", build, model], env, work / "build.log")
        vae = json.loads((Path(model) / "vae" / "config.json").read_text())
        unet = json.loads((Path(model) / "unet" / "config.json").read_text())
        resolution = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        data = common.make_image_folder(work / "data", CLASSES, 1, resolution)
        run = work / "run"
        cli = [sys.executable, "-m", "promptset"]
        flags = ["--device", "cpu", "--dtype", "fp32", "--no-progress"]
        print(f"{size} random-weight model on CPU, {resolution} px, {args.threads} thread(s)"
              + ("; this takes minutes" if size == "sd15" else ""), flush=True)  # fmt: skip
        rows["invert"] = run_child(
            cli + ["invert", "--out", str(run), "--model", model, "--data", str(data), "--steps", "1",
                   "--batch-size", str(args.batch_size), "--classes-per-batch", str(len(CLASSES)),
                   "--log-every", "1", "--overwrite", *flags],
            env, work / "invert.log",
        )  # fmt: skip
        metrics = [json.loads(line) for line in (run / "invert" / "metrics.jsonl").read_text().splitlines()]
        rows["invert"].update(step_s=metrics[-1]["seconds"], loss=metrics[-1]["loss"], samples=args.batch_size)
        _say("invert", rows["invert"])
        for name, steps, out in [("generate", args.gen_steps, "gen"), ("generate_1step", 1, "gen1"),
                                 ("generate_rerun", args.gen_steps, "gen")]:  # fmt: skip
            rows[name] = run_child(
                cli + ["generate", "--run", str(run), "--out", str(work / out), "--ipc", "1", "--batch-size", "1",
                       "--sampler-batch", "1", "--steps", str(steps), "--guidance", str(args.guidance),
                       "--image-size", str(resolution), *flags],
                env, work / f"{name}.log",
            )  # fmt: skip
            from PIL import Image

            with Image.open(work / out / "generated" / CLASSES[0] / "00000.png") as img:
                rows[name]["image_size"] = list(img.size)
            rows[name].update(ddim_steps=steps, images=0 if name == "generate_rerun" else len(CLASSES))
            _say(name, rows[name])
        weights = sum(f.stat().st_size for f in Path(model).rglob("*.safetensors"))
    n = len(CLASSES)
    fixed = rows["generate_rerun"]["wall_s"]  # imports, load, checks, manifest and grid: no image made
    step = (rows["generate"]["wall_s"] - rows["generate_1step"]["wall_s"]) / (n * (args.gen_steps - 1))
    per_image = (rows["generate"]["wall_s"] - fixed) / n
    derived = {
        "image_s": per_image,  # one image at --gen-steps, load excluded
        "ddim_step_s": step,  # one DDIM step of one image: a UNet call on 2 latents (guidance)
        "image_rest_s": per_image - args.gen_steps * step,  # VAE decode, noise, PNG
        "generate_fixed_s": fixed,
        # safetensors weights are mapped from the files and count in RSS once touched: the rerun, which makes no
        # image, never touches them (its peak is the process without the weights)
        "model_weights_bytes": weights,
    }
    for r in rows.values():
        r["peak_rss_gib"] = r["peak_rss_bytes"] / 2**30
    payload = {
        "benchmark": "sd15_cpu",
        "commit": common.git_commit(),
        "machine": info,
        "settings": {
            "model": args.model or "random-weight SD-1.5-shaped model from promptset.backends.tiny.build_sd",
            "size": size,
            "resolution": resolution,
            "device": "cpu",
            "dtype": "fp32",
            "threads": args.threads,
            "classes": n,
            "training_images_per_class": 1,
            "invert_steps": 1,
            "invert_batch_size": args.batch_size,
            "gen_steps": args.gen_steps,
            "guidance": args.guidance,
            "sampler": "ddim",
            "sampler_batch": 1,
            "images_per_class": 1,
        },
        "rows": rows,
        "derived": derived,
        "total_benchmark_s": sum(r["wall_s"] for r in rows.values()),
    }
    print(common.table([{"stage": k, **v} for k, v in rows.items()],
                       [("stage", "stage", ""), ("wall s", "wall_s", ".1f"), ("peak RSS GiB", "peak_rss_gib", ".2f"),
                        ("step s", "step_s", ".1f")]))  # fmt: skip
    print(f"one image at {args.gen_steps} DDIM steps: {per_image:.1f} s ({step:.2f} s per step, "
          f"{derived['image_rest_s']:.1f} s decode and the rest); generate's fixed cost {fixed:.1f} s")
    common.write_json(args.json, payload)
    return payload


def _say(name: str, row: dict) -> None:
    step = f", step {row['step_s']:.1f} s" if "step_s" in row else ""
    print(f"{name}: {row['wall_s']:.1f} s{step}, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
