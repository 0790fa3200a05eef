"""CPU threads (threads.py, issue 29): one count per process whatever the load, recorded, replayed; passive OpenMP
waiting set before torch loads; the same bits from the CLI idle and beside a busy process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptset import threads
from promptset.errors import UserError


@pytest.fixture
def restore_threads():
    before, configured = torch.get_num_threads(), threads._configured
    yield
    threads._configured = configured
    torch.set_num_threads(before)


def test_configure_takes_the_fixed_counts_in_order_and_refuses_bad_ones(restore_threads):
    default = torch.get_num_threads()
    assert threads.configure({}) == default  # torch's own count (its default unless the caller changed it)
    assert threads.describe()["source"] == "default"
    assert threads.configure({"OMP_NUM_THREADS": "3"}) == 3 and torch.get_num_threads() == 3
    assert threads.configure({"OMP_NUM_THREADS": "3", "PROMPTSET_THREADS": "2"}) == 2
    assert threads.describe()["source"] == "PROMPTSET_THREADS"
    assert threads.configure({"PROMPTSET_THREADS": "auto"}) == 2  # the old load-following mode: now the default
    for bad in ("0", "-1", "many"):
        with pytest.raises(UserError, match="PROMPTSET_THREADS"):
            threads.configure({"PROMPTSET_THREADS": bad})


def test_ensure_configures_once_and_the_recorded_count_wins(restore_threads):
    threads.reset()
    n = threads.ensure()
    torch.set_num_threads(n + 1)  # changed behind promptset's back between two verbs
    assert threads.ensure() == n and torch.get_num_threads() == n
    assert threads.set_threads(1) == 1 and threads.ensure() == 1  # the caller's explicit choice lasts
    assert threads.describe() == {"cpu_threads": 1, "source": "set_threads", "openmp_wait": threads.wait_policy()}
    with pytest.raises(UserError):
        threads.set_threads(0)


def test_every_verb_fixes_the_threads_first(restore_threads):
    import promptset

    threads.reset()
    torch.set_num_threads(3)
    os.environ["PROMPTSET_THREADS"], before = "2", os.environ.get("PROMPTSET_THREADS")
    try:
        with pytest.raises(UserError):
            promptset.budget(run="/nonexistent-run-folder")  # fails in its checks, after make_config
        assert torch.get_num_threads() == 2 and threads.describe()["source"] == "PROMPTSET_THREADS"
    finally:
        os.environ["PROMPTSET_THREADS"] = before or "1"


def test_replay_sets_and_restores(restore_threads):
    torch.set_num_threads(1)
    with threads.replay(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    with threads.replay(None):
        assert torch.get_num_threads() == 1


def test_the_wait_policy_follows_the_load_at_start_only_where_it_can_act(monkeypatch):
    monkeypatch.setattr(threads, "_CHOSEN", threads._CHOSEN)  # choose_waiting records its choice: restored after
    monkeypatch.setattr(threads, "_TORCH_FIRST", False)  # as in a process that imported promptset first
    env: dict[str, str] = {}
    assert threads.choose_waiting(env, modules={}, busy_cores=lambda: 0.1) == "active"
    assert env == {"OMP_WAIT_POLICY": "active", "PROMPTSET_OMP_WAIT": "active"}
    assert threads.wait_policy(env) == "active (idle at start)"
    # a child of that process, started while another process keeps a core busy, chooses again
    assert threads.choose_waiting(env, modules={}, busy_cores=lambda: 1.0) == "passive"
    assert env["OMP_WAIT_POLICY"] == "passive" and threads.wait_policy(env) == "passive (busy at start)"
    env = {}
    assert threads.choose_waiting(env, modules={}, busy_cores=lambda: None) == "passive"  # load unknown: safe side
    for user in ({"GOMP_SPINCOUNT": "100"}, {"OMP_WAIT_POLICY": "active"}, {"KMP_BLOCKTIME": "0"}):
        env = dict(user)
        assert threads.choose_waiting(env, modules={}, busy_cores=lambda: 1.0) is None and env == user
        assert threads.wait_policy(env).startswith("user: ")
    env = {}
    assert threads.choose_waiting(env, modules={"torch": object()}, busy_cores=lambda: 0.0) is None and env == {}


def _clean_env(**extra) -> dict:
    drop = ("PROMPTSET_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
            "MKL_NUM_THREADS")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONWARNINGS": "default"} | extra


def test_import_order_decides_the_wait_policy():
    code = ("import os, sys, warnings\n{first}\nimport promptset\nfrom promptset import threads\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    threads.ensure()\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), '|', threads.wait_policy(), '|', len(w))")
    first = subprocess.run([sys.executable, "-c", code.format(first="")], env=_clean_env(), capture_output=True,
                           text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    policy, described, warned = (x.strip() for x in first.split("|"))
    assert policy in ("active", "passive") and described.startswith(policy + " (") and warned == "0"
    late = subprocess.run([sys.executable, "-c", code.format(first="import torch")], env=_clean_env(),
                          capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    assert late.startswith("None | spinning") and late.endswith("| 1")


def _run(cmd: list[str], env: dict, cwd: Path) -> None:
    """A subprocess in a folder that exists (not whatever the test process's cwd is), its stderr shown on failure."""
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd[:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}"


def _files_hash(folder: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(pattern))}


