"""BENCHMARKS.md's GPU check section: `benchmarks/gpu_check.py`'s JSON as tables, or the command to make it."""

from __future__ import annotations

from .common import _table

GPU_CHECK_COMMAND = "python3 benchmarks/gpu_check.py --wheels .gpu_wheels --out $OUT"


def _gib(row: dict) -> float | None:
    return row.get("peak_gpu_gib", row.get("peak_rss_gib"))


def gpu_section(res: dict | None) -> list[str]:
    """`benchmarks/gpu_check.py`'s JSON (results/gpu_check.json) as tables, or the command when there is none."""
    lines = ["### GPU check: SD-1.5 shapes at 512 px (`benchmarks/gpu_check.py`)", ""]
    if res is None:
        return lines + [
            "**Not run on a GPU yet**: no GPU was lent to the sessions that wrote these numbers. On a lent "
            f"machine, with the wheels folder of `benchmarks/README.md`: `{GPU_CHECK_COMMAND}` (within 8 "
            "minutes; it rewrites `gpu_check.json` after every row), then copy that file to "
            "`benchmarks/results/gpu_check.json` and rerun this script.",
            "",
        ]
    gpu = res.get("gpu")
    m = res.get("machine", {})
    if gpu:
        where = (f"On **{gpu['name']}** (compute capability {'.'.join(map(str, gpu['capability']))}, "
                 f"{gpu['total_memory_bytes'] / 2**30:.0f} GiB), torch {m.get('torch')}, CUDA {gpu.get('cuda')}, "
                 f"diffusers {m.get('diffusers')}")  # fmt: skip
    else:
        where = (f"**No GPU: a CPU smoke run (`--quick`)** on {m.get('device_name')}, torch {m.get('torch')}; "
                 "tiny model, the numbers only show that every row runs")  # fmt: skip
    done = "" if res.get("finished") else " The run did not finish (killed or out of time): later rows are missing."
    lines += [
        f"{where}" + (f", commit {res['commit'][:7]}" if res.get("commit") else "")
        + f". Model: {res['settings'].get('model')}, {res['settings'].get('resolution')} px; "
        f"{res.get('elapsed_s', 0):.0f} s of a {res.get('budget_s', 0):.0f} s budget.{done}",
        "",
    ]
    rows = res.get("rows", [])
    ok = {r["name"]: r for r in rows if r.get("status") == "ok"}

    def table(kind, columns):
        sel = [r for r in rows if r["kind"] == kind and r.get("status") == "ok"]
        if not sel:
            return []
        for r in sel:
            r["peak_gib"] = _gib(r)
            r["step_ms"] = r["step_s"] * 1e3 if r.get("step_s") else None
            r["mfu_pct"] = r["mfu"] * 100 if r.get("mfu") is not None else None
        return _table(sel, columns) + [""]

    lines += ["Inversion step as `promptset invert` runs it (2 classes per batch; steady step after warm-up):", ""]
    lines += table("invert", [("row", "name"), ("step ms", "step_ms"), ("samples/s", "samples_per_s"),
                              ("TFLOP/s", "achieved_tflops"), ("MFU %", "mfu_pct"),
                              ("peak GiB, weights incl.", "peak_gib")])  # fmt: skip
    base = ok.get("invert bf16 batch 8")
    if base:
        facts = []
        for name, label in (("invert fp32 no-TF32 batch 8", "IEEE fp32"), ("invert fp32 TF32 batch 8", "fp32+TF32"),
                            ("invert fp16 batch 8", "fp16")):  # fmt: skip
            if name in ok:
                facts.append(f"{label} {ok[name]['step_s'] / base['step_s']:.2f}x")
        for b in (16, 32):
            if f"invert bf16 batch {b}" in ok:
                r = ok[f"invert bf16 batch {b}"]
                facts.append(f"batch {b}: {r['samples_per_s'] / base['samples_per_s']:.2f}x the samples/s of batch 8")
        if facts:
            lines += ["Step time relative to bf16 at batch 8: " + "; ".join(facts) + ".", ""]
    grad = next((r for r in rows if r["kind"] == "fp16_gradient" and r.get("status") == "ok"), None)
    if grad:
        lines += [
            f"Vector gradient through promptset's denoising objective against fp32 (TF32 off), "
            f"{grad['latent_side']}x{grad['latent_side']} latents, batch {grad['batch_size']}:",
            "",
            "| model dtype | relative error | cosine | exactly-zero state gradients |",
            "|---|---:|---:|---:|",
        ]
        labels = {"bf16": "bf16", "fp16": "fp16, unscaled", "fp16_scaled": f"fp16, loss x {grad['loss_scale']:.0f}"}
        for key, label in labels.items():
            if f"{key}_vector_grad_rel_err" in grad:
                lines.append(f"| {label} | {grad[f'{key}_vector_grad_rel_err'] * 100:.2f}% | "
                             f"{grad[f'{key}_vector_grad_cosine']:.4f} | "
                             f"{grad[f'{key}_state_grad_zero_fraction'] * 100:.2f}% |")  # fmt: skip
        lines += [f"| fp32 | - | - | {grad['fp32_state_grad_zero_fraction'] * 100:.2f}% |", ""]
    lines += ["Generation through `generate_batch` (DDIM, guidance 7.5):", ""]
    lines += table("generate", [("row", "name"), ("DDIM steps", "ddim_steps"), ("images/s", "images_per_s"),
                                ("s per batch", "batch_s"), ("compile s", "compile_s"), ("peak GiB", "peak_gib"),
                                ("finite", "images_finite")])  # fmt: skip
    lines += table("vae", [("row", "name"), ("encode s", "encode_s"), ("decode s", "decode_s"),
                           ("encode peak GiB", "encode_peak_gib"), ("decode peak GiB", "decode_peak_gib")])
    lines += [f"Students (`train_student`, P1, {res['settings'].get('student', {}).get('image_size')} px):", ""]
    lines += table("student", [("row", "name"), ("samples/s", "samples_per_s"), ("steps", "optimizer_steps"),
                               ("peak GiB", "peak_gib")])
    notes = [r for r in rows if r.get("status") != "ok"]
    if notes:
        lines += ["Rows not measured: " + "; ".join(f"{r['name']}: {r['status']} ({r.get('reason', '')})"
                                                   for r in notes) + ".", ""]  # fmt: skip
    cpu_notes = sorted({r["note"] for r in rows if r.get("note")})
    lines += [f"- {n}" for n in cpu_notes] + ([""] if cpu_notes else [])
    return lines
