"""`promptset demo --quick`: every stage of the built-in demo runs offline and writes its results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "promptset", "demo", "--quick", "--out", "demo", "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,  # a relative --out: demo.json must still name its files wherever it is read from
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["timings_s"]) >= {"data", "teacher", "select", "invert", "generate", "evaluate P1",
                                         "evaluate P2", "total"}
    assert summary["reading"].startswith("reading: under P1")
    assert summary["results"] == str((out / "run" / "eval" / "results.json").resolve())
    results = json.loads((out / "run" / "eval" / "results.json").read_text())
    rows = {(e["method"], e["protocol"]) for e in results["entries"].values()}
    assert rows == {("d3m", "p1"), ("rded", "p1"), ("random-real", "p1"), ("random-real@d3m", "p1"), ("d3m", "p2"),
                    ("random-real", "p2")}
    d3m = next(e for e in results["entries"].values() if e["method"] == "d3m" and e["protocol"] == "p1")
    assert d3m["distilled"]["rounds"] == 3 and "soft_labels" in d3m["stored_components"]  # every round's labels
    for entry in results["entries"].values():
        assert 0.0 <= entry["final_top1"]["mean"] <= 100.0
        assert entry["stored_bytes"] > 0
    assert (out / "run" / "prompts.safetensors").is_file()
    from PIL import Image

    assert Image.open(out / "run" / "grid.png").width >= 256  # enlarged 8 px digits, class names on the rows
    assert (out / "generator" / "pretrain.json").is_file()
    assert "demo finished" in proc.stdout and "reading: under P1" in proc.stdout
    assert "\r" not in proc.stderr  # not a terminal: progress as whole lines
