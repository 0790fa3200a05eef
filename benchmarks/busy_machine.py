"""Speed and bits on a busy machine: `promptset demo` and a Python-API inversion, idle and beside one busy process.

    .venv/bin/python benchmarks/busy_machine.py [--quick] [--rows api-invert/default/idle,...] [--json PATH]

Each row runs one workload in a fresh process, timed from spawn to exit, with no PROMPTSET_THREADS or OMP_NUM_THREADS
(promptset's default: torch's thread count, fixed for the whole process whatever the load):
- workloads: `demo` (`promptset demo`, or `--quick`) and `api-invert` (`promptset.invert(...)` called from Python on a
  tiny random Stable Diffusion model: 8 classes, 64 steps, batch 8, 16 px, the case issue 29 measured);
- waiting: `default` (no wait setting: `import promptset` chooses OMP_WAIT_POLICY before torch loads, `active` when
  the other processes leave the cores idle at start, `passive` when they keep a core busy), `spinning`
  (OMP_WAIT_POLICY=active whatever the load) or `passive` (OMP_WAIT_POLICY=passive whatever the load);
- load: `idle`, or `busy` (a `while True: pass` process started 2 s before and killed after the run; with
  `--busy-external`, a process already running, e.g. a long student job, whose load is measured and recorded).
Every row records a fingerprint of what it wrote (the demo: the tensors of the prompts and labels files and every
student's final accuracy per seed; the inversion: the prompts' tensors; metadata, which names the run's folder, is
left out), so the JSON says whether idle and busy runs gave the same bits, and
`<workload>/<waiting>/busy_over_idle`. Rows are written as they finish; a rerun skips rows already there (`--redo`).
An idle row first waits (up to 2 minutes) for the other processes to leave the cores idle, and records how busy they
were. Benchmarks report numbers, they assert nothing.
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

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from cpuinfo import cpu_model  # noqa: E402

WAITING = ("default", "spinning", "passive")
ROWS = [f"{w}/{p}/{load}" for w in ("api-invert", "demo") for p in ("default", "spinning")
        for load in ("idle", "busy")]
API_INVERT = dict(classes=8, steps=64, batch_size=8, size=16, images_per_class=8)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def busy_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by all processes over the next `seconds` (from /proc/stat; this script is idle meanwhile)."""
    from promptset.threads import others_busy_cores, sample

    before = sample()
    time.sleep(seconds)
    return round(others_busy_cores(before, sample()), 2)