@pytest.mark.skipif(threads.sample() is None, reason="needs /proc/stat")
def test_cli_bits_do_not_depend_on_the_load(tiny_sd, tmp_path):
    """invert + generate through the CLI, without PROMPTSET_THREADS, idle and beside a busy process: same bits."""
    rng = np.random.default_rng(0)
    for name in ("car", "cat", "dog", "ship"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    env = _clean_env()

    def run(out: Path) -> None:
        base = [sys.executable, "-m", "promptset"]
        _run([*base, "invert", "--backend", "sd", "--model", str(tiny_sd), "--data", str(tmp_path / "data"),
              "--out", str(out), "--steps", "24", "--batch-size", "8", "--resolution", "16", "--device", "cpu",
              "--no-progress"], env, tmp_path)
        _run([*base, "generate", "--run", str(out), "--ipc", "3", "--steps", "4", "--device", "cpu", "--no-progress"],
             env, tmp_path)

    run(tmp_path / "idle")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        before = threads.sample()
        run(tmp_path / "busy")
        busy = threads.others_busy_cores(before, threads.sample())
    finally:
        spin.kill()
        spin.wait()
    assert busy >= 0.5, f"the busy process kept only {busy:.2f} cores busy"
    idle, loaded = tmp_path / "idle", tmp_path / "busy"
    assert (idle / "prompts.safetensors").read_bytes() == (loaded / "prompts.safetensors").read_bytes()
    pngs = _files_hash(idle / "generated", "*.png")
    assert len(pngs) == 12 and pngs == _files_hash(loaded / "generated", "*.png")
    from promptset.artifacts import load_tensors

    settings = [json.loads(load_tensors(run / "labels.safetensors")[1]["generation"]) for run in (idle, loaded)]
    assert settings[0]["cpu_threads"] == settings[1]["cpu_threads"] >= 1  # recorded, and not from the load


def test_the_api_picks_its_threads_as_the_cli_does(tmp_path):
    """`promptset select` and `promptset.select(...)`, each in a fresh process with no thread settings: the same
    count, from the same source, recorded in config.yaml (and likewise with PROMPTSET_THREADS set)."""
    import yaml

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / name / "0.png")
    data = str(tmp_path / "data")
    for extra in ({}, {"PROMPTSET_THREADS": "3"}):
        env = _clean_env(**extra)
        cli, api = tmp_path / f"cli{len(extra)}", tmp_path / f"api{len(extra)}"
        _run([sys.executable, "-m", "promptset", "select", "--data", data, "--out", str(cli), "--teacher", "none",
              "--resolution", "8", "--no-progress"], env, tmp_path)
        code = (f"import promptset; promptset.select(data={data!r}, out={str(api)!r}, teacher='none', resolution=8, "
                "progress=False)")
        _run([sys.executable, "-c", code], env, tmp_path)
        recorded = [yaml.safe_load((run / "config.yaml").read_text())["cpu_threads"]["select"] for run in (cli, api)]
        assert recorded[0] == recorded[1]
        assert recorded[0]["source"] == ("PROMPTSET_THREADS" if extra else "default")
        assert recorded[0]["openmp_wait"].split()[0] in ("active", "passive")
        if extra:
            assert recorded[0]["cpu_threads"] == 3
