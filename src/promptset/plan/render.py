"""The plan as text: the model's FLOPs per unit, one line per piece of work with its FLOPs and estimated time, the
totals, and the stored bytes per IPC of every method next to real images."""

from __future__ import annotations

from ..accounting import COMPRESSOR, fmt_bytes


def fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:,.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:,.1f} min"
    hours = seconds / 3600
    return f"{hours:,.2f} h" if hours < 48 else f"{hours:,.1f} h ({hours / 24:,.1f} days)"


def render(plan: dict) -> str:
    f = plan["flops"]
    lines = [
        f"promptset run --plan {plan['config']} (run folder {plan['run']}): an estimate; nothing is trained, "
        "generated or written",
        f"data: {plan['data']}: {plan['classes']:,} classes, {plan['train_images']:,} training images, "
        f"{plan['test_images']:,} test images",
        f"generator: {plan['generator']}",
        f"FLOPs, counted on the meta device: UNet forward {fmt_flops(f['unet_forward'])} per image at "
        f"{f['gen_latent']}x{f['gen_latent']} latents; per inversion step (batch {f['invert_batch']}, "
        f"{f['invert_prompts']} prompts; UNet forward+backward to the prompt {fmt_flops(f['unet_forward_backward'])} "
        f"per sample at {f['invert_latent']}x{f['invert_latent']}) {fmt_flops(f['invert_step'])}; per generated "
        f"image ({f['gen_steps']} steps x {f['guidance_factor']} for guidance x UNet forward + VAE decode "
        f"{fmt_flops(f['vae_decode'])}) {fmt_flops(f['generated_image'])}",
        f"time on {plan['timing']}",
        "",
        f"{'stage':<9} {'FLOPs':>12} {'time (est.)':>24}  {'from':<6} work   (from: timed = calls timed on this "
        "device; FLOPs = FLOPs / the rate above)",
    ]
    for x in _grouped(plan["lines"]):
        lines.append(f"{x['stage']:<9} {fmt_flops(x['flops']) if x['flops'] else '-':>12} "
                     f"{fmt_time(x['seconds']):>24}  {x['from']:<6} {x['text']}")
    per_stage: dict[str, float] = {}
    for x in plan["lines"]:
        per_stage[x["stage"]] = per_stage.get(x["stage"], 0.0) + x["seconds"]
    lines.append(f"{'total':<9} {fmt_flops(plan['total_flops']):>12} {fmt_time(plan['total_seconds']):>24}  "
                 "(" + ", ".join(f"{k} {fmt_time(v)}" for k, v in per_stage.items()) + ")")
    b = plan["bytes"]
    if b["rows"]:
        lines += ["", f"stored bytes per IPC (d3m's prompts: {prompts_per_class_text(plan['prompts'])}): array "
                  f"bytes / after {COMPRESSOR} (estimated: "
                  + ", ".join(sorted(b["stand_ins"])) + (" on same-shape stand-ins; " if b["stand_ins"] else "")
                  + "seeds exact), and real images at the same IPC"]
        methods = list(dict.fromkeys(r["method"] for r in b["rows"]))
        real = {r["ipc"]: r for r in b["real"]}
        keys = list(dict.fromkeys((r["protocol"], r["ipc"]) for r in b["rows"]))
        table = []
        for protocol, ipc in keys:
            cells = []
            for m in methods:
                row = next((r for r in b["rows"] if (r["protocol"], r["ipc"], r["method"]) == (protocol, ipc, m)),
                           None)
                cells.append("" if row is None else _pair(row["bytes"], row["zlib"])
                             + (f" (IPC {row['method_ipc']})" if row["method_ipc"] != ipc else ""))
            table.append((protocol, ipc, cells))
        widths = [max([len(m)] + [len(t[2][i]) for t in table]) + 2 for i, m in enumerate(methods)]
        lines.append(f"{'protocol':<9}{'IPC':>4}  " + "".join(f"{m:<{w}}" for m, w in zip(methods, widths))
                     + f"real images ({b['image_size']} px)")
        for protocol, ipc, cells in table:
            lines.append(f"{protocol:<9}{ipc:>4}  " + "".join(f"{c:<{w}}" for c, w in zip(cells, widths))
                         + _pair(real[ipc]["raw"], real[ipc]["zlib"]))
        if any(r["zlib"] is None for r in b["real"]):
            lines.append("(real images after zlib: counted on a sample of the data folder, which is not here)")
    if plan["notes"]:
        lines += [""] + [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def prompts_per_class_text(prompts: dict) -> str:
    """How many prompts invert learns: '5 prompts per class, 5,000 in all' (a range when some classes have fewer
    training images than --modes)."""
    low, high = prompts["per_class_min"], prompts["per_class_max"]
    each = f"{high}" if low == high else f"{low} to {high}"
    return f"{each} prompt{'' if high == 1 else 's'} per class, {prompts['total']:,} in all"


def _grouped(lines: list[dict]) -> list[dict]:
    """Lines of one group merged into one (FLOPs and seconds summed, their counts summed and listed)."""
    out, where = [], {}
    for x in lines:
        kind = "timed" if x["measured"] else "FLOPs"
        if not x["group"]:
            out.append(x | {"from": kind})
            continue
        key = (x["stage"], x["group"])
        if key not in where:
            where[key] = len(out)
            out.append({"stage": x["stage"], "flops": 0.0, "seconds": 0.0, "counts": {}, "from": kind,
                        "group": x["group"]})
        y = out[where[key]]
        y["flops"] += x["flops"]
        y["seconds"] += x["seconds"]
        y["from"] = y["from"] if y["from"] == kind else "mixed"
        for k, v in x["counts"].items():
            y["counts"][k] = y["counts"].get(k, 0) + v
    for y in out:
        if "group" in y and "text" not in y:
            y["text"] = y["group"] + ": " + ", ".join(f"{v:,} {k}" for k, v in y["counts"].items())
    return out


def _pair(raw: int, packed: int | None) -> str:
    return f"{fmt_bytes(raw)} / {fmt_bytes(packed) if packed is not None else '-'}"
