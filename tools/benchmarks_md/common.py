"""What the BENCHMARKS.md sections share: where the results are, loading them, the machine line, a table."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"  # the speed benchmarks' results
STUDY = ROOT / "experiments" / "cifar10"  # the CIFAR-10 world study: its scripts, models and results
STUDY_RESULTS = STUDY / "results"


def _load(name: str, folder: Path = RESULTS) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(m: dict) -> str:
    load = m.get("loadavg_1min_at_start")
    load_text = f", 1-min load average {load:.1f} at start (shared machine)" if load is not None else ""
    return (
        f"{m.get('device_name', m.get('cpu'))}, {m.get('cores')} cores, {m.get('torch_threads')} torch thread(s), "
        f"torch {m.get('torch')}, diffusers {m.get('diffusers')}, transformers {m.get('transformers')}{load_text}"
    )


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key in columns:
            v = r.get(key)
            cells.append(f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return out
