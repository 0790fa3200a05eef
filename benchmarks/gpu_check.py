"""One prepared GPU check of promptset at Stable Diffusion 1.5's shapes, sized for a lent GPU machine (8 minutes).

Builds the SD-1.5-shaped model with random weights (`promptset.backends.tiny.build_sd(folder, 'sd15')`, timings
only: the images are noise), then measures, each through promptset's own code:

- invert: the inversion step as `promptset invert` runs it (`promptset.stages.invert.invert` in this process, the
  loaded model reused between rows): 512 px, 2 classes per batch, batch 8 in bf16, fp32 with TF32 off and on, fp16,
  bf16 with gradient checkpointing, bf16 at batch 16 and 32. Steady seconds per step from invert's own
  metrics.jsonl (warm-up steps excluded), peak GPU memory, FLOPs of one step (FlopCounterMode) and MFU against the
  GPU's dense peak for the dtype (`common.GPU_PEAK_TFLOPS`);
- fp16_gradient: the gradient of the placeholder vectors through promptset's denoising objective on the SD-shaped
  model at 64x64 latents, in bf16, fp16, and fp16 with the loss scaled by 2**16, against fp32 (TF32 off): relative
  error, cosine, and the share of exactly-zero gradients w.r.t. the text encoder's states;
- generate: images/s of `promptset.backends.sampling.generate_batch` as `promptset generate` calls it (bf16, DDIM
  25 steps, guidance 7.5) at sampler batch 8 and 32, and with the UNet compiled (`DiffusionBackend.compile_denoiser`,
  cold compile time apart);
- vae: seconds and peak memory of encoding and decoding 8 images at 512 px (bf16 and fp32);
- student: training samples/s of `promptset.evaluation.student.train_student` with evaluate's P1 recipe, ConvNet-3
  and ResNet-18 at 32 px, with and without bf16 autocast (`--amp`) and channels-last.

Every row has a time budget: a row that does not fit what is left of `--budget` is skipped, one that overruns its
cap is stopped, and the JSON says which and why. The JSON is rewritten after every row, so a killed run keeps what
it measured. This file runs the check (budget, rows, JSON); the rows' bodies are in `gpu_check_rows.py`.
`--quick` is the CPU smoke run of every row kind (tiny model, 16 px, well under a minute; rows that
need a GPU's dtypes run in fp32 on CPU and say so); it runs in the test suite.

The lent machine has torch, transformers and safetensors but no diffusers or open_clip, and no network:
`--wheels DIR` installs whatever of WHEELS is missing from a folder of wheels (`pip install --no-index --no-deps`,
into a temporary folder put on sys.path after site-packages, so installed packages win). benchmarks/README.md has
the `pip download` command for that folder and the one-line command for the lent machine.

    python benchmarks/gpu_check.py --quick --out /tmp                       # CPU smoke run
    python3 benchmarks/gpu_check.py --wheels .gpu_wheels --out $OUT         # on the GPU machine
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import atexit  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from gpu_check_rows import CLASSES, Ctx, cpu_half_refused  # noqa: E402  (stdlib only until a row runs)

# import name -> distribution name: what promptset's SD path imports beyond torch, transformers and safetensors
WHEELS = {
    "diffusers": "diffusers",
    "open_clip": "open_clip_torch",  # only its CLIP BPE vocabulary file is read (backends.tiny), never imported
    "PIL": "pillow",
    "requests": "requests",  # imported by diffusers' pipeline_utils
    "urllib3": "urllib3",
    "idna": "idna",
    "certifi": "certifi",
    "charset_normalizer": "charset_normalizer",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, every row kind, under a minute")
    p.add_argument("--out", default="", help="folder for gpu_check.json (default: $OUT, else the current folder)")
    p.add_argument("--json", default="", help="exact path of the JSON (overrides --out)")
    p.add_argument("--wheels", default="", help="folder of wheels to install what is missing from (offline)")
    p.add_argument("--model", default="", help="an existing SD diffusers folder (default: build the random sd15 one)")
    p.add_argument("--budget", type=float, default=0, help="seconds for the whole run (default 420; quick 90)")
    p.add_argument("--only", default="", help="comma-separated row kinds: invert,fp16_gradient,generate,vae,student")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one, deleted afterwards)")
    args = p.parse_args(argv)
    args.budget = args.budget or (90.0 if args.quick else 420.0)
    return args


def bootstrap(wheels: str) -> dict:
    """Install the missing WHEELS from `wheels` (offline) into a temporary folder appended to sys.path."""
    missing = [dist for module, dist in WHEELS.items() if importlib.util.find_spec(module) is None]
    info = {"wheels": wheels or None, "missing_before": missing, "installed": [], "target": None}
    if not missing:
        return info
    if not wheels:
        raise SystemExit(
            f"gpu_check: missing Python packages {missing}; pass --wheels DIR with their wheels (see "
            "benchmarks/README.md, 'The GPU check': pip download --no-deps ...)"
        )
    target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--find-links", str(Path(wheels).resolve()),
           "--target", str(target), *missing]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_check: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    sys.path.append(str(target))  # after site-packages: a package the machine has wins over the folder's
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(target)] if p)
    importlib.invalidate_caches()
    still = [dist for module, dist in WHEELS.items() if importlib.util.find_spec(module) is None]
    if still:
        raise SystemExit(f"gpu_check: {still} still missing after installing from {wheels}")
    info.update(installed=missing, target=str(target))
    return info


class RowTimeout(BaseException):
    """A row ran past its cap (a BaseException, so that no library's `except Exception` swallows it)."""


def _alarm(signum, frame):
    raise RowTimeout()


class Check:
    """The run's state: the JSON written after every row, the deadline, the one resident backend."""

    def __init__(self, args, path: Path, payload: dict):
        self.args, self.path, self.payload = args, path, payload
        self.deadline = T_START + args.budget
        self.only = {k.strip() for k in args.only.split(",") if k.strip()}
        self.backend = None
        self.backend_dtype = None

    def write(self) -> None:
        self.payload["elapsed_s"] = time.perf_counter() - T_START
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.payload, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def row(self, kind: str, name: str, fn, *, est_s: float, cap_s: float, **meta) -> dict | None:
        """Run `fn() -> dict` as one row within its time budget; record it (ok, skipped, timeout, oom, error)."""
        import torch

        if self.only and kind not in self.only:
            return None
        row = {"kind": kind, "name": name, **meta}
        left = self.left()
        if left < est_s:
            row.update(status="skipped", reason=f"time budget: {left:.0f} s left of --budget {self.args.budget:.0f}, "
                       f"the row needs about {est_s:.0f} s")  # fmt: skip
            print(f"[skip] {name}: {row['reason']}", flush=True)
            self._add(row)
            return row
        limit = max(1.0, min(cap_s, left))
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        t0 = time.perf_counter()
        try:
            try:
                row.update(fn())
                row["status"] = "ok"
            finally:  # an alarm that fires just after fn() returned is caught below all the same
                signal.setitimer(signal.ITIMER_REAL, 0)
        except RowTimeout:
            row.update(status="timeout", reason=f"stopped at its {limit:.0f} s limit")
        except torch.cuda.OutOfMemoryError as err:
            row.update(status="oom", reason=str(err).splitlines()[0])
        except Exception as err:  # noqa: BLE001 - a failed row is a finding to record, the next row still runs
            row.update(status="error", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
        finally:
            signal.signal(signal.SIGALRM, old)
        row["row_s"] = time.perf_counter() - t0
        print(f"[{row['status']}] {name} ({row['row_s']:.1f} s): "
              + ", ".join(f"{k}={_short(v)}" for k, v in row.items() if k in SHOW), flush=True)  # fmt: skip
        if row["status"] != "ok" and "reason" in row:
            print(f"    {row['reason']}", flush=True)
        self._add(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row

    def _add(self, row: dict) -> None:
        self.payload["rows"].append(row)
        self.write()


SHOW = ("step_s", "samples_per_s", "peak_gpu_gib", "peak_rss_gib", "mfu", "images_per_s", "compile_s",
        "vector_grad_rel_err", "encode_peak_gib", "decode_peak_gib")  # fmt: skip


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.json) if args.json else Path(args.out or os.environ.get("OUT") or ".") / "gpu_check.json"
    wheel_info = bootstrap(args.wheels)
    sys.path.insert(0, str(REPO / "src"))  # this checkout's promptset, whatever else is installed
    sys.path.insert(0, str(BENCH_DIR))
    import common
    import torch

    common.quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    if not gpu and not args.quick:
        raise SystemExit("gpu_check: no CUDA device here; run with --quick for the CPU smoke run")
    device = torch.device("cuda" if gpu and not args.quick else "cpu")
    gpu_info = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_info = {"name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
                    "total_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
                    "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported()}  # fmt: skip
    payload = {
        "benchmark": "gpu_check",
        "commit": common.git_commit(),
        "gpu": gpu_info,  # None: no GPU was used (the CPU --quick smoke run)
        "gpu_available": gpu,
        "quick": args.quick,
        "finished": False,
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "budget_s": args.budget,
        "wheels": wheel_info,
        "machine": common.machine(str(device)),
        "settings": {},
        "rows": [],
    }
    check = Check(args, out, payload)
    check.write()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_all(check, args, work, device, common)
    payload["finished"] = True
    check.write()
    print(f"wrote {out} ({len(payload['rows'])} rows, {payload['elapsed_s']:.0f} s)")
    return payload


def run_all(check: Check, args, work: Path, device, common) -> None:
    import torch

    from promptset.backends import create_backend

    quick = args.quick
    size = "tiny" if quick else "sd15"
    t0 = time.perf_counter()
    model = args.model or str(common.build_model(work / f"model-{size}", size))
    build_s = time.perf_counter() - t0
    unet_cfg = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae_cfg = json.loads((Path(model) / "vae" / "config.json").read_text())
    resolution = int(unet_cfg["sample_size"]) * 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    data = common.make_image_folder(work / "data", CLASSES, 2, resolution)
    gpu = device.type == "cuda"
    s = {
        "model": args.model or f"random-weight {size} model from promptset.backends.tiny.build_sd (timings only)",
        "size": size,
        "model_build_s": build_s,
        "resolution": resolution,
        "device": str(device),
        "invert": {"classes_per_batch": len(CLASSES), "warmup_steps": 2 if quick else 3,
                   "timed_steps": 2 if quick else 10, "lr": 5e-3},
        "generate": {"sampler": "ddim", "steps": 5 if quick else 25, "guidance": 7.5,
                     "timed_batches": 1 if quick else 2},
        "student": {"image_size": 16 if quick else 32, "images": 32 if quick else 5120,
                    "batch_size": 32 if quick else 256, "epochs": 1 if quick else 3, "protocol": "p1"},
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }  # fmt: skip
    check.payload["settings"] = s
    check.write()
    print(f"gpu_check: {size} model at {resolution} px on {device}"
          + (f" ({check.payload['gpu']['name']})" if gpu else " (CPU smoke run)")
          + f", model built in {build_s:.0f} s, budget {args.budget:.0f} s", flush=True)  # fmt: skip

    loads = []

    def load(dtype: str):
        """The one resident backend, as `create_backend` gives it (on CPU half dtypes are refused: cast instead)."""
        if check.backend_dtype == dtype:
            return check.backend
        check.backend = None
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        t = time.perf_counter()
        if gpu or dtype == "fp32" or not cpu_half_refused():
            backend = create_backend("sd", model, device=str(device), dtype=dtype)
        else:  # CPU smoke run of a half-precision probe where promptset refuses half on CPU: cast its fp32 model
            backend = create_backend("sd", model, device="cpu", dtype="fp32")
            half = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
            for part in (backend.text_encoder, backend.unet, backend.autoencoder):
                part.to(half)
            backend.dtype = half
        loads.append({"dtype": dtype, "load_s": time.perf_counter() - t})
        s["model_loads"] = loads
        check.backend, check.backend_dtype = backend, dtype
        return backend

    ctx = Ctx(check, args, work, device, common, model, data, resolution, load)
    try:
        load("bf16" if gpu else "fp32")  # the first load (and fingerprint) outside the rows; its time is in settings
        # bf16 first (the GPU default), then fp32, fp16; rows that need no SD model; the compile row last
        ctx.invert_row("bf16", 8)
        ctx.invert_row("bf16", 8, gradient_checkpointing=True)
        ctx.invert_row("bf16", 16)
        ctx.invert_row("bf16", 32)
        ctx.grad_probe("bf16")
        ctx.generate_row(8)
        ctx.generate_row(32)
        ctx.vae_row("bf16")
        ctx.invert_row("fp32", 8, tf32=False)
        ctx.invert_row("fp32", 8, tf32=True)
        ctx.grad_probe("fp32")
        ctx.vae_row("fp32")
        ctx.invert_row("fp16", 8)
        ctx.grad_probe("fp16")
        ctx.grad_probe("fp16", scale=2.0**16)
        ctx.gradient_row()
        check.backend = check.backend_dtype = None
        for student in ("convnet3", "resnet18"):
            for amp in (False, True):
                for channels_last in (False, True):
                    ctx.student_row(student, amp, channels_last)
        ctx.generate_row(8, compile=True)
    finally:
        check.backend = check.backend_dtype = None



if __name__ == "__main__":
    main()
