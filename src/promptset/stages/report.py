"""`promptset report`: a Markdown table, a CSV and an accuracy-versus-stored-bytes plot (log x) of evaluated runs.

Reads `<run>/eval/results.json` of every run given; each row is one method/protocol/student/IPC entry (the
rendering lives in `evaluation.results`, which `evaluate` also calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import make_config, opt
from ..errors import UserError
from ..evaluation.results import DEFAULT_TITLE, write_report


@dataclass
class ReportConfig:
    runs: str = opt("", "comma-separated run folders whose eval/results.json to summarise")
    out: str = opt("", "output folder for report.md, report.csv, accuracy_vs_bytes.png (default: <first run>/eval)")
    title: str = opt(DEFAULT_TITLE, "title of the table and the plot")


def report(cfg: ReportConfig | None = None, **overrides) -> Path:
    """Write report.md, report.csv and accuracy_vs_bytes.png for the runs' evaluations; returns report.md's path."""
    cfg = make_config(ReportConfig, cfg, overrides, "report")
    runs = [Path(r.strip()) for r in cfg.runs.split(",") if r.strip()]
    if not runs:
        raise UserError("--runs is required: one or more run folders, comma-separated")
    return write_report(runs, Path(cfg.out) if cfg.out else runs[0] / "eval", cfg.title)
