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
        [sys.executable, "-m", "promptset", "demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["timings_s"]) >= {"data", "select", "invert", "generate", "evaluate", "total"}
    results = json.loads((out / "run" / "eval" / "results.json").read_text())
    methods = {e["method"] for e in results["entries"].values()}
    assert methods == {"d3m", "random-real", "class-prompt"}
    for entry in results["entries"].values():
        assert 0.0 <= entry["final_top1"]["mean"] <= 100.0
        assert entry["stored_bytes"] > 0
    assert (out / "run" / "prompts.safetensors").is_file()
    assert (out / "run" / "grid.png").is_file()
    assert (out / "generator" / "pretrain.json").is_file()
    assert "demo finished" in proc.stdout
