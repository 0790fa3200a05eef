"""Accuracy against stored bytes on the CIFAR-10 world (issue 17): label codecs and seed selection, row by row.

    python experiments/cifar10/codec_trade.py --scale paper [--device cuda] [--threads 1]   # the issue's table
    python experiments/cifar10/codec_trade.py --scale smoke                                  # minutes: every row, tiny

The run is the CIFAR-10 world's (`cifar10_world.py`, same preset, same stage options: select with ResNet-20, invert
on the committed mini generator, generate), prepared there or reused when it exists, and mirrored into
`<cache>/codec_trade/<tag>-<model>/run` (without its eval/) so these rows never mix with the world's table.

Rows, all at one IPC (10) with ConvNet-3, every one through promptset's own `evaluate`:
1. P1 (stored soft labels; d3m with fresh images every ceil(epochs / rounds) epochs at a fixed step count; rded and
   random-real as fixed real sets) once per label codec (`--codecs`, default fp16, int8, topk:3, topk:1, vq:64):
   d3m, rded, random-real, and random-real at d3m's stored bytes under that codec (`random-real@d3m`).
2. Seed selection: d3m with G candidates per stored image (`--candidates`, default 1, 4, 8) under P1 (fp16) and P2,
   with the teacher's top-1 on the images the students train on.

Every row already in the run's results.json with the same epochs and seeds is skipped, so a stopped run resumes at
the next row. Writes `experiments/cifar10/results/codec_trade.json` (`codec_trade_smoke.json` for `--scale smoke`);
`tools/write_benchmarks_md.py` turns it into the table, the accuracy-vs-bytes plot and the reading. Benchmarks report
numbers, they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10_common as common  # noqa: E402
from cifar10_world import PRESETS as WORLD_PRESETS  # noqa: E402

RESULTS_DIR = common.RESULTS_DIR
STUDENT = "convnet3"

# The trade's own settings; distillation (select/invert/generate) and the test split follow the world's preset.
PRESETS = {
    "smoke": dict(world="smoke", ipc=2, epochs=2, rounds=2, seeds=1, codecs="fp16,int8,topk:3,topk:1,vq:64",
                  candidates="1,2"),
    "reduced": dict(world="reduced", ipc=10, epochs=300, rounds=10, seeds=1, codecs="fp16,int8,topk:3,topk:1,vq:64",
                    candidates="1,4,8"),
    "cpu": dict(world="cpu", ipc=10, epochs=300, rounds=10, seeds=3, codecs="fp16,int8,topk:3,topk:1,vq:64",
                candidates="1,4,8"),
    "paper": dict(world="paper", ipc=10, epochs=300, rounds=10, seeds=3, codecs="fp16,int8,topk:3,topk:1,vq:64",
                  candidates="1,4,8"),
}


def log(msg: str) -> None:
    print(f"[codec_trade {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plan_rows(t: dict) -> list[dict]:
    """Every evaluate call of the trade, the most telling first (a stopped run keeps what matters)."""
    regen = math.ceil(t["epochs"] / t["rounds"]) if t["rounds"] > 1 else 0
    codecs = [c.strip() for c in t["codecs"].split(",") if c.strip()]
    candidates = [int(g) for g in str(t["candidates"]).split(",")]
    rows = [dict(part="codec", protocol="p1", codec=c, candidates=1, regen=regen,
                 methods=["d3m", "rded", "random-real", "random-real@d3m"]) for c in codecs]
    rows += [dict(part="selection", protocol=proto, codec="fp16", candidates=g, regen=regen, methods=["d3m"])
             for proto in ("p1", "p2") for g in candidates]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(PRESETS), default="cpu", help="preset (trade rows and world preset)")
    ap.add_argument("--shared", default=os.environ.get("PROMPTSET_SHARED", str(common.REPO.parent / "shared")),
                    help="folder holding data/ and weights/")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/promptset"), help="cache folder (not the repo)")
    ap.add_argument("--model", default=str(common.DEFAULT_MODEL), help="the mini generator")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--no-progress", action="store_true")
    for key in ("ipc", "epochs", "rounds", "seeds"):
        ap.add_argument(f"--{key}", type=int, default=None, help=f"override the preset ({PRESETS['cpu'][key]})")
    ap.add_argument("--codecs", default=None, help=f"override the preset ({PRESETS['cpu']['codecs']})")
    ap.add_argument("--candidates", default=None, help=f"override the preset ({PRESETS['cpu']['candidates']})")
    ap.add_argument("--methods", default="", help="evaluate only these of each row's methods (comma-separated; "
                    "default all: d3m, rded, random-real, random-real@d3m); another process can take the rest")
    ap.add_argument("--report-only", action="store_true", help="evaluate nothing: write the results of the rows done "
                    "in --cache; with none there (a fresh clone), rewrite the .md from the committed JSON")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t = dict(PRESETS[args.scale])
    for key in ("ipc", "epochs", "rounds", "seeds", "codecs", "candidates"):
        if getattr(args, key) is not None:
            t[key] = getattr(args, key)
    wp = dict(WORLD_PRESETS[t["world"]])
    cache, shared, model = common.outside_repo(args.cache), Path(args.shared).resolve(), Path(args.model).resolve()
    progress = not args.no_progress
    started = time.time()

    from promptset.evaluation.results import entry_key, variant_key
    from promptset.stages.evaluate import EvaluateConfig

    root = common.world_root(cache, t["world"], model)
    if args.report_only and not (cache / "codec_trade" / root.name / "run" / "eval" / "results.json").is_file():
        return rewrite_tables(args.scale)
    teacher = f"resnet20:{shared / 'weights' / 'cifar10_resnet20.safetensors'}"
    _, distill, test = common.data_splits(shared, cache, wp["test_per_class"])
    ipcs = [int(x) for x in str(wp["ipcs"]).split(",")]
    source = common.distill_run(root / "run", distill, model, teacher, wp, max(ipcs), args.device, progress)
    # d3m's images are the same for every codec: the world run's round cache holds them once for every mirror
    run = common.mirror(source, cache / "codec_trade" / root.name / "run", rounds=source / "eval" / "rounds")
    log(f"run {run} (prompts of {source}); test {test}; rows: {json.dumps(t)}")
    results_path = run / "eval" / "results.json"

    def existing() -> dict:
        return json.loads(results_path.read_text())["entries"] if results_path.is_file() else {}

    committed = committed_rows(args, t, wp)  # rows an earlier session measured (maybe on another machine)

    def keys_of(row: dict) -> dict[str, str]:
        """{method: its key in results.json} for one row ('' for a random-real@d3m row not yet evaluated)."""
        cfg = EvaluateConfig(protocol=row["protocol"], label_codec=row["codec"], candidates=row["candidates"],
                             regen_every=row["regen"])
        out = {}
        for m in row["methods"]:
            regen = row["regen"] if m == "d3m" else 0
            out[m] = entry_key(m, row["protocol"], STUDENT, t["ipc"], regen) + variant_key(cfg, m)
            if m.startswith("random-real@"):  # its IPC is the one of d3m's bytes: found by the rest of its key
                shape = re.compile(rf"{re.escape(m)}/{row['protocol']}/{STUDENT}/ipc\d+"
                                   rf"{re.escape(variant_key(cfg, m))}/matches-d3m-ipc{t['ipc']}")
                out[m] = next((k for k in [*existing(), *committed] if shape.fullmatch(k)), "")
        return out

    def done(key: str) -> bool:
        e, r = existing().get(key), committed.get(key)
        return bool(e and e.get("epochs") == t["epochs"] and len(e.get("seeds") or []) == t["seeds"]) or bool(
            r and r["epochs"] == t["epochs"] and r["seeds"] == t["seeds"])

    timings = {}
    for row in [] if args.report_only else plan_rows(t):
        todo = [m for m, key in keys_of(row).items() if not done(key)
                and (not args.methods or m in args.methods.split(","))]
        what = f"{row['protocol']} codec {row['codec']} G {row['candidates']}: {', '.join(row['methods'])}"
        seconds = common.evaluate_missing(
            what, todo, "codec_trade", run=str(run), test=str(test), protocol=row["protocol"], student=STUDENT,
            ipc=t["ipc"], epochs=t["epochs"], seeds=t["seeds"], regen_every=row["regen"], label_codec=row["codec"],
            candidates=row["candidates"], teacher=teacher, gen_steps=wp["gen_steps"], guidance=wp["guidance"],
            eval_every=wp["eval_every"] or t["epochs"], device=args.device, progress=progress,
        )  # fmt: skip
        if seconds is not None:
            timings[what] = round(seconds, 1)
    # only the rows of this plan (a results.json may hold others: fresh rounds in the sequential order, say)
    planned = {k for row in plan_rows(t) for k in keys_of(row).values() if k and done(k)}
    write_results(args, t, wp, run, model, {k: e for k, e in existing().items() if k in planned}, timings,
                  time.time() - started, {k: r for k, r in committed.items() if k in planned})
    return 0


def rewrite_tables(scale: str) -> int:
    """`--report-only` with no run of the trade in the cache: the .md again from the committed results JSON (which,
    like the plot, stays as it is)."""
    name = "codec_trade_smoke" if scale == "smoke" else "codec_trade"
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no results to report; run without --report-only first")
    payload = json.loads(path.read_text())
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(markdown_section(payload, f"{name}_accuracy_vs_bytes.png")))
    log(f"no run of the trade in the cache: rewrote {RESULTS_DIR / (name + '.md')} from {path}")
    return 0


def committed_rows(args, t: dict, wp: dict) -> dict[str, dict]:
    """{key: row} of the committed results file when it was measured with the same trade and world presets: rows
    a fresh machine need not train again. Each keeps the CPU it was measured on (`machine`)."""
    path = RESULTS_DIR / ("codec_trade_smoke.json" if args.scale == "smoke" else "codec_trade.json")
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("trade") != t or old.get("world_preset") != wp:
        return {}
    return {r["key"]: {"machine": old["machine"]["cpu"]} | r for r in old["rows"]}


def write_results(args, t: dict, wp: dict, run: Path, model: Path, entries: dict, timings: dict,
                  wall: float, committed: dict | None = None) -> None:
    """experiments/cifar10/results/codec_trade{,_smoke}.json: one row per entry, with bytes raw and compressed, and the
    `committed` rows (measured earlier) this run's results.json does not hold."""
    cpu = common.machine_info(args.device)["cpu"]
    rows = [r for k, r in (committed or {}).items() if k not in entries]
    for key, e in entries.items():
        if e.get("ipc") != t["ipc"] and not e["method"].startswith("random-real@"):
            continue
        d = e.get("distilled") or {}
        rows.append({
            "key": key, "method": e["method"], "protocol": e["protocol"], "ipc": e["ipc"],
            "codec": d.get("label_codec") or ("fp16" if e["protocol"] == "p1" else "none"),
            "candidates": d.get("candidates", 1), "rounds": d.get("rounds", 1), "epochs": e["epochs"],
            "seeds": len(e["seeds"]), "final_top1": e["final_top1"]["mean"], "final_top1_std": e["final_top1"]["std"],
            "best_top1": e["best_top1"]["mean"], "stored_bytes": e["stored_bytes"],
            "stored_bytes_compressed": e.get("stored_bytes_compressed"),
            "label_bytes": sum(v for k, v in e["stored_components"].items() if k.startswith("soft_labels")),
            "label_bytes_compressed": sum(v for k, v in (e.get("stored_compressed") or {}).items()
                                          if k.startswith("soft_labels")),
            "teacher_top1_on_images": d.get("teacher_top1_on_images"),
            "equal_bytes": d.get("equal_bytes"), "wall_time_s": round(e.get("wall_time_s") or 0.0, 1),
            "machine": cpu,
        })  # fmt: skip
    name = "codec_trade_smoke" if args.scale == "smoke" else "codec_trade"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"scale": args.scale, "trade": t, "world_preset": wp, "student": STUDENT, "run": str(run),
               "model": str(model), "compressor": "zlib level 9", "machine": common.machine_info(args.device),
               "wall_time_s": round(wall, 1), "timings_s": timings, "rows": sorted(rows, key=lambda r: r["key"])}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(payload, RESULTS_DIR / f"{name}_accuracy_vs_bytes.png")
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(markdown_section(payload, f"{name}_accuracy_vs_bytes.png")))
    log(f"wrote {RESULTS_DIR / (name + '.json')} ({len(rows)} rows), .md and _accuracy_vs_bytes.png")


