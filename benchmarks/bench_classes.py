"""Per-class cost of the whole pipeline at 100 vs 1000 classes: does the bookkeeping scale with the class count?

select, invert, generate and evaluate run in one fresh process per class count (so peak RSS is per count), on C
classes of 2 tiny images each, with the tiny random-weight SD model (`promptset.backends.tiny`, 16 px): every stage
does its real per-class work (collages, one token per class in groups of `--batch-size` classes, ipc images per
class, a student trained and tested on all classes), but each model call is cheap, so the times are dominated by
what grows with the class count: file scanning, manifests, hashing, grouping, label files. Reports seconds per stage
and per class, and `per_class_ratio` = (seconds per class at the largest count) / (at the smallest): issue 16 asks
that it stay within 1.3.

    python benchmarks/bench_classes.py --quick --threads 1 --json benchmarks/results/bench_classes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cli_common
from common import build_model, machine, make_image_folder, max_rss_mb, quiet_env, quiet_libraries, table, write_json

STAGES = ("select", "invert", "generate", "evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli_common.add_run_flags(p, quick="CPU smoke settings (the defaults below; a few minutes)",
                             model="an existing diffusers folder (default: build the tiny SD)",
                             threads="torch threads per process (0: torch's default)", work=None)  # fmt: skip
    p.add_argument("--classes", default="100,1000", help="comma-separated class counts")
    p.add_argument("--images", type=int, default=2, help="real training images per class")
    p.add_argument("--ipc", type=int, default=2, help="generated images per class")
    p.add_argument("--steps", type=int, default=2, help="inversion steps per class group (and denoising steps)")
    p.add_argument("--batch-size", type=int, default=8, help="inversion batch (= classes per group)")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)  # one class count, in this process
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """Every stage on `args.child` classes in this process; prints one JSON line."""
    import torch

    import promptset

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    c = args.child
    names = [f"c{i:04d}" for i in range(c)]
    make_image_folder(root / "train", names, args.images, 16, seed=0)
    make_image_folder(root / "test", names, 1, 16, seed=1)
    run = root / "run"
    quiet = {"device": "cpu", "progress": False}
    seconds = {}
    calls = {
        "select": lambda: promptset.select(data=str(root / "train"), out=str(run), resolution=16, factor=1,
                                           num_crops=2, **quiet),
        "invert": lambda: promptset.invert(out=str(run), backend="sd", model=args.model, steps=args.steps,
                                           batch_size=args.batch_size, resolution=16, checkpoint_every=1000,
                                           log_every=args.steps, **quiet),
        "generate": lambda: promptset.generate(run=str(run), ipc=args.ipc, steps=args.steps, **quiet),
        "evaluate": lambda: promptset.evaluate(run=str(run), test=str(root / "test"), method="d3m", protocol="p2",
                                               student="convnet_tiny", ipc=args.ipc, epochs=1, seeds=1,
                                               report=False, **quiet),
    }
    for stage in STAGES:
        t0 = time.perf_counter()
        calls[stage]()
        seconds[stage] = time.perf_counter() - t0
    print(json.dumps({"classes": c, "seconds": seconds, "peak_rss_mb": max_rss_mb()}), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    import subprocess

    counts = [int(x) for x in args.classes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-classes-") as tmp:
        model = args.model or str(build_model(Path(tmp) / "tiny-sd", "tiny"))
        for c in counts:
            cmd = [sys.executable, __file__, "--child", str(c), "--root", str(Path(tmp) / f"c{c}"), "--model", model,
                   "--images", str(args.images), "--ipc", str(args.ipc), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(args.threads))
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"bench_classes: {c} classes failed ({proc.returncode})")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            total = sum(result["seconds"].values())
            row = {"classes": c, "total_s": total, "per_class_ms": 1000 * total / c,
                   "process_s": time.perf_counter() - t0, "peak_rss_mb": result["peak_rss_mb"]}
            row.update({f"{s}_s": result["seconds"][s] for s in STAGES})
            row.update({f"{s}_per_class_ms": 1000 * result["seconds"][s] / c for s in STAGES})
            rows.append(row)
            print(f"{c} classes: {total:.1f} s ({row['per_class_ms']:.1f} ms per class)", flush=True)
    ratio = rows[-1]["per_class_ms"] / rows[0]["per_class_ms"]
    columns = [("classes", "classes", "d"), *[(f"{s} s", f"{s}_s", ".1f") for s in STAGES],
               ("total s", "total_s", ".1f"), ("ms/class", "per_class_ms", ".1f"),
               ("peak RSS MB", "peak_rss_mb", ".0f")]
    print(table(rows, columns))
    print(f"per-class cost at {rows[-1]['classes']} classes / at {rows[0]['classes']}: {ratio:.2f}x")
    write_json(args.json, {
        "per_class_ratio": ratio,
        "per_class_ratio_definition": f"seconds per class at {rows[-1]['classes']} classes / at {rows[0]['classes']} "
                                      "(select + invert + generate + evaluate, in-process stage times)",
        "machine": machine("cpu"),
        "settings": {"model": "tiny random-weight SD (16 px)" if not args.model else args.model,
                     "images_per_class": args.images, "ipc": args.ipc, "steps": args.steps,
                     "batch_size": args.batch_size, "threads": args.threads, "student": "convnet_tiny",
                     "epochs": 1, "protocol": "p2", "method": "d3m"},
        "rows": rows,
    })


if __name__ == "__main__":
    main()
