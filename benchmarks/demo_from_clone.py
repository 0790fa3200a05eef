"""Time the README's first command from a fresh clone: `bash scripts/bootstrap.sh && .venv/bin/promptset demo`.

    python3 benchmarks/demo_from_clone.py [--json benchmarks/results/demo_fresh_clone.json] [--threads N] [--keep DIR]

Clones this repository's committed HEAD (uncommitted changes are not in the clone) into a temporary folder, runs
the set-up script (a new `.venv`, torch and promptset installed as a new user would) and then `promptset demo`,
each timed separately, and writes one JSON file: the two wall times, the machine (CPU, cores, load average before
each step, so a busy machine shows), the commit, and the demo's own `demo.json` and `results.json` (its table, its
reading, the generator's quality). `tools/write_benchmarks_md.py` builds the demo section of BENCHMARKS.md from it.

Runs with the system Python (no torch needed here). Benchmarks report numbers, they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from cpuinfo import cpu_model  # noqa: E402


def load1() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def timed(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> tuple[float, int]:
    print(f"[demo_from_clone] {' '.join(cmd)} (log: {log})", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return round(time.perf_counter() - t, 1), rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "demo_fresh_clone.json"), help="output file")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for the demo (0 = torch's default: one per core)")  # fmt: skip
    ap.add_argument("--keep", default="", help="clone into this (new) folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                         text=True).strip())  # fmt: skip
    if dirty:
        print("[demo_from_clone] note: the working tree has uncommitted changes; the clone has HEAD only", flush=True)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="promptset-clone-"))
    if args.keep and base.exists():
        raise SystemExit(f"--keep {base}: already exists; pass a new folder")
    clone = base / "promptset"
    try:
        subprocess.check_call(["git", "clone", "-q", "--no-local", str(REPO), str(clone)])
        before_setup = load1()
        setup_s, rc = timed(["bash", "scripts/bootstrap.sh"], clone, base / "bootstrap.log")
        if rc:
            raise SystemExit(f"bootstrap failed (exit {rc}); see {base / 'bootstrap.log'}")
        before_demo = load1()
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        demo_s, rc = timed([".venv/bin/promptset", "demo", "--no-progress"], clone, base / "demo.log", env)
        if rc:
            raise SystemExit(f"promptset demo failed (exit {rc}); see {base / 'demo.log'}")
        demo = json.loads((clone / "runs" / "demo" / "demo.json").read_text())
        results = json.loads(Path(demo["results"]).read_text())  # an absolute path
        out = {
            "benchmark": "demo_from_clone",
            "command": "bash scripts/bootstrap.sh && "
            + (f"OMP_NUM_THREADS={args.threads} " if args.threads else "")
            + ".venv/bin/promptset demo",
            "commit": commit,
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_1min_before_setup": before_setup, "loadavg_1min_before_demo": before_demo},
            "wall_s": {"setup": setup_s, "demo": demo_s, "total": round(setup_s + demo_s, 1)},
            "demo": demo,
            "results": results,
        }  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"[demo_from_clone] set-up {setup_s:.0f} s + demo {demo_s:.0f} s = {setup_s + demo_s:.0f} s; "
              f"wrote {args.json}", flush=True)  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
