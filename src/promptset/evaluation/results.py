"""What evaluate writes and report reads: `results.json` entries, the printed table, and the report files
(report.md, report.csv, accuracy_vs_bytes.png). Reads and writes files only; trains nothing.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import platform
from pathlib import Path

import numpy as np

from .. import __version__
from ..accounting import COMPRESSOR, fmt_bytes
from ..atomic import atomic_path, write_text
from ..config import to_dict
from ..devices import device_name
from ..errors import UserError
from .coverage import read_result as read_coverage
from .coverage import report_section

GENERATIVE = ("d3m", "class-prompt")  # methods whose images come from the generator
RESULTS_FORMAT = "promptset.eval"
RESULTS_VERSION = 1
DEFAULT_TITLE = "promptset: accuracy versus stored bytes"


def entry_key(method: str, protocol: str, student: str, ipc: int | None, regen_every: int) -> str:
    """results.json key: method/protocol/student/ipc, plus the variation schedule for generated methods."""
    key = f"{method}/{protocol}/{student}/ipc{'all' if ipc is None else ipc}"
    if method in GENERATIVE:
        key += f"/regen{regen_every}" if regen_every else "/fixed"
    return key


def variant_key(cfg, method: str) -> str:
    """The key suffix of what sets one entry of a method apart beyond entry_key: a P1 label codec other than fp16
    (`/topk3`), and for generated sets seed selection (`/best-of-4`, `/diverse0.1`), a guidance interval
    (`/gi0.2-0.8`), CADS (`/cads0.6-0.9-0.25-1`) and described prompts (`/described`). Empty for the defaults."""
    parts = []
    codec = str(getattr(cfg, "label_codec", "fp16")).strip().lower()
    if cfg.protocol == "p1" and codec != "fp16":
        parts.append(codec.replace(":", ""))
    candidates = int(getattr(cfg, "candidates", 1) or 1)
    if candidates > 1 and method.partition("@")[0] in GENERATIVE:
        parts.append(f"best-of-{candidates}")
    on = _diversity(cfg, method)
    parts += [f"{k}{on[k].replace(',', '-')}" for k in ("gi", "cads") if k in on]
    parts += [on["selection"].replace(":", "")] if "selection" in on else []
    parts += ["described"] if "describe" in on else []
    if _mixed_rounds(cfg, method):
        parts.append("mixed")
    return "".join(f"/{p}" for p in parts)


def _mixed_rounds(cfg, method: str) -> bool:
    """Fresh rounds trained in the mixed order (`--round-order mixed`). Keyed although it is the default: entries of
    the sequential order (the only one before) keep their keys."""
    return (method.partition("@")[0] in GENERATIVE and int(getattr(cfg, "regen_every", 0) or 0) > 0
            and getattr(cfg, "round_order", "sequential") == "mixed")  # fmt: skip


def _diversity(cfg, method: str) -> dict[str, str]:
    """evaluate's --guidance-interval (`gi`), --cads and --selection that are on, as their resolved canonical text;
    none for a method that generates nothing."""
    if method.partition("@")[0] not in GENERATIVE:
        return {}
    texts = {"gi": getattr(cfg, "guidance_interval", ""), "cads": getattr(cfg, "cads", ""),
             "selection": getattr(cfg, "selection", ""), "describe": getattr(cfg, "describe", "")}
    return {k: str(v) for k, v in texts.items() if v not in ("", None, "typical", "off")}


def variant_label(cfg, method: str) -> str:
    """`variant_key` for people: 'topk:3', 'best of 4', 'topk:3, best of 4, diverse:0.1' ('' for the defaults)."""
    parts = []
    codec = str(getattr(cfg, "label_codec", "fp16")).strip().lower()
    if cfg.protocol == "p1" and codec != "fp16":
        parts.append(codec)
    candidates = int(getattr(cfg, "candidates", 1) or 1)
    if candidates > 1 and method.partition("@")[0] in GENERATIVE:
        parts.append(f"best of {candidates}")
    on = _diversity(cfg, method)
    parts += [f"{name}{on[k]}" for k, name in (("gi", "guidance interval "), ("cads", "CADS "), ("selection", ""),
                                               ("describe", "described "))
              if k in on]
    if _mixed_rounds(cfg, method):
        parts.append("rounds mixed")
    return ", ".join(parts)


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); move it away to start a new results file") from None
    if data.get("format") != RESULTS_FORMAT or not isinstance(data.get("entries"), dict):
        raise UserError(f"{path} is not a promptset results file; move it away to start a new one")
    return data


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "promptset": __version__}
    for pkg in ("torch", "diffusers", "transformers", "timm", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "per_seed": [float(v) for v in values]}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make_entry(ctx, method: str, key: str, data, runs: list[dict], *, png: int | None, per_image: int,
               split_hash: dict, recipe, wall: float) -> dict:
    """One results.json entry: the mean and std over seeds, stored bytes, the recipe, versions and hashes."""
    cfg = ctx.cfg
    recipe_dict = dict(recipe.__dict__)
    recipe_dict.update(
        {
            "batch_size": runs[0]["batch_size"],
            "steps_per_epoch": runs[0]["steps_per_epoch"],
            "world_size": runs[0]["world_size"],  # processes (torchrun); batch_size is the global batch
            "sync_batchnorm": runs[0]["sync_batchnorm"],
            "loss": {
                "one-hot": "cross-entropy",
                "stored-soft": "KL(teacher_T || student_T), batchmean",
                "online-teacher": "KL(teacher_T || student_T), batchmean",
            }[recipe.targets],
            "config": to_dict(cfg),
        }
    )
    teacher = None
    if ctx.teacher is not None:
        teacher = {"spec": ctx.teacher.spec, "sha256": ctx.teacher.weights_sha256}
    return {
        "key": key,
        "method": method,
        "protocol": cfg.protocol,
        "student": cfg.student,
        "ipc": data.ipc,
        "num_classes": len(ctx.classes),
        "image_size": ctx.image_size,
        "train_samples": len(data.rounds[0]),
        "epochs": cfg.epochs,
        "seeds": [r["seed"] for r in runs],
        "final_top1": mean_std([r["final_top1"] for r in runs]),
        "best_top1": {**mean_std([r["best_top1"] for r in runs]), "best_epoch": [r["best_epoch"] for r in runs]},
        "optimizer_steps": runs[0]["optimizer_steps"],
        "stored_bytes": data.stored_bytes,
        "stored_components": data.components,
        "compressor": COMPRESSOR,
        "stored_bytes_compressed": sum(data.compressed.values()) if data.compressed else None,
        "stored_compressed": data.compressed,
        "variant": variant_label(cfg, method),
        "png_bytes": png,
        "ipc_equivalent": data.stored_bytes / per_image,
        "not_counted": {
            "generator": ctx.gen.get("model") if method in GENERATIVE else None,
            "teacher": teacher["spec"] if teacher and recipe.targets != "one-hot" else None,
        },
        "distilled": data.info,
        "teacher": teacher,
        "recipe": recipe_dict,
        "split_hash": split_hash,
        "versions": versions(),
        "device": device_name(ctx.device),
        "wall_time_s": wall,
        "finished_at": now(),
    }


def print_table(entries: list[dict]) -> None:
    header = (
        f"{'method':<13} {'protocol':<8} {'IPC':>4} {'stored':>10} {'IPC-eq':>8} "
        f"{'final top-1':>14} {'best top-1':>14}"
    )
    print(header)
    print("-" * len(header))
    for e in entries:
        f, b = e["final_top1"], e["best_top1"]
        ipc = "all" if e["ipc"] is None else str(e["ipc"])
        print(
            f"{e['method']:<13} {e['protocol']:<8} {ipc:>4} {fmt_bytes(e['stored_bytes']):>10} "
            f"{e['ipc_equivalent']:>8.3f} {f['mean']:>7.2f} ± {f['std']:<5.2f} {b['mean']:>7.2f} ± {b['std']:<5.2f}"
        )


# ------------------------------------------------------------------------------------------------------------
# the report: one flat row per entry of every run

COLUMNS = [
    "run",
    "method",
    "protocol",
    "student",
    "ipc",
    "variations",
    "epochs",
    "seeds",
    "final_top1_mean",
    "final_top1_std",
    "best_top1_mean",
    "best_top1_std",
    "stored_bytes",
    "ipc_equivalent",
    "png_bytes",
    "key",
]


def modes_label(distilled: dict) -> str:
    """'3 modes, 30 prompts' for a d3m set learned with modes ('' for one prompt per class)."""
    modes = distilled.get("modes")
    if not modes:
        return ""
    low, high = min(modes["per_class"]), max(modes["per_class"])
    return f"{high if low == high else f'{low}-{high}'} modes, {modes['prompts']} prompts"


def base_method(label: str) -> str:
    """'random-real' of a row label such as 'random-real@d3m' or 'd3m [topk:3]'."""
    return label.partition(" [")[0].partition("@")[0]


def load_rows(runs: list[Path]) -> list[dict]:
    """One flat row per results.json entry of every run, sorted by protocol, student, method and IPC."""
    rows = []
    for run in runs:
        path = run / "eval" / "results.json"
        if not path.is_file():
            raise UserError(f"{path} not found: run `promptset evaluate --run {run} ...` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err})") from None
        for key, e in (data.get("entries") or {}).items():
            distilled = e.get("distilled") or {}
            rounds = distilled.get("rounds")
            variations = "-" if rounds is None else ("fixed" if rounds == 1 else f"{rounds} rounds")
            variant = ", ".join(x for x in (modes_label(distilled), e.get("variant")) if x)
            rows.append(
                {
                    "run": run.name or str(run),
                    "method": e["method"] + (f" [{variant}]" if variant else ""),
                    "protocol": e["protocol"],
                    "student": e["student"],
                    "ipc": e["ipc"],
                    "variations": variations,
                    "epochs": e.get("epochs"),
                    "seeds": len(e.get("seeds") or []),
                    "final_top1_mean": e["final_top1"]["mean"],
                    "final_top1_std": e["final_top1"]["std"],
                    "best_top1_mean": e["best_top1"]["mean"],
                    "best_top1_std": e["best_top1"]["std"],
                    "stored_bytes": e["stored_bytes"],
                    "ipc_equivalent": e["ipc_equivalent"],
                    "png_bytes": e.get("png_bytes"),
                    "key": key,
                    "num_classes": e.get("num_classes"),
                }
            )
    order = {"d3m": 0, "class-prompt": 1, "rded": 2, "random-real": 3, "full": 4}
    rows.sort(key=lambda r: (r["protocol"], r["student"], r["run"], order.get(base_method(r["method"]), 9),
                             r["method"], r["ipc"] or 10**9))
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "Top-1 accuracy (%) on the real test split, mean ± std over seeds. Stored bytes count what must be "
        "kept to retrain the student (prompts, seeds, soft labels, class list; or the images as raw uint8); "
        "generator and teacher weights are not counted. IPC-equivalent = stored bytes / (C·H·W·3).",
        "",
        "| run | method | protocol | student | IPC | variations | final top-1 | best top-1 | stored | IPC-equiv. |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ipc = "all" if r["ipc"] is None else r["ipc"]
        lines.append(
            f"| {r['run']} | {r['method']} | {r['protocol']} | {r['student']} | {ipc} | {r['variations']} "
            f"| {r['final_top1_mean']:.2f} ± {r['final_top1_std']:.2f} "
            f"| {r['best_top1_mean']:.2f} ± {r['best_top1_std']:.2f} "
            f"| {fmt_bytes(r['stored_bytes'])} | {r['ipc_equivalent']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def recipe_line(rows: list[dict]) -> str:
    """What the numbers were measured under: protocols, students, epochs and seeds of the rows."""

    def values(name: str, fmt=str) -> str:
        return "/".join(fmt(v) for v in dict.fromkeys(r[name] for r in rows if r.get(name) is not None))

    return (f"protocol {values('protocol', str.upper)}, student {values('student')}, {values('epochs')} epochs, "
            f"{values('seeds')} seed(s)")


def plot_series(rows: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """(label, method, variations, rows sorted by bytes) per line of the plot: one per method and protocol, and
    one per kind of generated set (a fixed set, R rounds of fresh images) where a method has several."""
    protocols = sorted({r["protocol"] for r in rows})
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        for proto in protocols:
            kinds = list(dict.fromkeys(r["variations"] for r in pts if r["protocol"] == proto))
            for kind in kinds:
                mine = sorted((r for r in pts if r["protocol"] == proto and r["variations"] == kind),
                              key=lambda r: r["stored_bytes"])  # fmt: skip
                label = method if len(protocols) == 1 else f"{method} ({proto})"
                out.append((f"{label}, {kind}" if len(kinds) > 1 else label, method, kind, mine))
    return out


LABEL_PAD = 4.0  # points between a point and its IPC label


def place_labels(anchors: list[tuple[float, float]], sizes: list[tuple[float, float]],
                 pad: float = LABEL_PAD, gap: float = 1.0) -> list[tuple[float, float]]:
    """Offsets (dx, dy) of each label's lower-left corner from its point, in the units of `anchors` and `sizes`
    (display pixels), so that no two label boxes overlap: up and right of its point by `pad`, or where that meets
    a label placed before it, stacked above it, or below the point, in steps of its height plus `gap` (the nearest
    free place first, above before below). Labels are placed in the order given."""
    placed: list[tuple[float, float, float, float]] = []  # (x0, y0, x1, y1)
    offsets = []
    for (x, y), (w, h) in zip(anchors, sizes):
        step = h + gap
        tries = [pad + k * step for k in range(2 * len(placed) + 2)]  # above: enough that one is free
        tries = [dy for k, up in enumerate(tries) for dy in (up, -pad - h - k * step)]
        for dy in tries:
            box = (x + pad, y + dy, x + pad + w, y + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        offsets.append((pad, dy))
    return offsets


def plot_figure(rows: list[dict], title: str):
    """The figure of `plot`: final top-1 against stored bytes (log x), one line per `plot_series`, each point
    labelled with its IPC in its line's colour (labels of points that share a place are stacked, never on top of
    each other), the chance level as a line, and the recipe (protocol, student, epochs, seeds) under the title."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    markers = {"d3m": "o", "class-prompt": "s", "rded": "^", "random-real": "v", "full": "*"}
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    ax.set_prop_cycle(color=list(plt.get_cmap("tab20").colors))  # more series than tab10's ten colours
    labels = []
    for label, method, kind, mine in plot_series(rows):
        drawn = ax.errorbar(
            [r["stored_bytes"] for r in mine],
            [r["final_top1_mean"] for r in mine],
            yerr=[r["final_top1_std"] for r in mine],
            marker=markers.get(base_method(method), "D"),
            capsize=3,
            linestyle=("--" if kind == "fixed" else "-") if len(mine) > 1 else "none",
            label=label,
        )
        for r in mine:
            labels.append(ax.annotate(
                f"IPC {'all' if r['ipc'] is None else r['ipc']}",
                (r["stored_bytes"], r["final_top1_mean"]),
                textcoords="offset points",
                xytext=(LABEL_PAD, LABEL_PAD),
                fontsize=7,
                color=drawn.lines[0].get_color(),
                ha="left",
                va="bottom",
            ))  # fmt: skip
    classes = {r["num_classes"] for r in rows if r.get("num_classes")}
    if len(classes) == 1:
        chance = 100.0 / classes.pop()
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.0f}%)")
    ax.set_xscale("log")
    lo, hi = min(r["stored_bytes"] for r in rows), max(r["stored_bytes"] for r in rows)
    ax.set_xlim(lo / 2, hi * 4)  # room for the IPC labels right of the last point
    ax.set_ylim(bottom=0, top=min(100, max(r["final_top1_mean"] + r["final_top1_std"] for r in rows) + 8))
    ax.set_xlabel("stored bytes (log scale)")
    ax.set_ylabel("top-1 accuracy on the real test split (%)")
    ax.set_title(f"{title}\n{recipe_line(rows)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    # the labels' places, once the layout is final: measured in display pixels, offsets given in points
    renderer = fig.canvas.get_renderer()
    anchors = [tuple(ax.transData.transform(a.xy)) for a in labels]
    sizes = [(b.width, b.height) for b in (a.get_window_extent(renderer) for a in labels)]
    for a, (dx, dy) in zip(labels, place_labels(anchors, sizes, pad=LABEL_PAD * fig.dpi / 72)):
        a.xyann = (dx * 72 / fig.dpi, dy * 72 / fig.dpi)
    return fig


def plot(rows: list[dict], path: Path, title: str) -> None:
    """`plot_figure` of the rows, written to `path` as PNG."""
    fig = plot_figure(rows, title)
    import matplotlib.pyplot as plt  # after plot_figure chose the Agg backend

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def coverage_sections(runs: list[Path]) -> str:
    """report.md's coverage tables: the overall rows of each run's `coverage.json` (from `promptset coverage`)."""
    text = ""
    for run in runs:
        result, problem = read_coverage(run / "coverage.json")
        if problem:
            print(f"report: no coverage table for {run}: {problem}", flush=True)
        elif result is not None:
            text += report_section(result, str(run / "coverage.json"))
    return text


def write_report(runs: list[Path], out: Path, title: str = DEFAULT_TITLE) -> Path:
    """Write report.md, report.csv and accuracy_vs_bytes.png of the runs' evaluations into `out`; returns report.md."""
    rows = load_rows(runs)
    if not rows:
        raise UserError(f"no evaluated entries in {', '.join(str(r / 'eval' / 'results.json') for r in runs)}")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", markdown(rows, title) + coverage_sections(runs))
    write_text(out / "report.csv", to_csv(rows))
    plot(rows, out / "accuracy_vs_bytes.png", title)
    print(f"report: {len(rows)} rows -> {out / 'report.md'}, {out / 'report.csv'}, {out / 'accuracy_vs_bytes.png'}")
    return out / "report.md"
