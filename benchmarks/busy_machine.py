"""`promptset demo` on an idle machine and with one busy-looping process beside it, before and after adaptive threads.

    .venv/bin/python benchmarks/busy_machine.py [--quick] [--json benchmarks/results/busy_machine.json]

Four runs of the same demo command, each in a new output folder, timed from spawn to exit:
- `fixed`: `PROMPTSET_THREADS=<cores>`, what promptset did before `threads.py` (torch's default, one thread per
  core, never changed);
- `adaptive`: the default (`PROMPTSET_THREADS` unset: the idle cores at start, re-checked as long loops run);
each `idle` and `busy` (a `while True: pass` process started 2 s before the demo and killed after it). A run that
passes `--timeout` seconds is stopped and recorded as such (its time is then a lower bound). Rows are written to the
JSON as they finish and a rerun skips rows already there (`--redo` to run them again). The cores other processes
kept busy in the 2 s before each run are recorded (an idle row first waits up to 2 minutes for them to fall under
0.2): the idle rows mean something only if that is near 0, the busy rows if it is near 1.

Benchmarks report numbers, they assert nothing.
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

ROWS = [("adaptive", "idle"), ("adaptive", "busy"), ("fixed", "idle"), ("fixed", "busy")]


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


def run_demo(threads: str, load: str, quick: bool, timeout: float, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PROMPTSET_THREADS")}
    if threads == "fixed":
        env["PROMPTSET_THREADS"] = str(cores())
    out = Path(tempfile.mkdtemp(prefix="promptset-busy-")) / "demo"
    cmd = [sys.executable, "-m", "promptset", "demo", "--out", str(out), "--no-progress"]
    cmd += ["--quick"] if quick else []
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
    try:
        busy = busy_cores()
        for _ in range(60):  # an idle row waits (up to 2 minutes) for the machine to be idle
            if spin is not None or busy < 0.2:
                break
            busy = busy_cores()
        load1 = round(os.getloadavg()[0], 2)
        print(f"[busy_machine] {threads}/{load}: {' '.join(cmd)} (log {log}, busy cores {busy})", flush=True)
        t = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc, timed_out = None, True
        seconds = round(time.perf_counter() - t, 1)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    row = {"threads": threads, "load": load, "seconds": seconds, "timed_out": timed_out, "returncode": rc,
           "load1_before": load1, "busy_cores_before": busy, "log": str(log)}  # fmt: skip
    demo_json = out / "demo.json"
    if demo_json.is_file():
        demo = json.loads(demo_json.read_text())
        row["demo_timings_s"] = demo.get("timings_s")
        row["torch_threads_at_end"] = demo.get("torch_threads")
    print(f"[busy_machine] {threads}/{load}: {seconds} s{' (timed out)' if timed_out else ''}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "busy_machine.json"), help="output file")
    ap.add_argument("--quick", action="store_true", help="promptset demo --quick (a smoke run of every stage)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop a run after this many seconds")
    ap.add_argument("--rows", default=",".join(f"{t}/{load}" for t, load in ROWS), help="rows, e.g. adaptive/busy")
    ap.add_argument("--redo", action="store_true", help="run rows again that the JSON already has")
    args = ap.parse_args(argv)
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("quick", args.quick) != args.quick:
        data = {}  # a quick and a full demo do not mix
    data.update(quick=args.quick, cores=cores(), cpu=cpu_model(), timeout_s=args.timeout)
    data.setdefault("rows", {})
    logs = Path(tempfile.mkdtemp(prefix="promptset-busy-logs-"))
    for key in args.rows.split(","):
        threads, load = key.split("/")
        if key in data["rows"] and not args.redo:
            continue
        data["rows"][key] = run_demo(threads, load, args.quick, args.timeout, logs / f"{threads}-{load}.log")
        rows = data["rows"]
        for mode in ("adaptive", "fixed"):
            idle, busy = rows.get(f"{mode}/idle"), rows.get(f"{mode}/busy")
            if idle and busy:
                data[f"{mode}_busy_over_idle"] = round(busy["seconds"] / idle["seconds"], 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    print(json.dumps({k: v for k, v in data.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
