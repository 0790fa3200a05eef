"""The CIFAR-10 world's outputs: `experiments/cifar10/results/cifar10_world{,_smoke}.{json,md}` from the run's
results.json, with a reading that states only what the numbers show. `cifar10_world.py` calls `write_outputs` after
its stages (and alone with `--report-only`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cifar10_common import (
    RESULTS_DIR,
    SPLIT,
    STUDENT,
    fidelity_table,
    generated_teacher_accuracy,
    generation_stats,
    log,
    machine_info,
    run_inputs,
    save_inputs,
)


def rounds_list(p: dict) -> list[int]:
    return sorted({int(x) for x in str(p["rounds"]).split(",")})


# D3M Table 2, CIFAR-10, ConvNet-3: soft labels (P1) and one-hot labels (P2)
PAPER = {"p1": {"d3m": {1: 35.88, 10: 58.58, 50: 70.52}, "rded": {1: 15.50, 10: 38.64, 50: 56.28}},
         "p2": {"d3m": {1: 28.43, 10: 37.69, 50: 47.09}, "rded": {1: 20.05, 10: 31.78, 50: 46.53}}}
ORDER_METHODS = ("d3m", "class-prompt", "rded", "random-real")


def reading(entries: dict, quality: dict, fidelity: dict, p: dict) -> list[str]:
    """Data-driven remarks under the tables (only what the numbers themselves show)."""

    def get(method, protocol, ipc, fresh: bool):
        """Final top-1 of a row: generative methods with fresh rounds (or the fixed set), real methods as they are."""
        for e in entries.values():
            r = e["distilled"].get("rounds")
            ok = r is None or (r > 1 if fresh else r == 1)
            if e["method"] == method and e["protocol"] == protocol and e["ipc"] == ipc and ok:
                return e
        return None

    out = ["### Reading the numbers", ""]
    if quality:
        out.append(
            f"- The teacher recognises {quality['accuracy']:.0%} of the generator's class-prompt samples (chance "
            f"{quality['chance']:.0%}); d3m and class-prompt can only be as good as the images it renders."
        )
    if fidelity:
        d, c = fidelity["d3m"], fidelity["class-prompt"]
        out.append(
            f"- Prompt fidelity: on the classes the captions never name, the teacher recognises {d['unnamed']:.0%} of "
            f"d3m's images against {c['unnamed']:.0%} of the class-name prompt's; on the named classes "
            f"{d['named']:.0%} against {c['named']:.0%}."
        )
    ipcs = sorted({e["ipc"] for e in entries.values() if e["ipc"] is not None})
    for ipc in ipcs:
        d, r = get("d3m", "p1", ipc, True) or get("d3m", "p1", ipc, False), get("rded", "p1", ipc, True)
        if d is None or r is None:
            continue
        dm, rm = d["final_top1"]["mean"], r["final_top1"]["mean"]
        paper = PAPER["p1"]["d3m"].get(ipc), PAPER["p1"]["rded"].get(ipc)
        verdict = "holds" if dm > rm else "does not hold"
        n = d["distilled"].get("rounds")
        images = f"{n} rounds of fresh images" if n and n > 1 else "one fixed generated set: no fresh-round row yet"
        line = (f"- P1 (soft labels, {images}), IPC {ipc}, {d['epochs']} "
                f"epochs: d3m {dm:.1f}% vs rded {rm:.1f}% ({dm - rm:+.1f} points): the paper's ordering {verdict} "
                f"here")  # fmt: skip
        if paper[0] is not None:
            line += f" (paper, Table 2 on real CIFAR-10 with SD: d3m {paper[0]} vs rded {paper[1]})"
        if d["epochs"] < 300:
            line += f"; **cut budget** ({d['epochs']} epochs, the paper uses 300): this row says nothing about D3M"
        out.append(line + ".")
        rr = get("random-real", "p1", ipc, True)
        if rr is not None:
            out.append(f"  random-real at the same IPC: {rr['final_top1']['mean']:.1f}%.")
        ipc_eq = max(1, round(d["stored_bytes"] / (10 * 32 * 32 * 3)))
        eq = get("random-real", "p1", ipc_eq, True)
        if eq is not None and eq["epochs"] == d["epochs"]:
            out.append(f"  At equal stored bytes: d3m stores {d['stored_bytes']:,} B (IPC-equivalent "
                       f"{d['ipc_equivalent']:.2f}); random-real at IPC {ipc_eq} ({eq['stored_bytes']:,} B) reaches "
                       f"{eq['final_top1']['mean']:.1f}%.")  # fmt: skip
    p2 = []
    for ipc in ipcs:
        d, r = get("d3m", "p2", ipc, True), get("rded", "p2", ipc, True)
        if d is not None and r is not None:
            dm, rm = d["final_top1"]["mean"], r["final_top1"]["mean"]
            text = (f"IPC {ipc} ({d['epochs']} epochs): d3m {dm:.1f}% vs rded {rm:.1f}% ({dm - rm:+.1f} points, the "
                    f"paper's ordering {'holds' if dm > rm else 'does not hold'}")  # fmt: skip
            paper = PAPER["p2"]["d3m"].get(ipc), PAPER["p2"]["rded"].get(ipc)
            if paper[0] is not None:
                text += f"; paper, one-hot: {paper[0]} vs {paper[1]}"
            p2.append(text + ")")
    if p2:
        out.append("- P2 (one-hot labels, augmentation; d3m with fresh rounds): " + "; ".join(p2) + ".")
    for protocol in ("p1", "p2"):
        for ipc in ipcs:
            rows = [(m, get(m, protocol, ipc, True)) for m in ORDER_METHODS]
            rows = sorted(((e["final_top1"]["mean"], m) for m, e in rows if e is not None), reverse=True)
            if len(rows) >= 3:
                ranked = " > ".join(f"{m} {v:.1f}" for v, m in rows)
                out.append(f"- {protocol.upper()}, IPC {ipc}, methods by final top-1 (%; generative methods with "
                           f"fresh rounds): {ranked}.")  # fmt: skip
    for protocol in ("p1", "p2"):
        parts = []
        for ipc in ipcs:
            d, c = get("d3m", protocol, ipc, True), get("class-prompt", protocol, ipc, True)
            df, cf = get("d3m", protocol, ipc, False), get("class-prompt", protocol, ipc, False)
            if d is not None and c is not None:
                text = (f"IPC {ipc}: d3m {d['final_top1']['mean']:.1f}% vs class-prompt "
                        f"{c['final_top1']['mean']:.1f}% with {d['distilled'].get('rounds')} rounds of fresh "
                        "images")  # fmt: skip
                if df is not None and cf is not None:
                    text += (f", {df['final_top1']['mean']:.1f}% vs {cf['final_top1']['mean']:.1f}% on one fixed "
                             "set")  # fmt: skip
                parts.append(text)
        if parts:
            out.append(f"- {protocol.upper()}, learned prompt vs the class-name prompt (same generator, same seeds): "
                       + "; ".join(parts) + ".")  # fmt: skip
    for protocol in ("p1", "p2"):
        diffs = []
        for ipc in ipcs:
            a, b = get("rded", protocol, ipc, True), get("random-real", protocol, ipc, True)
            if a is not None and b is not None:
                diffs.append(f"{a['final_top1']['mean'] - b['final_top1']['mean']:+.1f} at IPC {ipc}")
        if diffs:
            out.append(f"- {protocol.upper()}: rded minus random-real (points): " + ", ".join(diffs) + ".")
    for protocol in ("p1", "p2"):
        parts = []
        for ipc in ipcs:
            df, rr = get("d3m", protocol, ipc, False), get("random-real", protocol, ipc, True)
            d = get("d3m", protocol, ipc, True)
            if df is None or rr is None:
                continue
            text = (f"IPC {ipc}: one fixed set of d3m images {df['final_top1']['mean']:.1f}% vs as many random real "
                    f"images {rr['final_top1']['mean']:.1f}%")  # fmt: skip
            if d is not None:
                n = d["distilled"].get("rounds")
                text += f" ({n} fresh rounds, {n}x the images: {d['final_top1']['mean']:.1f}%)"
            parts.append(text)
        if parts:
            out.append(f"- {protocol.upper()}, what one generated image is worth against one real image (same count, "
                       "same steps): " + "; ".join(parts) + ".")  # fmt: skip
    cut = sorted({e["epochs"] for e in entries.values() if e["ipc"] is not None and e["epochs"] < 300})
    if cut:
        out.append(f"- Rows at {', '.join(map(str, cut))} epochs are a cut budget (the paper trains students for "
                   "300 epochs); with stored soft labels students converge slowly, so compare those rows only with "
                   "rows of the same IPC and epochs.")  # fmt: skip
    out.append("")
    return out


def has_entry(entries: dict, method: str, protocol: str, ipc: int | None, regen: int, n_epochs: int,
              seeds: int) -> bool:
    """Whether `entries` holds the row under the key evaluate writes for it (promptset's defaults), at these epochs
    and seeds."""
    from promptset.evaluation.results import entry_key, variant_key
    from promptset.stages.evaluate import EvaluateConfig

    cfg = EvaluateConfig(protocol=protocol, regen_every=regen)
    e = entries.get(entry_key(method, protocol, STUDENT, ipc, regen) + variant_key(cfg, method))
    return bool(e) and e.get("epochs") == n_epochs and len(e.get("seeds") or []) == seeds


def missing_rows(plan: list, entries: dict, p: dict) -> list[str]:
    """The planned (method, protocol, IPC, images) rows that `entries` does not hold at their epochs and seeds."""
    out = []
    for item in plan:
        if item == "equal-bytes":
            continue
        protocol, ipc, n_epochs, regen, methods = item
        seeds = p["full_seeds"] if methods == ["full"] else p["seeds"]
        for m in methods:
            if not has_entry(entries, m, protocol, ipc, regen, n_epochs, seeds):
                images = "" if m in ("rded", "random-real", "full") else (f", regen every {regen}" if regen else
                                                                          ", fixed")  # fmt: skip
                out.append(f"{m} {protocol.upper()} IPC {ipc or 'all'} ({n_epochs} epochs{images})")
    return out


def per_cache_times(committed: Path, timer, tag: str, cpu: str) -> dict[str, dict]:
    """Wall time per stage of every cache folder that worked on this table: the committed file's other caches
    (a file written before caches had ids counts as one earlier cache) and this one."""
    old = json.loads(committed.read_text()) if committed.is_file() else {}
    caches: dict[str, dict] = {}
    if old.get("tag") == tag:
        wall = old.get("wall_time_s") or {}
        caches = dict(wall.get("per_cache") or {})
        if not caches and wall.get("per_stage_cumulative"):
            caches["earlier"] = {"cpu": (old.get("machine") or {}).get("cpu"), "stages": wall["per_stage_cumulative"]}
    caches[timer.cache_id] = {"cpu": cpu, "stages": dict(timer.data)}
    return caches


def write_outputs(name, args, p, tag, root, model, run, test, pre, timer, ipcs, epochs, est, t_start, plan) -> None:
    from promptset.accounting import fmt_bytes
    from promptset.backends.mini import model_fingerprint

    results = json.loads((run / "eval" / "results.json").read_text())
    entries = results["entries"]
    mach = machine_info(args.device)
    for e in entries.values():  # rows of this run folder ran on this machine; before entries named their CPU
        if not e.get("imported_from") and e.get("device") == "cpu":
            e["device"] = f"cpu ({mach['cpu']})"
    replaced_path = run / "eval" / "replaced.json"
    replaced = json.loads(replaced_path.read_text()) if replaced_path.is_file() else {}
    select_info = json.loads((run / "select.json").read_text())
    inv_rows = [json.loads(x) for x in (run / "invert" / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run / "invert" / "metrics.jsonl").is_file() else []  # fmt: skip
    device = args.device
    quality = pre.get("quality") or {}
    fid_path = root / "prompt_fidelity.json"
    fidelity = json.loads(fid_path.read_text()) if fid_path.is_file() else {}
    recipe = pre.get("recipe", {})
    summary = {
        "benchmark": "cifar10_world",
        "scale": args.scale,
        "tag": tag,
        "model_hash": model_fingerprint(model),
        "inputs": run_inputs(run),
        "preset": p,
        "settings": {
            "data": "CIFAR-10 as JPEG q75 (../shared/data/cifar10-jpeg.tar.gz), official split",
            "foundation_split": f"train files 0-{SPLIT - 1} per class (the generator's training data; first "
            f"{recipe.get('max_images_per_class') or SPLIT} used)",
            "distilled_split": f"train files {SPLIT}-{2 * SPLIT - 1} per class; first {p['distill_per_class']} used "
            "(select, random-real and full all draw from these)",
            "test": "official test split, "
            + ("all 1000" if not p["test_per_class"] else f"first {p['test_per_class']}")
            + " images per class",
            "generator": f"mini {model.name}: UNet {recipe.get('unet_size')} ({pre.get('unet_params')} parameters), "
            "TAEF2 latents at 64 px, all-MiniLM-L6-v2 text encoder",
            "teacher": "ResNet-20 (cifar10_resnet20.safetensors), 32 px",
            "student": STUDENT,
            "select": "ResNet-20 teacher, 5 crops, factor 1, 32 px",
            "invert": f"mini, {p['invert_steps']} steps, batch {p['invert_batch']}, 64 px, flip {p['invert_flip']}",
            "generate": f"ipc {max(ipcs)}, {p['gen_steps']} DDIM steps, guidance {p['guidance']}, 32 px patches, "
            "ResNet-20 soft labels (fp16)",
            "epochs_per_ipc": epochs,
            "full_epochs": p["full_epochs"],
            "full_seeds": p["full_seeds"],
            "rounds_of_generated_images": rounds_list(p),
            "seeds": p["seeds"],
            "test_every": "last epoch only (best = final)"
            if not p["eval_every"]
            else f"every {p['eval_every']} epochs",
        },
        "machine": mach,
        "wall_time_s": {
            "per_stage_cumulative": timer.data,
            "per_cache": per_cache_times(RESULTS_DIR / f"{name}.json", timer, tag, mach["cpu"]),
            "this_invocation": timer.this_run,
            "this_invocation_total": round(time.time() - t_start, 1),
        },
        "estimate_s": {k: round(v) for k, v in est.items()},
        "generator": pre,
        "prompt_fidelity": fidelity,
        "generate_teacher_accuracy": generated_teacher_accuracy(run),
        "invert_final_loss": inv_rows[-1]["loss"] if inv_rows else None,
        "select": {"classes": select_info.get("classes")},
        "generation_cache": generation_stats(entries),
        "paths": {"root": str(root), "model": str(model), "run": str(run), "test": str(test)},
        "not_measured": missing_rows(plan, entries, p),
        "entries": entries,
        "replaced": replaced,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    save_inputs(run, RESULTS_DIR / f"{name}.json")  # the prompts and labels of `inputs`, for the next CPU model

    # ---- markdown ----
    lines = [f"## CIFAR-10 (offline JPEG world), `{tag}` scale", ""]
    lines += [
        f"Command: `.venv/bin/python experiments/cifar10/cifar10_world.py --scale {args.scale}"
        + (f" --cache {args.cache}" if args.cache != os.path.expanduser("~/.cache/promptset") else "")
        + (f" --device {device}" if device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + "` (resumable; every stage skips finished work).",
        "",
        "**Caveat:** this is CIFAR-10 stored as JPEG q75 (4:2:0 chroma). Classifiers score about 10 points lower on "
        "this test set than on the original one (the ResNet-20 teacher: 81.0% here, 91.8% on the original), so these "
        "numbers are comparable with each other, never with published CIFAR-10 tables.",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores (shared with other jobs), torch {mach['torch']}, "
        f"GPU: {mach['gpu']} (stages ran on `{device}`).",
        "",
        "### Setting",
        "",
        f"- Split by file index per training class: files 0-2499 = foundation (trains the generator; first "
        f"{recipe.get('max_images_per_class') or SPLIT} per class used), files 2500-4999 = the distilled split (first "
        f"{p['distill_per_class']} per class used: select's collages, `random-real`'s draws and `full`'s "
        "training set).",
        "- Test: the official test split, "
        + (
            "all 10,000 images."
            if not p["test_per_class"]
            else f"first {p['test_per_class']} images per class ({p['test_per_class'] * 10:,} of 10,000) "
            "to fit the CPU budget."
        ),
        f"- Generator: the committed `experiments/cifar10/models/{model.name}` (its COMMAND.md has the command): UNet "
        f"`{recipe.get('unet_size')}` ({(pre.get('unet_params') or 0) / 1e6:.2f}M parameters, conditioning "
        f"`{recipe.get('conditioning')}`, {recipe.get('prediction_type')}) on TAEF2 latents at 64 px, "
        f"{pre.get('steps')} steps x batch {recipe.get('batch_size')} (lr {recipe.get('lr')}, EMA "
        f"{recipe.get('ema_decay')}), final loss {pre.get('final_loss')}. Samples are resized to 32 px.",
        f"- D3M: select (ResNet-20, 5 crops, factor 1, 32 px) -> invert (one token per class, {p['invert_steps']} "
        f"steps, batch {p['invert_batch']}, collages upsampled to 64 px) -> generate ({p['gen_steps']} DDIM steps, "
        f"guidance {p['guidance']}, soft labels from ResNet-20 in fp16).",
        f"- Students: ConvNet-3, AdamW lr 1e-3, cosine, batch 64 (capped at the set size), {p['seeds']} seeds; epochs "
        + ", ".join(f"IPC {i}: {epochs[i]}" for i in sorted(ipcs))
        + f"; `full`: {p['full_epochs']} ({p['full_seeds']} seed(s)). "
        + "d3m / class-prompt are trained on one fixed generated set (`fixed`)"
        + "".join(
            f" and on {r} rounds of fresh images (new seeds, regen_every = ceil(epochs / {r}), the same number "
            "of optimizer steps; the soft labels of every round are stored and counted under P1)"
            for r in rounds_list(p)
            if r > 1
        )
        + ", under both protocols. "
        + (
            "Tested after the last epoch only, so best = final."
            if not p["eval_every"]
            else f"Tested every {p['eval_every']} epoch(s)."
        ),
        "- P1: stored ResNet-20 soft labels (fp16, counted in the bytes), no augmentation. P2: one-hot labels, "
        "random resized crop (scale 0.5-1) + flip.",
        "",
        "### Generator quality",
        "",
    ]
    if quality:
        lines.append(
            f'ResNet-20 accuracy on the generator\'s class-prompt samples ("a photo of a {{name}}", '
            f"{quality['samples']} samples, {quality['sample_steps']} DDIM steps, guidance {quality['guidance']}): "
            f"**{quality['accuracy'] * 100:.1f}%** (chance {quality['chance'] * 100:.1f}%; mean confidence in the "
            f"prompted class {quality['mean_class_confidence'] * 100:.1f}%)."
        )
        lines.append("")
        lines.append("Per class: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in quality["per_class"].items()) + ".")
    else:
        lines.append("(not measured)")
    lines += [""]
    if fidelity:
        lines += fidelity_table(fidelity)
    order = {"d3m": 0, "class-prompt": 1, "rded": 2, "random-real": 3, "full": 4}
    for protocol, title in (
        ("p1", "P1: stored soft labels, no augmentation"),
        ("p2", "P2: one-hot labels + augmentation"),
    ):
        rows = [e for e in entries.values() if e["protocol"] == protocol and e["student"] == STUDENT]
        rows.sort(key=lambda e: (order.get(e["method"], 9), e["ipc"] or 10**9, e["distilled"].get("rounds") or 0))
        lines += [
            f"### {title}",
            "",
            "| method | IPC | images | epochs (steps) | final top-1 (%) | best top-1 (%) | stored | IPC-equiv. |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for e in rows:
            f, b = e["final_top1"], e["best_top1"]
            ipc = "all" if e["ipc"] is None else e["ipc"]
            rounds = e["distilled"].get("rounds")
            images = "real" if rounds is None else ("fixed" if rounds == 1 else f"{rounds} rounds")
            lines.append(
                f"| {e['method']} | {ipc} | {images} | {e['epochs']} ({e['optimizer_steps']}) "
                f"| {f['mean']:.2f} ± {f['std']:.2f} "
                f"| {b['mean']:.2f} ± {b['std']:.2f} | {fmt_bytes(e['stored_bytes'])} | {e['ipc_equivalent']:.3f} |"
            )
        lines.append("")
    if summary["not_measured"]:
        lines += ["**Not measured yet** (the script resumes them, row by row): " + "; ".join(summary["not_measured"])
                  + ".", ""]  # fmt: skip
    imported = sorted(k for k, e in entries.items() if e.get("imported_from"))
    if imported:
        near = sum(1 for k in imported if entries[k].get("imported_inputs_within_tolerance"))
        lines += [
            f"{len(imported)} entries were measured in an earlier session on the same generator and run inputs "
            "(equal sha256 of collages, prompts and labels"
            + (f"; for {near}, prompts and labels equal to within rounding between CPU models" if near else "")
            + ") and imported from the committed results file.",
            "",
        ]
    cpus: dict[str, int] = {}
    for e in entries.values():
        d = e.get("device") if e.get("device") != "cpu" else "cpu (not recorded)"
        cpus[d] = cpus.get(d, 0) + 1
    lines += ["Rows per processor: " + ", ".join(f"{n} on {d}" for d, n in sorted(cpus.items())) + ".", ""]
    again = [(k, r) for k, r in sorted(replaced.items()) if k in entries]
    if again:
        lines += [
            "Rows trained again because this session's prompts or labels were not those of the committed rows "
            "(inversion on another CPU model): the earlier measurement next to this one.",
            "",
            "| row | earlier (device) | final top-1 earlier (%) | final top-1 now (%) |",
            "|---|---|---:|---:|",
            *(f"| {k} | {r['device']} | {r['final_top1']['mean']:.2f} ± {r['final_top1']['std']:.2f} "
              f"| {entries[k]['final_top1']['mean']:.2f} ± {entries[k]['final_top1']['std']:.2f} |" for k, r in again),
            "",
        ]  # fmt: skip
    lines += [
        "Stored bytes: d3m = prompts (fp32) + class list + seeds (+ P1 soft labels of every round); class-prompt = "
        "the prompt strings + seeds (+ soft labels); rded / random-real / full = raw uint8 images (+ P1 soft labels). "
        "Generator and teacher weights are not counted. IPC-equivalent = stored bytes / (10 x 32 x 32 x 3).",
        "",
        f"![accuracy vs bytes]({name}_accuracy_vs_bytes.png)",
        "",
        *reading(entries, quality, fidelity, p),
        "### Wall time (seconds, cumulative over resumed invocations)",
        "",
        "| stage | wall (s) |",
        "|---|---:|",
    ]
    caches = summary["wall_time_s"]["per_cache"]
    stages = list(dict.fromkeys(k for c in caches.values() for k in c["stages"]))
    if len(caches) > 1:
        lines[-2:] = [
            "| stage | " + " | ".join(f"cache {i + 1} ({c['cpu']})" for i, c in enumerate(caches.values()))
            + " | all |",
            "|---|" + "---:|" * (len(caches) + 1),
        ]  # fmt: skip
    for k in stages:
        vals = [c["stages"].get(k, 0.0) for c in caches.values()]
        cells = " | ".join(f"{v:,.0f}" for v in vals) + (f" | {sum(vals):,.0f}" if len(caches) > 1 else "")
        lines.append(f"| {k} | {cells} |")
    totals = [sum(c["stages"].values()) for c in caches.values()]
    cells = " | ".join(f"**{v:,.0f}**" for v in totals) + (f" | **{sum(totals):,.0f}**" if len(caches) > 1 else "")
    lines.append(f"| **total** | {cells} |")
    if len(caches) > 1:
        lines += ["", "Each cache folder (a machine's `--cache`) ran the stages it needed: a new cache prepares "
                      "the data, selects, inverts and generates again before it trains the rows not measured yet."]
    lines += [
        "",
        "Stages killed part-way are not in this table (they resume from their checkpoints). The generator's "
        f"training (not part of this script) took {pre.get('train_seconds')} s "
        f"({pre.get('seconds_per_step')} s/step). "
        + (
            "Images evaluate denoised for the entries above: {generated}; taken from promptset's round cache "
            "(`<run>/eval/rounds/`) instead of being denoised again: {reused}.".format(**generation_stats(entries))
        ),
        "",
        f"Preset `{args.scale}`" + (" (with overrides)" if tag != args.scale else "") + ": `" + json.dumps(p) + "`.",
        "",
    ]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines))
    log(
        f"wrote {RESULTS_DIR / (name + '.json')}, {RESULTS_DIR / (name + '.md')}, "
        f"{RESULTS_DIR / (name + '_accuracy_vs_bytes.png')}"
    )
