"""Assemble BENCHMARKS.md from the result files the benchmark scripts wrote under benchmarks/results/ (speed) and
experiments/cifar10/results/ (the CIFAR-10 world study).

Every number in BENCHMARKS.md is read from a JSON/Markdown file that a script in benchmarks/ or experiments/cifar10/
(or `promptset demo`) wrote; rerun those, then this, to refresh it. The sections live in benchmarks_md/.

    python tools/write_benchmarks_md.py [--demo runs/demo/demo.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md.cifar10 import (  # noqa: E402
    codec_trade_section,
    fresh_rounds_section,
    generator_section,
    generator_v2_section,
    generator_v3_section,
    modes_section,
    world_sections,
)
from benchmarks_md.common import ROOT  # noqa: E402
from benchmarks_md.demo import busy_machine_section, demo_section  # noqa: E402
from benchmarks_md.gpu import GPU_CHECK_COMMAND, gpu_section  # noqa: E402, F401  (tests render the GPU check)
from benchmarks_md.performance import performance_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo" / "demo.json"), help="demo.json of a demo run")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    lines = [
        "# Benchmarks",
        "",
        "Every number here was written by a script in `benchmarks/` or `experiments/cifar10/` (or by `promptset "
        "demo`) and copied by `python tools/write_benchmarks_md.py`. Machines are named with each table.",
        "",
    ]
    lines += demo_section(Path(args.demo))
    lines += busy_machine_section()
    lines += generator_section()
    lines += generator_v2_section()
    lines += generator_v3_section()
    lines += world_sections()
    lines += fresh_rounds_section()
    lines += codec_trade_section()
    lines += modes_section()
    lines += performance_section()
    Path(args.out).write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
