"""Summaries of evaluated runs: a Markdown table, a CSV and an accuracy-versus-stored-bytes plot (log x).

Reads `<run>/eval/results.json` of every run given; each row is one method/protocol/student/IPC entry.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path, write_text
from .config import opt
from .errors import UserError

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


@dataclass
class ReportConfig:
    runs: str = opt("", "comma-separated run folders whose eval/results.json to summarise")
    out: str = opt("", "output folder for report.md, report.csv, accuracy_vs_bytes.png (default: <first run>/eval)")
    title: str = opt("promptset: accuracy versus stored bytes", "title of the table and the plot")


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
            rows.append(
                {
                    "run": run.name or str(run),
                    "method": e["method"],
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
                }
            )
    order = {"d3m": 0, "class-prompt": 1, "rded": 2, "random-real": 3, "full": 4}
    rows.sort(key=lambda r: (r["protocol"], r["student"], r["run"], order.get(r["method"], 9), r["ipc"] or 10**9))
    return rows


def _bytes(n: float | None) -> str:
    from .evaluate import fmt_bytes

    return "-" if n is None else fmt_bytes(n)


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
            f"| {_bytes(r['stored_bytes'])} | {r['ipc_equivalent']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Final top-1 against stored bytes (log x): one marker series per method, each point annotated with its IPC."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    markers = {"d3m": "o", "class-prompt": "s", "rded": "^", "random-real": "v", "full": "*"}
    protocols = sorted({r["protocol"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        for proto in protocols:
            mine = sorted((r for r in pts if r["protocol"] == proto), key=lambda r: r["stored_bytes"])
            if not mine:
                continue
            label = method if len(protocols) == 1 else f"{method} ({proto})"
            ax.errorbar(
                [r["stored_bytes"] for r in mine],
                [r["final_top1_mean"] for r in mine],
                yerr=[r["final_top1_std"] for r in mine],
                marker=markers.get(method, "D"),
                capsize=3,
                linestyle="-" if len(mine) > 1 else "none",
                label=label,
            )
            for r in mine:
                ax.annotate(
                    f"IPC {'all' if r['ipc'] is None else r['ipc']}",
                    (r["stored_bytes"], r["final_top1_mean"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes (log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def report(cfg: ReportConfig | None = None, **overrides) -> Path:
    """Write report.md, report.csv and accuracy_vs_bytes.png for the runs' evaluations; returns report.md's path."""
    cfg = cfg or ReportConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise UserError(f"report: unknown option {k!r}")
        setattr(cfg, k, v)
    runs = [Path(r.strip()) for r in cfg.runs.split(",") if r.strip()]
    if not runs:
        raise UserError("--runs is required: one or more run folders, comma-separated")
    rows = load_rows(runs)
    if not rows:
        raise UserError(f"no evaluated entries in {', '.join(str(r / 'eval' / 'results.json') for r in runs)}")
    out = Path(cfg.out) if cfg.out else runs[0] / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", markdown(rows, cfg.title))
    write_text(out / "report.csv", to_csv(rows))
    plot(rows, out / "accuracy_vs_bytes.png", cfg.title)
    print(f"report: {len(rows)} rows -> {out / 'report.md'}, {out / 'report.csv'}, {out / 'accuracy_vs_bytes.png'}")
    return out / "report.md"