def sha(path: Path) -> str | None:
    """promptset's hash of a safetensors file's tensors (`artifacts.tensors_hash`): what was computed, not its
    metadata, which names the run's own folder (two runs in two folders write equal tensors with other paths)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    from promptset.artifacts import tensors_hash

    return tensors_hash(load_file(str(path)))[:16]


def api_inputs(root: Path) -> tuple[Path, Path]:
    """The tiny model and ImageFolder of the API inversion, built once per --work folder."""
    import common

    model, data = root / "model", root / "data"
    if not (model / "model_index.json").is_file():
        common.build_model(model, "tiny")
    if not data.is_dir():
        common.make_image_folder(data, common.cifar_names(API_INVERT["classes"]), API_INVERT["images_per_class"],
                                 API_INVERT["size"])
    return model, data


def api_invert_worker(model: str, data: str, out: str) -> None:
    """The workload of an `api-invert` row (in its own process): promptset imported first, as a user script would."""
    import promptset

    promptset.invert(out=out, backend="sd", model=model, data=data, steps=API_INVERT["steps"],
                     batch_size=API_INVERT["batch_size"], resolution=API_INVERT["size"], progress=False,
                     overwrite=True, seed=0, device="cpu")


def fingerprint(workload: str, out: Path) -> dict:
    if workload == "api-invert":
        return {"prompts": sha(out / "prompts.safetensors")}
    run = out / "run"
    results = json.loads((run / "eval" / "results.json").read_text()) if (run / "eval" / "results.json").is_file() \
        else {"entries": {}}
    accuracies = {k: e["final_top1"]["per_seed"] for k, e in sorted(results["entries"].items())}
    return {"prompts": sha(run / "prompts.safetensors"), "labels": sha(run / "labels.safetensors"),
            "students_final_top1": accuracies}


def run_row(key: str, quick: bool, timeout: float, work: Path, log: Path, external: bool = False) -> dict:
    workload, waiting, load = key.split("/")
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PROMPTSET_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
            "KMP_BLOCKTIME", "PROMPTSET_OMP_WAIT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if waiting != "default":
        env["OMP_WAIT_POLICY"] = {"spinning": "active", "passive": "passive"}[waiting]
    out = Path(tempfile.mkdtemp(prefix=f"promptset-busy-{workload}-", dir=work)) / "out"
    if workload == "demo":
        cmd = [sys.executable, "-m", "promptset", "demo", "--out", str(out), "--no-progress", *(["--quick"] * quick)]
    else:
        model, data = api_inputs(work)
        cmd = [sys.executable, __file__, "--_api-invert", str(model), str(data), str(out)]
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" and not external else None
    try:
        busy = busy_cores()
        for _ in range(60):  # an idle row waits (up to 2 minutes) for the machine to be idle
            if load == "busy" or busy < 0.2:
                break
            busy = busy_cores()
        print(f"[busy_machine] {key}: {' '.join(cmd)} (log {log}, busy cores before {busy})", flush=True)
        t = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
            try:
                rc, timed_out = proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc, timed_out = None, True
        seconds = round(time.perf_counter() - t, 1)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    row = {"workload": workload, "waiting": waiting, "load": load, "seconds": seconds, "timed_out": timed_out,
           "busy_process": ("an external one already running (--busy-external)" if external else "while True: pass")
           if load == "busy" else None,
           "returncode": rc, "busy_cores_before": busy, "log": str(log), "out": str(out),
           "bits": fingerprint(workload, out)}
    demo_json = out / "demo.json"
    if demo_json.is_file():
        demo = json.loads(demo_json.read_text())
        row["demo_timings_s"] = demo.get("timings_s")
        row["torch_threads"] = demo.get("torch_threads")
    print(f"[busy_machine] {key}: {seconds} s{' (timed out)' if timed_out else ''}", flush=True)
    return row


def summarize(data: dict) -> None:
    rows = data["rows"]
    for workload in ("api-invert", "demo"):
        for waiting in WAITING:
            idle, busy = rows.get(f"{workload}/{waiting}/idle"), rows.get(f"{workload}/{waiting}/busy")
            if idle and busy:
                data[f"{workload}/{waiting}/busy_over_idle"] = round(busy["seconds"] / idle["seconds"], 2)
        bits = [r["bits"] for k, r in sorted(rows.items()) if k.startswith(workload + "/") and r["returncode"] == 0]
        if len(bits) > 1:
            data[f"{workload}/same_bits_in_every_row"] = all(b == bits[0] for b in bits)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--_api-invert":
        api_invert_worker(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "busy_machine.json"), help="output file")
    ap.add_argument("--quick", action="store_true", help="promptset demo --quick (a smoke run of every stage)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop a run after this many seconds")
    ap.add_argument("--rows", default=",".join(ROWS), help="rows, e.g. api-invert/default/busy,demo/passive/idle")
    ap.add_argument("--redo", action="store_true", help="run rows again that the JSON already has")
    ap.add_argument("--work", default="", help="folder for the runs (default: a new temporary folder)")
    ap.add_argument("--busy-external", action="store_true", help="busy rows: another process already keeps one core "
                    "busy (e.g. a long job), so start no busy loop; its load is recorded as measured")
    args = ap.parse_args(argv)
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("quick", args.quick) != args.quick or data.get("version") != 2:
        data = {}  # a quick and a full demo do not mix; rows of the adaptive-threads era (version 1) neither
    data.update(version=2, quick=args.quick, cores=cores(), cpu=cpu_model(), timeout_s=args.timeout,
                api_invert=API_INVERT)
    data.setdefault("rows", {})
    work = Path(args.work or tempfile.mkdtemp(prefix="promptset-busy-"))
    work.mkdir(parents=True, exist_ok=True)
    known = [f"{w}/{p}/{load}" for w in ("api-invert", "demo") for p in WAITING for load in ("idle", "busy")]
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    for key in keys:
        if key not in known:
            ap.error(f"--rows: unknown row {key!r}; rows are {', '.join(known)}")
    for key in keys:
        if key in data["rows"] and not args.redo:
            continue
        data["rows"][key] = run_row(key, args.quick, args.timeout, work, work / f"{key.replace('/', '-')}.log",
                                    args.busy_external)
        summarize(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    print(json.dumps({k: v for k, v in data.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