# ------------------------------------------------------------------------------------------------------------
# the BENCHMARKS.md section (tools/write_benchmarks_md.py calls these): table, plot and a reading from the numbers


def _kb(n) -> str:
    return "-" if n is None else (f"{n / 1000:.1f} KB" if n >= 1000 else f"{n} B")


def _acc(r: dict | None) -> str:
    return "-" if r is None else f"{r['final_top1']:.2f} ± {r['final_top1_std']:.2f}"


def codec_rows(payload: dict) -> dict[str, dict[str, dict]]:
    """{codec: {method: row}} of the P1 codec part (d3m with fresh rounds, candidates 1)."""
    out: dict[str, dict[str, dict]] = {}
    for r in payload["rows"]:
        if r["protocol"] != "p1" or r["candidates"] != 1:
            continue
        out.setdefault(r["codec"], {})[r["method"]] = r
    order = [c.strip() for c in payload["trade"]["codecs"].split(",")]
    return {c: out[c] for c in order if c in out}


def selection_rows(payload: dict) -> list[dict]:
    rows = [r for r in payload["rows"] if r["method"] == "d3m" and r["codec"] in ("fp16", "none")]
    return sorted(rows, key=lambda r: (r["protocol"], r["candidates"]))


def plot(payload: dict, path: Path) -> None:
    """Final top-1 against stored bytes (log x): one line per method through its codecs, each point named."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    table = codec_rows(payload)
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=120)
    for method, marker in (("d3m", "o"), ("rded", "^"), ("random-real", "v"), ("random-real@d3m", "s")):
        pts = sorted(((c, rows[method]) for c, rows in table.items() if method in rows),
                     key=lambda cr: cr[1]["stored_bytes"])
        if not pts:
            continue
        ax.errorbar([r["stored_bytes"] for _, r in pts], [r["final_top1"] for _, r in pts],
                    yerr=[r["final_top1_std"] for _, r in pts], marker=marker, capsize=3, label=method)
        for codec, r in pts if method == "d3m" else []:  # real-image rows differ little in bytes: see the table
            ax.annotate(codec, (r["stored_bytes"], r["final_top1"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance (10%)")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes (log scale; prompts/images + seeds + every label tensor)")
    ax.set_ylabel("top-1 on the CIFAR-10 test split (%)")
    t = payload["trade"]
    ax.set_title(f"CIFAR-10 world, P1, IPC {t['ipc']}: label codecs\n{payload['student']}, {t['epochs']} epochs, "
                 f"{t['seeds']} seed(s), d3m with {t['rounds']} rounds", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reading(payload: dict) -> list[str]:
    """What the numbers say: the codec to use at each budget, d3m's lead at equal bytes, what selection buys."""
    table = codec_rows(payload)
    d3m = {c: rows["d3m"] for c, rows in table.items() if "d3m" in rows}
    out = []
    if d3m:
        frontier, best = [], -1.0  # codecs no other codec beats with fewer bytes
        for codec, r in sorted(d3m.items(), key=lambda cr: cr[1]["stored_bytes"]):
            if r["final_top1"] > best:
                frontier.append((codec, r))
                best = r["final_top1"]
        ref = d3m.get("fp16")
        steps = []
        for codec, r in frontier:
            kept = f", {100 * r['final_top1'] / ref['final_top1']:.0f}% of fp16's accuracy" if ref else ""
            steps.append(f"{codec} ({_kb(r['stored_bytes'])}, {_kb(r['stored_bytes_compressed'])} compressed: "
                         f"{r['final_top1']:.1f}%{kept})")
        out.append("Codecs no other codec beats with fewer stored bytes (d3m, P1), smallest budget first: "
                   + "; ".join(steps) + ". At a given budget the recommendation is the last of these that fits; "
                   "a codec not listed is beaten by a smaller one.")
        if ref:
            ratios = []
            for c, r in d3m.items():
                if c != "fp16" and r["label_bytes"]:
                    raw = ref["label_bytes"] / r["label_bytes"]
                    packed = ref["label_bytes_compressed"] / max(r["label_bytes_compressed"], 1)
                    ratios.append(f"{c} {raw:.1f}x ({packed:.1f}x compressed)")
            out.append("Label bytes against fp16, array bytes (and after zlib, the honest ratio): " + ", ".join(ratios)
                       + ".")
    leads = {c: rows["d3m"]["final_top1"] - rows["random-real@d3m"]["final_top1"] for c, rows in table.items()
             if "d3m" in rows and "random-real@d3m" in rows}
    if leads:
        text = ", ".join(f"{c} {v:+.1f} points (random-real at IPC {table[c]['random-real@d3m']['ipc']})"
                         for c, v in leads.items())
        small = min(leads, key=lambda c: table[c]["d3m"]["stored_bytes"])
        if "fp16" in leads and small != "fp16":
            change = leads[small] - leads["fp16"]
            trend = f"grows by {change:.1f} points" if change > 0 else f"does not grow ({change:+.1f} points)"
            text += f". From fp16 to the smallest codec ({small}) d3m's lead at equal bytes {trend}"
        out.append(f"d3m minus random-real at d3m's stored bytes, per codec: {text}.")
    sel = selection_rows(payload)
    gains = []
    for proto in ("p1", "p2"):
        mine = {r["candidates"]: r for r in sel if r["protocol"] == proto}
        if 1 in mine and len(mine) > 1:
            g = max(mine)
            a, b = mine[1], mine[g]
            noise = max(a["final_top1_std"], b["final_top1_std"])
            if min(a["seeds"], b["seeds"]) < 2:
                verdict = "one seed: no spread to compare with"
            else:
                verdict = ("more than" if abs(b["final_top1"] - a["final_top1"]) > noise else "within") + \
                    " the seed spread"
            teach = ""
            if a.get("teacher_top1_on_images") is not None and b.get("teacher_top1_on_images") is not None:
                teach = (f"; the teacher's top-1 on the stored images {a['teacher_top1_on_images']:.1f}% -> "
                         f"{b['teacher_top1_on_images']:.1f}%")
            out.append(f"Seed selection under {proto.upper()}: G = 1 -> {g}: {a['final_top1']:.1f}% -> "
                       f"{b['final_top1']:.1f}% ({verdict}){teach}, at the same stored bytes.")
            gains.append(verdict.startswith("more") and b["final_top1"] > a["final_top1"])
    if gains:
        from promptset.backends.selection import AUTO_CANDIDATES as G

        at = {r["protocol"]: r for r in sel if r["candidates"] == G}
        at_g = ", ".join(f"{p.upper()} {at[p]['final_top1']:.1f}%" for p in ("p1", "p2") if p in at)
        out.append(("So seed selection pays in every protocol measured, for G times the generation time: "
                    if all(gains) else "So seed selection does not pay beyond the seed spread everywhere, yet ")
                   + f"promptset's default is G = {G} wherever a teacher scores" + (f" ({at_g} here)" if at_g else "")
                   + "; `--candidates 1` gives the paper's D3M, as the CIFAR-10 table uses.")
    return out


