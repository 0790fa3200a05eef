"""What `bench_invert.py`, `bench_generate.py` and `bench_student.py` share: their common flags, the start of a run
(threads, machine, the model folder) and the JSON payload they write; and the sampling flags of every speed
benchmark that generates images (those three but invert, and `bench_sd15_cpu.py`).

Each script adds its own flags after `add_common_flags` (or `add_run_flags` alone, for `bench_classes.py` and
`bench_sd15_cpu.py`) and calls `finish_common` after parsing; the payload keeps
the keys every BENCHMARKS.md section reads (`benchmark`, `speedup`, `speedup_definition`, `machine`, `settings`,
`rows`, `total_benchmark_s`) in that order, with a script's extra keys where it puts them.
"""

from __future__ import annotations

import time
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import common
import torch

RANDOM_MODEL = "random-weight SD-shaped model from promptset.backends.tiny.build_sd"


def add_run_flags(p, *, quick: str, model: str = "", threads: str = "", threads_default: int = 0,
                  work: str | None = "") -> None:  # fmt: skip
    """--quick, --json, --model, --threads and (unless `work` is None) --work: the flags every speed benchmark takes;
    the help texts that differ between the scripts are passed in."""
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", default="", help="write all figures here")
    p.add_argument("--model", default="", help=model or "existing diffusers SD folder instead of building one")
    p.add_argument(
        "--threads", type=int, default=threads_default, help=threads or "torch threads (0: torch's default)"
    )
    if work is not None:
        p.add_argument("--work", default="", help=work or "scratch folder for the model (default: temporary)")


def add_common_flags(p, *, quick: str, what: str = "model", device: str = "", dtype: str = "", resolution: str = "",
                     threads: str = "", work: str = "") -> None:  # fmt: skip
    """`add_run_flags`, then --device, --size, --dtype, --resolution; the help texts that differ between the scripts
    are passed in (`what` names the built model: "model" or "generator")."""
    add_run_flags(p, quick=quick, threads=threads, work=work)
    p.add_argument("--device", default="cpu", help=device or "cpu or cuda[:i]; cuda defaults to an SD-1.5-shaped "
                   "model at 512 px")  # fmt: skip
    p.add_argument("--size", default="", choices=["", "tiny", "sd15"],
                   help=f"{what} shape (default: tiny on CPU, sd15 on GPU)")  # fmt: skip
    p.add_argument("--dtype", default="", help=dtype or "comma-separated dtypes (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--resolution", type=int, default=0, help=resolution or "image side in pixels (default: the "
                   "model's native)")  # fmt: skip


def add_sampling_flags(p, *, steps_flag: str = "--gen-steps") -> None:
    """The generated images' DDIM steps (`steps_flag`, default 25, promptset's default) and `--guidance` (7.5)."""
    p.add_argument(steps_flag, type=int, default=25, help="DDIM steps of the generated images")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of the generated images")


def finish_common(p, args, *, half_on_cpu: bool = False) -> bool:
    """Defaults that depend on the device: `args.size`, `args.dtypes` (the comma-separated --dtype, fp32 on CPU and
    bf16 on GPU by default). Refuses --quick on a GPU and, unless `half_on_cpu`, half precision on the CPU. Returns
    whether the device is a GPU."""
    gpu = args.device.startswith("cuda")
    if args.quick and gpu:
        p.error("--quick is the CPU smoke run; drop --device cuda or --quick")
    args.size = args.size or ("sd15" if gpu else "tiny")
    args.dtypes = [d.strip() for d in (args.dtype or ("bf16" if gpu else "fp32")).split(",") if d.strip()]
    if not half_on_cpu and not gpu and any(d != "fp32" for d in args.dtypes):
        p.error("half precision on CPU is far slower than fp32 (not a benchmark of anything); use --dtype fp32 on CPU")
    return gpu


def start(args) -> dict:
    """Quiet libraries, `--threads`, and the machine the numbers are measured on."""
    common.quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    return common.machine(args.device)


def model_folder(args, work: Path) -> tuple[str, float]:
    """`--model`, else a random-weight model of `--size` built in `work`; and the seconds the build took."""
    t0 = time.perf_counter()
    model = args.model or str(common.build_model(work / f"model-{args.size}", args.size))
    return model, time.perf_counter() - t0


def model_settings(args, model: str) -> dict:
    """The settings' first keys: which model, its shape, whether its weights are random."""
    return {"model": RANDOM_MODEL if not args.model else model, "size": args.size, "random_weights": not args.model}


def write_payload(args, benchmark: str, speedup, definition: str, *, machine: dict, settings: dict, rows: list,
                  t_start: float, head: dict | None = None, **tail) -> dict:  # fmt: skip
    """The JSON every speed benchmark writes (`--json`): `head` after the speedup's definition, `tail` after the rows,
    `total_benchmark_s` last (from `t_start`, the script's first perf_counter). Returns the payload."""
    payload = {"benchmark": benchmark, "speedup": speedup, "speedup_definition": definition, **(head or {}),
               "machine": machine, "settings": settings, "rows": rows, **tail,
               "total_benchmark_s": time.perf_counter() - t_start}  # fmt: skip
    common.write_json(args.json, payload)
    return payload
