"""The row bodies of `gpu_check.py` (invert, fp16 gradient, generate, VAE, students): what each row measures,
through promptset's own code. `gpu_check.Check.row` times, guards and records each one; nothing here imports torch or
promptset before a row runs (gpu_check installs missing wheels first)."""

from __future__ import annotations

import json
import math
import os
import time

CLASSES = ["airplane", "automobile"]  # invert needs two classes at least; both train in every batch


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
