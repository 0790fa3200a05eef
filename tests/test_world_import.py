"""The CIFAR-10 world resumes a long table on another machine from committed rows: which rows it may import.

Rows of d3m depend on the learned prompts and generate's labels. On another CPU model these come out equal up to
floating-point rounding (other hashes, the same distilled set); they must count as the same inputs then, and as
other inputs when they differ for real.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "cifar10"))
import cifar10_common as common  # noqa: E402

from promptset.artifacts import save_tensors  # noqa: E402

PROMPT_META = {"format": "promptset.prompts", "model_hash": "m", "token_names": '["<a>", "<b>"]'}
LABEL_META = {
    "label_kind": "logits",
    "ipc": "2",
    "image_sha256": "x",
    "generation_key": "k",
    "generation": json.dumps({"prompts": "p", "steps": 10}),
}


def _run(folder: Path, prompts: torch.Tensor, logits: torch.Tensor, image_hash: str = "x") -> Path:
    folder.mkdir(parents=True)
    save_tensors(folder / "prompts.safetensors", {"embeddings": prompts}, PROMPT_META)
    save_tensors(
        folder / "labels.safetensors",
        {"seeds": torch.arange(4, dtype=torch.int32), "soft_labels": logits.half()},
        LABEL_META | {"image_sha256": image_hash, "generation": json.dumps({"prompts": image_hash, "steps": 10})},
    )
    return folder


def _committed(tmp: Path, run: Path) -> Path:
    """A committed results file as `write_outputs` leaves it: inputs of `run`, its tensors beside, two rows."""
    results = tmp / "results" / "world.json"
    results.parent.mkdir(parents=True)
    entries = {
        "d3m/p1/x": {"method": "d3m", "final_top1": {"mean": 30.0}},
        "random-real/p1/x": {"method": "random-real", "final_top1": {"mean": 20.0}},
    }
    results.write_text(
        json.dumps({"tag": "cpu", "model_hash": "h", "inputs": common.run_inputs(run), "entries": entries})
    )
    common.save_inputs(run, results)
    return results


def _import(tmp: Path, results: Path, run: Path, name: str) -> dict:
    cur = tmp / name / "results.json"
    n = common.import_committed(results, cur, "cpu", "h", common.run_inputs(run), run)
    entries = json.loads(cur.read_text())["entries"]
    assert n == len(entries)
    return entries


def test_rows_import_when_inputs_differ_only_by_rounding_and_are_trained_again_otherwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    prompts, logits = torch.randn(2, 1, 8, generator=g), 5 * torch.randn(4, 1, 3, generator=g)
    there = _run(tmp_path / "there", prompts, logits)
    results = _committed(tmp_path, there)
    assert (common.inputs_dir(results) / "prompts.safetensors").is_file()

    # another CPU model: the last bits of the prompts and a small logit change; other image hashes
    near = _run(tmp_path / "near", prompts * (1 + 1e-7), logits + 0.03, image_hash="y")
    assert common.run_inputs(near)["prompts"] != common.run_inputs(there)["prompts"]
    got = _import(tmp_path, results, near, "a")
    assert set(got) == {"d3m/p1/x", "random-real/p1/x"}
    assert "prompt vectors differ" in got["d3m/p1/x"]["imported_inputs_within_tolerance"]["prompts"]
    assert "imported_inputs_within_tolerance" not in got["random-real/p1/x"]

    # prompts that were learned differently, or labels of other images: d3m's row is trained again
    far = _run(tmp_path / "far", prompts + 0.01, logits, image_hash="z")
    assert set(_import(tmp_path, results, far, "b")) == {"random-real/p1/x"}
    replaced = json.loads((tmp_path / "b" / "replaced.json").read_text())  # the report sets it beside the new row
    assert set(replaced) == {"d3m/p1/x"} and replaced["d3m/p1/x"]["final_top1"] == {"mean": 30.0}
    assert not (tmp_path / "a" / "replaced.json").exists()
    relabeled = _run(tmp_path / "relabeled", prompts, logits + 1.0, image_hash="w")
    assert set(_import(tmp_path, results, relabeled, "c")) == {"random-real/p1/x"}

    # without the committed copies nothing but equal hashes counts
    for f in common.inputs_dir(results).iterdir():
        f.unlink()
    assert set(_import(tmp_path, results, near, "d")) == {"random-real/p1/x"}
    assert set(_import(tmp_path, results, there, "e")) == {"d3m/p1/x", "random-real/p1/x"}


def test_wall_times_of_earlier_caches_are_kept_not_replaced(tmp_path):
    import types

    import cifar10_report as report

    committed = tmp_path / "world.json"
    old = {"tag": "cpu", "machine": {"cpu": "EPYC"}, "wall_time_s": {"per_stage_cumulative": {"evaluate_p1": 900.0}}}
    committed.write_text(json.dumps(old))
    timer = types.SimpleNamespace(cache_id="abc", data={"invert": 10.0})
    caches = report.per_cache_times(committed, timer, "cpu", "Xeon")
    assert caches == {"earlier": {"cpu": "EPYC", "stages": {"evaluate_p1": 900.0}},
                      "abc": {"cpu": "Xeon", "stages": {"invert": 10.0}}}  # fmt: skip
    # the same cache again (a resumed invocation): its own totals replaced, the earlier cache's kept
    committed.write_text(json.dumps(old | {"wall_time_s": {"per_cache": caches}}))
    timer.data = {"invert": 10.0, "evaluate_p2": 5.0}
    again = report.per_cache_times(committed, timer, "cpu", "Xeon")
    assert again["earlier"] == caches["earlier"] and again["abc"]["stages"] == timer.data
    # another preset's file says nothing about this table's time
    assert list(report.per_cache_times(committed, timer, "reduced", "Xeon")) == ["abc"]


def test_two_invocations_sharing_a_cache_add_their_wall_times(tmp_path):
    a, b = common.Timer(tmp_path / "walltimes.json"), common.Timer(tmp_path / "walltimes.json")  # both start empty
    a.add("evaluate_p1", 100.0)
    b.add("evaluate_p2", 50.0)
    a.add("evaluate_p1", 1.0)
    assert json.loads((tmp_path / "walltimes.json").read_text()) == {"evaluate_p1": 101.0, "evaluate_p2": 50.0}
