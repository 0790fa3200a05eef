"""benchmarks/gpu_check.py: the CPU smoke run writes every row kind, BENCHMARKS.md renders it
(tools/write_benchmarks_md.py), wheels install."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TOOLS = REPO / "tools"


def _bench_module(name: str, folder: Path = BENCH):
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def quick_json(tiny_sd, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--quick", "--threads", "1", "--model", str(tiny_sd),
         "--budget", "600", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


def _finite(row: dict, *keys: str) -> None:
    for key in keys:
        value = row.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value), (row["name"], key, value)


@pytest.mark.slow
def test_quick_run_writes_every_row_kind_with_finite_numbers(quick_json):
    res = quick_json
    assert res["gpu"] is None and res["quick"] is True  # says that no GPU was used
    assert res["finished"] is True
    rows = res["rows"]
    assert all(r["status"] == "ok" for r in rows), [(r["name"], r["status"], r.get("reason")) for r in rows]
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    assert set(by_kind) == {"invert", "fp16_gradient", "generate", "vae", "student"}
    names = {r["name"] for r in by_kind["invert"]}
    assert names == {
        "invert bf16 batch 8", "invert bf16 batch 8 +gradient checkpointing", "invert bf16 batch 16",
        "invert bf16 batch 32", "invert fp32 no-TF32 batch 8", "invert fp32 TF32 batch 8", "invert fp16 batch 8",
    }  # fmt: skip
    for r in by_kind["invert"]:
        _finite(r, "step_s", "samples_per_s", "flops_per_step", "achieved_tflops", "peak_rss_gib", "final_loss")
        assert r["flops_per_step"] > 0
    (grad,) = by_kind["fp16_gradient"]
    for key in ("bf16", "fp16", "fp16_scaled"):
        _finite(grad, f"{key}_vector_grad_rel_err", f"{key}_vector_grad_cosine", f"{key}_state_grad_zero_fraction")
    gens = {r["name"]: r for r in by_kind["generate"]}
    assert set(gens) == {"generate bf16 sampler batch 8", "generate bf16 sampler batch 32",
                         "generate bf16 sampler batch 8 --compile"}  # fmt: skip
    for r in gens.values():
        _finite(r, "images_per_s", "batch_s")
        assert r["images_finite"] is True
    _finite(gens["generate bf16 sampler batch 8 --compile"], "compile_s")
    assert len(by_kind["vae"]) == 2
    for r in by_kind["vae"]:
        _finite(r, "encode_s", "decode_s", "encode_peak_gib", "decode_peak_gib")
    assert len(by_kind["student"]) == 8
    assert {(r["student"], r["amp"], r["channels_last"]) for r in by_kind["student"]} == {
        (s, a, c) for s in ("convnet3", "resnet18") for a in (False, True) for c in (False, True)
    }
    for r in by_kind["student"]:
        _finite(r, "samples_per_s", "train_s")


@pytest.mark.slow
def test_benchmarks_md_renders_the_gpu_check_json(quick_json):
    wbm = _bench_module("write_benchmarks_md", TOOLS)
    text = "\n".join(wbm.gpu_section(quick_json))
    assert "No GPU: a CPU smoke run" in text
    for name in ("invert fp32 no-TF32 batch 8", "generate bf16 sampler batch 32", "student resnet18 amp"):
        assert f"| {name} |" in text
    assert "fp16, loss x 65536" in text and "Step time relative to bf16 at batch 8" in text
    as_gpu = dict(quick_json, gpu={"name": "NVIDIA H200", "capability": [9, 0], "total_memory_bytes": 150e9,
                                   "cuda": "13.0"})  # fmt: skip
    assert "On **NVIDIA H200** (compute capability 9.0" in "\n".join(wbm.gpu_section(as_gpu))
    missing = "\n".join(wbm.gpu_section(None))
    assert "Not run on a GPU yet" in missing and wbm.GPU_CHECK_COMMAND in missing


def _wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel holding `module` (VALUE = 42)."""
    path = folder / f"{dist}-0.1-py3-none-any.whl"
    info = f"{dist}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_install_offline_only_what_is_missing(tmp_path, monkeypatch):
    gpu_check = _bench_module("gpu_check")
    _wheel(tmp_path, "psfake_dist", "psfake_mod")
    monkeypatch.setattr(gpu_check, "WHEELS", {"psfake_mod": "psfake_dist", "json": "not-installed-anywhere"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    with pytest.raises(SystemExit, match="psfake_dist"):
        gpu_check.bootstrap("")  # missing and no --wheels: says what to pass
    info = gpu_check.bootstrap(str(tmp_path))
    assert info["installed"] == ["psfake_dist"]  # json is there already: not asked of pip (it has no wheel)
    assert sys.path[-1] == info["target"]  # after site-packages: what the machine has wins
    import psfake_mod

    assert psfake_mod.VALUE == 42
    sys.modules.pop("psfake_mod")


def test_rows_are_skipped_stopped_or_recorded_failed_within_their_budget(tmp_path):
    import argparse
    import time

    gpu_check = _bench_module("gpu_check")
    args = argparse.Namespace(budget=1e6, only="")
    path = tmp_path / "gpu_check.json"
    check = gpu_check.Check(args, path, {"rows": []})
    check.row("invert", "fits", lambda: {"step_s": 0.5}, est_s=1, cap_s=5)
    check.row("invert", "too slow", lambda: time.sleep(5) or {}, est_s=0, cap_s=0.2)  # stopped at its cap
    check.row("generate", "broken", lambda: 1 / 0, est_s=0, cap_s=5)
    check.deadline = time.perf_counter() + 2
    check.row("student", "does not fit", lambda: {}, est_s=60, cap_s=100)
    rows = json.loads(path.read_text())["rows"]  # written after every row
    assert [(r["name"], r["status"]) for r in rows] == [
        ("fits", "ok"), ("too slow", "timeout"), ("broken", "error"), ("does not fit", "skipped")]
    assert rows[0]["step_s"] == 0.5 and rows[1]["row_s"] < 2 and "ZeroDivisionError" in rows[2]["reason"]
    assert "time budget" in rows[3]["reason"]