def _cpu(payload: dict, row: dict) -> str:
    return row.get("machine") or payload["machine"].get("cpu")


def markdown_section(payload: dict, plot_name: str) -> list[str]:
    t, wp = payload["trade"], payload["world_preset"]
    smoke = " **(smoke scale: a check that every row runs, not a measurement)**" if payload["scale"] == "smoke" else ""
    lines = [
        "## CIFAR-10: label codecs and seed selection (accuracy against stored bytes)" + smoke,
        "",
        f"Command: `python experiments/cifar10/codec_trade.py --scale {payload['scale']}` "
        f"(the rows took {sum(r.get('wall_time_s') or 0 for r in payload['rows']) / 3600:.1f} h of wall time in all, "
        f"one thread each, device {payload['machine'].get('device')}; rows per CPU: "
        + ", ".join(f"{cpu} {n}" for cpu, n in sorted(Counter(_cpu(payload, r) for r in payload["rows"]).items()))
        + "; d3m's on " + " and ".join(sorted({_cpu(payload, r) for r in payload["rows"] if r["method"] == "d3m"}))
        + "). The CIFAR-10 world's run "
        f"(`cifar10_world.py --scale {t['world']}`: {wp['distill_per_class']} distilled images per class, "
        f"{wp['invert_steps']} inversion steps), IPC {t['ipc']}, P1 with {t['rounds']} rounds of fresh d3m images, "
        f"{payload['student']}, {t['epochs']} epochs, {t['seeds']} seed(s). Stored bytes count every tensor a "
        "student needs (prompts or images, seeds, every label tensor: values, indices, fill values, scales, "
        f"codebooks); 'compressed' is the same bytes after {payload['compressor']}.",
        "",
        "| codec | d3m top-1 | d3m stored (compressed) | labels | rded top-1 | random-real top-1 (stored) | "
        "random-real at d3m's bytes: IPC, top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for codec, rows in codec_rows(payload).items():
        d, rd, rr, eq = (rows.get(m) for m in ("d3m", "rded", "random-real", "random-real@d3m"))
        lines.append(
            f"| {codec} | {_acc(d)} | {_kb(d and d['stored_bytes'])} ({_kb(d and d['stored_bytes_compressed'])}) | "
            f"{_kb(d and d['label_bytes'])} | {_acc(rd)} | {_acc(rr)} ({_kb(rr and rr['stored_bytes'])}) | "
            f"{'-' if eq is None else str(eq['ipc']) + ', ' + _acc(eq)} |")
    missing = [f"{m} with {c}" for c, rows in codec_rows(payload).items()
               for m in ("d3m", "rded", "random-real", "random-real@d3m") if m not in rows]  # fmt: skip
    if missing:
        lines += ["", f"**Not measured yet** (shown as -; the same command resumes them): {', '.join(missing)}."]
    lines += ["", f"![accuracy vs stored bytes per codec](experiments/cifar10/results/{plot_name})", ""]
    sel = selection_rows(payload)
    if sel:
        lines += ["Seed selection (d3m, fp16 labels under P1): G candidates per stored image, the teacher keeps the "
                  "lowest cross-entropy; only the chosen seed is stored.", "",
                  "| protocol | G | top-1 | teacher top-1 on the stored images | stored |",
                  "|---|---:|---:|---:|---:|"]
        for r in sel:
            teach = "-" if r.get("teacher_top1_on_images") is None else f"{r['teacher_top1_on_images']:.1f}%"
            lines.append(f"| {r['protocol'].upper()} | {r['candidates']} | {_acc(r)} | {teach} | "
                         f"{_kb(r['stored_bytes'])} |")
        lines.append("")
    lines += [f"- {x}" for x in reading(payload)] + [""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
