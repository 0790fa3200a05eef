"""Which CPU thread policy keeps both the bits and the speed on a busy machine (issue 29): the candidates, measured.

    .venv/bin/python benchmarks/thread_candidates.py [--repeats 2] [--json benchmarks/results/thread_candidates.json]

Workload: `promptset.invert(...)` through the Python API on a tiny random Stable Diffusion (8 classes, 64 steps,
batch 8, 16 px; the case issue 29 measured), then `promptset.generate(..., ipc=8)` on its prompts, in a fresh process
per run. Candidates (each idle and beside one `while True: pass` process):
- `1 thread`: one torch thread whatever the machine (PROMPTSET_THREADS=1);
- `2 spinning`: one thread per core with libgomp's default waits (OMP_WAIT_POLICY=active);
- `2 passive`: one thread per core, waiting threads sleep (OMP_WAIT_POLICY=passive; promptset's default before);
- `2 spin 10k`, `2 spin 100k`: libgomp spins that many times, then sleeps (GOMP_SPINCOUNT; its default is 300k);
- `2 promptset`: promptset's default now: no wait setting, so `import promptset` chooses `active` when the other
  processes leave the cores idle at start and `passive` when they keep half a core or more busy (threads.py);
- `adaptive` is what promptset did before: the idle cores at start, so 2 threads idle and 1 beside a busy process; its
  rows are the `2 spinning`/idle and `1 thread`/busy runs, and its bits differ whenever those two differ.
Each row records the median wall time over `--repeats` runs and the sha256 of the prompts file and of the generated
PNGs, so the JSON says which candidates keep the bits and what each costs. `--candidates A,B` runs only those and
keeps the other rows of an existing JSON. Benchmarks report numbers, they assert nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from busy_machine import api_inputs, busy_cores, cores  # noqa: E402
from cpuinfo import cpu_model  # noqa: E402

CANDIDATES = {"1 thread": {"PROMPTSET_THREADS": "1"},
              "2 spinning": {"PROMPTSET_THREADS": "2", "OMP_WAIT_POLICY": "active"},
              "2 passive": {"PROMPTSET_THREADS": "2", "OMP_WAIT_POLICY": "passive"},
              "2 spin 10k": {"PROMPTSET_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
              "2 spin 100k": {"PROMPTSET_THREADS": "2", "GOMP_SPINCOUNT": "100000"},
              "2 promptset": {"PROMPTSET_THREADS": "2"}}


def worker(model: str, data: str, out: str) -> None:
    import promptset

    promptset.invert(out=out, backend="sd", model=model, data=data, steps=64, batch_size=8, resolution=16,
                     progress=False, overwrite=True, seed=0, device="cpu")
    promptset.generate(run=out, ipc=8, steps=10, progress=False, device="cpu")


def fingerprint(out: Path) -> str:
    h = hashlib.sha256((out / "prompts.safetensors").read_bytes())
    for png in sorted((out / "generated").rglob("*.png")):
        h.update(png.read_bytes())
    return h.hexdigest()[:16]


def run_once(env_extra: dict, busy: bool, model: Path, data: Path, work: Path) -> tuple[float, str, float]:
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PROMPTSET_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
            "KMP_BLOCKTIME", "PROMPTSET_OMP_WAIT")
    env = {k: v for k, v in os.environ.items() if k not in drop} | env_extra
    out = Path(tempfile.mkdtemp(dir=work)) / "run"
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        load = busy_cores(1.0)
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--_worker", str(model), str(data), str(out)], env=env, check=True,
                       capture_output=True)
        seconds = time.perf_counter() - t
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    return seconds, fingerprint(out), load


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--_worker":
        worker(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "thread_candidates.json"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="")
    ap.add_argument("--candidates", default="", help="only these (comma-separated); other rows of --json are kept")
    args = ap.parse_args(argv)
    chosen = [c for c in args.candidates.split(",") if c] or list(CANDIDATES)
    unknown = [c for c in chosen if c not in CANDIDATES]
    if unknown:
        ap.error(f"--candidates {unknown}: not among {list(CANDIDATES)}")
    path = Path(args.json)
    old = json.loads(path.read_text()) if path.is_file() and args.candidates else {}
    work = Path(args.work or tempfile.mkdtemp(prefix="promptset-threads-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = api_inputs(work)
    rows = dict(old.get("rows", {}))
    for name in chosen:
        extra = CANDIDATES[name]
        for load in ("idle", "busy"):
            runs = [run_once(extra, load == "busy", model, data, work) for _ in range(args.repeats)]
            rows[f"{name}/{load}"] = {"candidate": name, "load": load,
                                      "seconds": round(statistics.median(r[0] for r in runs), 2),
                                      "all_seconds": [round(r[0], 2) for r in runs],
                                      "bits": sorted({r[1] for r in runs}),
                                      "busy_cores_before": [round(r[2], 2) for r in runs]}
            print(f"[thread_candidates] {name}/{load}: {rows[f'{name}/{load}']}", flush=True)
    summary = {}
    for name in [c for c in CANDIDATES if f"{c}/idle" in rows and f"{c}/busy" in rows]:
        idle, busy = rows[f"{name}/idle"], rows[f"{name}/busy"]
        summary[name] = {"idle_s": idle["seconds"], "busy_s": busy["seconds"],
                         "busy_over_idle": round(busy["seconds"] / idle["seconds"], 2),
                         "same_bits_idle_and_busy": idle["bits"] == busy["bits"] and len(idle["bits"]) == 1}
    a_idle, a_busy = rows["2 spinning/idle"], rows["1 thread/busy"]
    summary["adaptive (before)"] = {"idle_s": a_idle["seconds"], "busy_s": a_busy["seconds"],
                                    "busy_over_idle": round(a_busy["seconds"] / a_idle["seconds"], 2),
                                    "same_bits_idle_and_busy": a_idle["bits"] == a_busy["bits"]}
    data_out = {"benchmark": "thread_candidates", "cpu": cpu_model(), "cores": cores(), "repeats": args.repeats,
                "workload": "promptset.invert (tiny SD, 8 classes, 64 steps, batch 8, 16 px) + generate ipc 8",
                "rows": rows, "summary": summary}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data_out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
