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
it measured. `--quick` is the CPU smoke run of every row kind (tiny model, 16 px, well under a minute; rows that
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
import math  # noqa: E402
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

CLASSES = ["airplane", "automobile"]  # invert needs two classes at least; both train in every batch


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


def cpu_half_refused() -> bool:
    """Whether this promptset refuses `--dtype bf16` on the CPU (it did before issue 16)."""
    import torch

    from promptset.devices import resolve_dtype
    from promptset.errors import UserError

    try:
        resolve_dtype("bf16", torch.device("cpu"))
    except UserError:
        return True
    return False


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


class Ctx:
    """Row bodies. Each returns the row's numbers; `Check.row` times, guards and records it."""

    def __init__(self, check, args, work, device, common, model, data, resolution, load):
        self.check, self.args, self.work, self.device, self.common = check, args, work, device, common
        self.model, self.data, self.resolution, self.load = model, data, resolution, load
        self.gpu = device.type == "cuda"
        self.quick = args.quick
        self.flops: dict[int, int] = {}
        self.grads: dict[str, dict] = {}
        self.prompts_path = None
        self.device_name = check.payload["machine"].get("device_name", "")

    # ---- helpers --------------------------------------------------------------------------------------------
    def est(self, gpu_s: float, cpu_s: float = 3.0) -> float:
        return gpu_s if self.gpu else cpu_s

    def sync(self):
        self.common.sync(self.device)

    def release(self):
        """Drop the resident backend (a row that loads its own model, as invert does, then has the memory)."""
        import gc

        import torch

        self.check.backend = self.check.backend_dtype = None
        gc.collect()
        if self.gpu:
            torch.cuda.empty_cache()

    def reset_peak(self):
        import torch

        if self.gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.common.reset_peak_rss()

    def peak(self) -> dict:
        import torch

        if self.gpu:
            return {"peak_gpu_bytes": torch.cuda.max_memory_allocated(self.device),
                    "peak_gpu_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}  # fmt: skip
        return {"peak_rss_gib": self.common.max_rss_mb() / 1024}

    def set_tf32(self, on: bool) -> None:
        """The legacy setters: they override whatever either API set before (a later read is consistent)."""
        import torch

        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on

    def tf32_state(self) -> dict:
        """TF32 flags in both of torch's APIs (a legacy read raises once the new API set a mixed state)."""
        import torch

        getters = {
            "matmul_allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
            "matmul_fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
            "cudnn_conv_fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,
        }
        out = {}
        for key, get in getters.items():
            try:
                out[key] = get()
            except (RuntimeError, AttributeError) as err:
                out[key] = f"unreadable: {str(err)[:100]}"
        return out

    def run_dtype(self, dtype: str) -> tuple[str, dict]:
        """The dtype a row runs in: as asked on a GPU; fp32 in the CPU smoke run (half precision is slow there and
        says nothing about a GPU; promptset before issue 16 refused it)."""
        if self.gpu or dtype == "fp32":
            return dtype, {}
        return "fp32", {"ran_as": "fp32", "note": "CPU smoke run: half-precision rows run in fp32"}

    def layout_and_init(self, backend):
        import torch

        layout = backend.layout("a photo of {token}", 1)
        init = torch.stack([backend.initializer_vector(w) for w in CLASSES]).unsqueeze(1)  # (G, 1, D)
        return layout, init

    def step_flops(self, backend, batch: int) -> int:
        """FLOPs of one inversion step at this batch: the loop body of invert's `_train_group` (text encoder on the
        G prompts, the denoising loss on B latents, backward to the vectors), counted by FlopCounterMode."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        if batch in self.flops:
            return self.flops[batch]
        layout, init = self.layout_and_init(backend)
        vectors = torch.nn.Parameter(init.clone().to(backend.device))
        side = self.resolution // backend.autoencoder.downscale
        latents = torch.randn(batch, backend.autoencoder.latent_channels, side, side).to(backend.device)
        sample_class = (torch.arange(batch) % len(CLASSES)).to(backend.device)
        generator = torch.Generator().manual_seed(0)
        with FlopCounterMode(display=False) as counter:
            states = backend.encode_placeholder_prompts(layout, vectors)[sample_class]
            backend.denoising_loss(latents, states, generator).mean().backward()
        self.flops[batch] = int(counter.get_total_flops())
        return self.flops[batch]

    # ---- invert ----------------------------------------------------------------------------------------------
    def invert_row(self, dtype: str, batch: int, *, gradient_checkpointing: bool = False, tf32: bool | None = None):
        name = f"invert {dtype}" + ({True: " TF32", False: " no-TF32"}.get(tf32, "")) + f" batch {batch}" + (
            " +gradient checkpointing" if gradient_checkpointing else "")
        run_dtype, note = self.run_dtype(dtype)
        est = {8: 15, 16: 20, 32: 30}[batch] * (2.5 if dtype == "fp32" else 1)

        def body():
            from promptset.stages.invert import invert

            st = self.check.payload["settings"]["invert"]
            backend = self.load(run_dtype)  # the resident copy, for the FLOP count only
            if self.gpu:
                self.set_tf32(bool(tf32))
            flops = None if gradient_checkpointing else self.step_flops(backend, batch)
            if gradient_checkpointing:
                flops = self.flops.get(batch)  # model FLOPs: the recomputation is not counted (MFU convention)
            del backend
            self.release()  # invert loads the model itself, as a user's run does (nothing in promptset is patched)
            out = self.work / f"invert-{dtype}-{batch}-{int(gradient_checkpointing)}-{tf32}"
            self.reset_peak()
            tf32_before = self.tf32_state() if self.gpu else None
            t0 = time.perf_counter()
            invert(out=str(out), backend="sd", model=self.model, data=str(self.data),
                   steps=st["warmup_steps"] + st["timed_steps"], batch_size=batch,
                   classes_per_batch=st["classes_per_batch"], lr=st["lr"], resolution=self.resolution,
                   device=str(self.device), dtype=run_dtype, log_every=st["warmup_steps"],
                   checkpoint_every=10_000, progress=False, overwrite=True, seed=0,
                   gradient_checkpointing=gradient_checkpointing)  # fmt: skip
            self.sync()
            wall = time.perf_counter() - t0
            rows = [json.loads(x) for x in (out / "invert" / "metrics.jsonl").read_text().splitlines() if x.strip()]
            first, last = rows[0], rows[-1]
            step_s = (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])
            peak_dtype = "tf32" if dtype == "fp32" and tf32 else dtype
            result = {
                "dtype": dtype,
                "batch_size": batch,
                "gradient_checkpointing": gradient_checkpointing,
                "tf32_requested": tf32,
                "tf32_before_row": tf32_before,
                "tf32_after_row": self.tf32_state() if self.gpu else None,  # if invert sets TF32 itself, it shows
                "step_s": step_s,
                "samples_per_s": batch / step_s,
                "timed_steps": last["step"] - first["step"],
                "invert_wall_s": wall,
                "final_loss": last["loss"],
                "loss_finite": math.isfinite(last["loss"]),
                "flops_per_step": flops,
                "flops_note": "model FLOPs of the step without recomputation" if gradient_checkpointing else None,
                **self.common.mfu(flops, step_s, self.device_name, peak_dtype),
                "mfu_peak_dtype": peak_dtype,
                **self.peak(),
                **note,
            }
            extra = {k: v for k, v in last.items() if k not in STANDARD_METRICS}
            if extra:
                result["invert_metrics_extra"] = extra  # e.g. loss scale or skipped steps, where invert logs them
            if dtype == "bf16" and batch == 8 and not gradient_checkpointing:
                self.prompts_path = out / "prompts.safetensors"
            return result

        return self.check.row("invert", name, body, est_s=self.est(est), cap_s=self.est(4 * est, 60))

    # ---- fp16 vector gradient --------------------------------------------------------------------------------
    def grad_probe(self, dtype: str, scale: float = 1.0) -> None:
        """One vector gradient through promptset's denoising objective (stored, reported by `gradient_row`)."""
        if self.check.only and "fp16_gradient" not in self.check.only:
            return
        key = dtype if scale == 1.0 else f"{dtype}_scaled"
        if self.check.left() < self.est(15, 2):
            self.grads[key] = {"error": "time budget"}
            return
        import torch

        try:
            backend = self.load(dtype)
            layout, init = self.layout_and_init(backend)
            batch = 8
            side = self.resolution // backend.autoencoder.downscale
            latents = torch.randn(batch, backend.autoencoder.latent_channels, side, side,
                                  generator=torch.Generator().manual_seed(1))  # fmt: skip
            sample_class = (torch.arange(batch) % len(CLASSES)).to(backend.device)
            if self.gpu:
                self.set_tf32(False)  # the fp32 reference in IEEE fp32
            t0 = time.perf_counter()
            vectors = torch.nn.Parameter(init.clone().to(backend.device))
            states = backend.encode_placeholder_prompts(layout, vectors)  # (G, L, D_text) in the model's dtype
            states.retain_grad()
            generator = torch.Generator().manual_seed(2)  # the same noise and timesteps for every dtype
            loss = backend.denoising_loss(latents.to(backend.device), states[sample_class], generator).mean()
            (loss * scale).backward()
            self.sync()
            self.grads[key] = {
                "vector_grad": vectors.grad.detach().float().cpu() / scale,
                "state_grad": states.grad.detach().float().cpu() / scale,
                "state_grad_zero_fraction": float((states.grad == 0).float().mean()),
                "loss": float(loss.detach()),
                "seconds": time.perf_counter() - t0,
                "model_dtype": str(backend.dtype).replace("torch.", ""),
            }
        except Exception as err:  # noqa: BLE001 - reported in the row
            self.grads[key] = {"error": f"{type(err).__name__}: {err}"}

    def gradient_row(self):
        def body():
            import torch

            ref = self.grads.get("fp32", {})
            if "vector_grad" not in ref:
                raise RuntimeError(f"no fp32 reference gradient: {ref.get('error', 'not computed')}")
            g_ref = ref["vector_grad"].flatten()
            out = {"latent_side": self.resolution // 8, "batch_size": 8, "loss_scale": 2.0**16,
                   "reference": "fp32, TF32 off", "fp32_state_grad_zero_fraction": ref["state_grad_zero_fraction"],
                   "fp32_loss": ref["loss"]}  # fmt: skip
            if not self.gpu and cpu_half_refused():
                out["note"] = "CPU smoke run: the half-precision models are promptset's fp32 model cast on the CPU"
            for key in ("bf16", "fp16", "fp16_scaled"):
                g = self.grads.get(key, {})
                if "vector_grad" not in g:
                    out[f"{key}_error"] = g.get("error", "not computed")
                    continue
                v = g["vector_grad"].flatten()
                out[f"{key}_vector_grad_rel_err"] = float((v - g_ref).norm() / g_ref.norm())
                out[f"{key}_vector_grad_cosine"] = float(torch.nn.functional.cosine_similarity(v, g_ref, dim=0))
                out[f"{key}_state_grad_zero_fraction"] = g["state_grad_zero_fraction"]
                out[f"{key}_grad_finite"] = bool(torch.isfinite(v).all())
            out["vector_grad_rel_err"] = out.get("fp16_vector_grad_rel_err")
            return out

        return self.check.row("fp16_gradient", "fp16 vector gradient vs fp32 (unscaled and x2^16)", body,
                              est_s=1, cap_s=30)  # fmt: skip

    # ---- generate --------------------------------------------------------------------------------------------
    def generate_row(self, batch: int, *, compile: bool = False):
        dtype, note = self.run_dtype("bf16")
        name = f"generate bf16 sampler batch {batch}" + (" --compile" if compile else "")
        est = (150 if compile else 10 + batch) if self.gpu else (8 if compile else 2)

        def body():
            import torch

            from promptset.backends import sampling

            st = self.check.payload["settings"]["generate"]
            if compile:  # a fresh backend: compile_denoiser replaces its UNet in place
                self.check.backend = self.check.backend_dtype = None
            backend = self.load(dtype)
            prompts = self.prompts()
            conditioner = sampling.PromptConditioner(backend, prompts)
            with torch.no_grad():
                uncond = backend.encode_prompts([""])
            jobs = sampling.jobs_for(list(range(len(CLASSES))), math.ceil(batch / len(CLASSES)), seed=0)[:batch]

            def once():
                return sampling.generate_batch(backend, conditioner, jobs, steps=st["steps"], guidance=st["guidance"],
                                               factor=1, image_size=self.resolution, uncond=uncond,
                                               micro_batch=batch)  # fmt: skip

            compile_s = None
            extra = {}
            if compile:
                extra["inductor_cache"] = str(self.work / "inductor")
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = extra["inductor_cache"]  # cold, as a first run
                if self.quick:  # the CPU smoke run traces with dynamo but skips inductor's C++ build (minutes)
                    extra["compile_backend"] = "eager (CPU smoke run: dynamo tracing only, no inductor)"
                    real = torch.compile
                    torch.compile = lambda m, **kw: real(m, backend="eager", **kw)
                    try:
                        backend.compile_denoiser()
                    finally:
                        torch.compile = real
                else:
                    extra["compile_backend"] = "inductor"
                    backend.compile_denoiser()
            t0 = time.perf_counter()
            once()  # warm-up: kernel selection, allocations (and the compilation)
            self.sync()
            first_s = time.perf_counter() - t0
            if compile:
                compile_s = first_s
            self.reset_peak()
            times = []
            for _ in range(st["timed_batches"]):
                t = time.perf_counter()
                images = once()
                self.sync()
                times.append(time.perf_counter() - t)
            step_s = sorted(times)[len(times) // 2]
            if compile:
                self.check.backend = self.check.backend_dtype = None  # nobody else uses the compiled one
            return {
                "dtype": "bf16",
                "sampler_batch": batch,
                "images_per_call": batch,
                "ddim_steps": st["steps"],
                "guidance": st["guidance"],
                "batch_s": step_s,
                "images_per_s": batch / step_s,
                "first_call_s": first_s,
                "compile": compile,
                "compile_s": compile_s,
                "images_finite": bool(torch.isfinite(images).all()),
                "image_shape": list(images.shape[1:]),
                **self.peak(),
                **extra,
                **note,
            }

        return self.check.row("generate", name, body, est_s=est, cap_s=self.est(3 * est if compile else 4 * est, 60))

    def prompts(self):
        """The bf16 inversion row's prompts, else the initializer vectors as a prompt set."""
        from promptset.artifacts import PromptSet

        if self.prompts_path is not None and self.prompts_path.is_file():
            return PromptSet.load(self.prompts_path)
        backend = self.check.backend
        _, init = self.layout_and_init(backend)
        return PromptSet(embeddings=init.float().cpu(), token_names=[f"<{c}>" for c in CLASSES],
                         class_folders=list(CLASSES), template="a photo of {token}", backend="sd",
                         model_id=self.model, model_hash=backend.model_hash, initializers=list(CLASSES))  # fmt: skip

    # ---- VAE -------------------------------------------------------------------------------------------------
    def vae_row(self, dtype: str):
        run_dtype, note = self.run_dtype(dtype)

        def body():
            import torch

            backend = self.load(run_dtype)
            n = 8
            images = torch.rand(n, 3, self.resolution, self.resolution, generator=torch.Generator().manual_seed(3))
            backend.encode_images(images[:1], batch_size=1)  # warm-up
            self.reset_peak()
            t = time.perf_counter()
            mean, _ = backend.encode_images(images, batch_size=n)
            self.sync()
            enc_s = time.perf_counter() - t
            enc = self.peak()
            backend.decode_latents(mean[:1].to(backend.device))  # warm-up
            self.reset_peak()
            t = time.perf_counter()
            decoded = backend.decode_latents(mean.to(backend.device))
            self.sync()
            dec_s = time.perf_counter() - t
            dec = self.peak()
            key = "peak_gpu_gib" if self.gpu else "peak_rss_gib"
            return {
                "dtype": dtype,
                "images": n,
                "encode_s": enc_s,
                "decode_s": dec_s,
                "encode_peak_gib": enc[key],
                "decode_peak_gib": dec[key],
                "peak_measure": "torch.cuda.max_memory_allocated (weights included)" if self.gpu
                else "peak RSS of this process (weights included)",
                "latents_finite": bool(torch.isfinite(mean).all()),
                "decoded_finite": bool(torch.isfinite(decoded).all()),
                **note,
            }

        return self.check.row("vae", f"VAE encode/decode {dtype} x8", body, est_s=self.est(10), cap_s=self.est(60, 30))

    # ---- students --------------------------------------------------------------------------------------------
    def student_row(self, student: str, amp: bool, channels_last: bool):
        name = f"student {student}" + (" amp" if amp else "") + (" channels_last" if channels_last else "")

        def body():
            import torch

            from promptset.evaluation.student import TrainSet, train_student
            from promptset.models import create_student
            from promptset.stages.evaluate import EvaluateConfig, _recipe

            st = self.check.payload["settings"]["student"]
            n, size, classes = st["images"], st["image_size"], 10
            g = torch.Generator().manual_seed(4)
            images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
            data = TrainSet(images, torch.arange(n) % classes, torch.randn(n, classes, generator=g)).to(self.device)

            def recipe(epochs):
                return _recipe(EvaluateConfig(protocol="p1", epochs=epochs, batch_size=st["batch_size"],
                                              regen_every=0, eval_every=epochs, amp=amp,
                                              channels_last=channels_last, progress=False))  # fmt: skip

            warm = create_student(student, classes, size).to(self.device)
            train_student(warm, [data], None, recipe(1), seed=1, progress=False)  # warm-up (cuDNN, allocations)
            model = create_student(student, classes, size).to(self.device)
            self.reset_peak()
            self.sync()
            t = time.perf_counter()
            out = train_student(model, [data], None, recipe(st["epochs"]), seed=0, progress=False)
            self.sync()
            secs = time.perf_counter() - t
            loss = out["history"][-1]["loss"]
            return {
                "student": student,
                "amp": amp,
                "amp_effective": amp and self.gpu,  # train_student autocasts on CUDA only
                "channels_last": channels_last,
                "optimizer_steps": out["optimizer_steps"],
                "train_s": secs,
                "samples_per_s": st["epochs"] * n / secs,
                "final_loss": loss,
                "loss_finite": math.isfinite(loss),
                **self.peak(),
            }

        return self.check.row("student", name, body, est_s=self.est(8, 1), cap_s=self.est(45, 30))


STANDARD_METRICS = {"group", "step", "loss", "lr", "seconds", "classes", "class_loss", "delta_norm", "cosine"}


if __name__ == "__main__":
    main()
