"""Shared pieces of the benchmarks: machine description, GPU peak FLOP/s, synthetic data, model folders, JSON output.

Benchmarks report numbers, they assert nothing (docs/STYLE.md). Every script writes its figures with `--json PATH`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch
from cpuinfo import cpu_model  # noqa: F401  (re-exported: `from common import cpu_model`)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# Dense peak FLOP/s of the tensor-core (bf16, fp16, TF32) and non-tensor-core (fp32) paths, SXM parts, in TFLOP/s
# (the vendors' datasheets; their larger figures count 2:4 sparsity).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def machine(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    import diffusers
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "device_name": cpu_model(),
        # other jobs on a shared machine skew CPU timings; this says how busy it was when the benchmark started
        "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
        for key, get in (("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                         ("matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)):  # fmt: skip
            try:  # a legacy read raises once torch's new fp32_precision API set a mixed state
                info[key] = get()
            except RuntimeError as err:
                info[key] = f"unreadable: {str(err)[:100]}"
    return info


def git_commit() -> str | None:
    """The repository's HEAD commit (and '+dirty' when tracked files differ from it), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def gpu_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Peak dense TFLOP/s for `dtype` on a known GPU (by name), else None (CPU or an unlisted GPU)."""
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in device_name.upper():
            return peaks.get(dtype)
    return None


def mfu(flops_per_step: float | None, seconds_per_step: float | None, device_name: str, dtype: str) -> dict:
    """Achieved FLOP/s and model FLOPs utilisation against the table above (None where unknown)."""
    if not flops_per_step or not seconds_per_step:
        return {"achieved_tflops": None, "peak_tflops": None, "mfu": None}
    achieved = flops_per_step / seconds_per_step / 1e12
    peak = gpu_peak_tflops(device_name, dtype)
    return {"achieved_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None}


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: /proc/self/clear_refs 5 resets VmHWM and getrusage's ru_maxrss)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cifar_names(n: int) -> list[str]:
    """Class names that are single CLIP tokens (CIFAR-10's, then numbered)."""
    base = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return [base[i] if i < len(base) else f"class{i}" for i in range(n)]


def make_image_folder(root: Path, classes: list[str], per_class: int, size: int, seed: int = 0) -> Path:
    """A synthetic ImageFolder of smooth random PNGs (throughput does not depend on content)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
            noise = rng.integers(-12, 13, (size, size, 3))
            img = Image.fromarray(np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8))
            img.save(folder / f"{i:04d}.png")
    return root


def model_label(size: str, model: str) -> str:
    """How the output names the generator: a built random-weight shape, or the folder the user gave."""
    return f"model {model}" if model else f"random-weight {size} model"


def build_model(folder: Path, size: str) -> Path:
    """A random-weight SD-shaped diffusers folder from `promptset.backends.tiny.build_sd` (reused if present)."""
    if (folder / "model_index.json").is_file():
        return folder
    from promptset.backends.tiny import build_sd

    return build_sd(folder, size)


def run_subprocess(
    cmd: list[str], *, env: dict | None = None, timeout: float | None = None
) -> tuple[float, float]:
    """Run `cmd`, fail loudly with its output on error; returns the perf_counter times it was spawned and exited at.

    perf_counter is CLOCK_MONOTONIC on Linux, so times the child records are comparable with these."""
    t_spawn = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    t_exit = time.perf_counter()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"benchmark subprocess failed ({proc.returncode}): {' '.join(cmd)}")
    return t_spawn, t_exit


def quiet_env(threads: int = 0) -> dict:
    """Environment for child processes: no progress bars or library chatter; `threads` > 0 pins torch's threads."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def quiet_libraries() -> None:
    """Silence progress bars and warnings of diffusers/transformers in this process."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - a quieter log is a nicety, never a reason to fail
        pass


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path}")


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    raise TypeError(f"not JSON serialisable: {type(x)}")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; `columns` is (header, key, format spec)."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        line = []
        for _, key, spec in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, spec) if spec else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def fmt_bytes(n: float | None) -> str | None:
    return None if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
